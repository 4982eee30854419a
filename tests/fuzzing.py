"""Hypothesis settings and strategies shared by the fuzz tests (test_fuzz_*.py).

The seed is fixed (derandomize) and the examples bounded, so CI runs the same inputs
every time and the fuzz tests add seconds, not minutes, to the suite."""
from hypothesis import HealthCheck, settings, strategies as st


def fuzz(examples: int = 100):
    """A test's settings: fixed seed, ``examples`` inputs, no per-example deadline (a
    loaded CI machine is slow), no database (nothing is kept between runs)."""
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=16)


# Values that pass a quick look and trip a conversion: numbers in strings, empty ones,
# paths that climb, integers past 64 bits.
tricky = st.sampled_from(["", "0", "-1", "1e3", "abc", "/", "..", "../x", " 1", 1 << 64,
                          -(1 << 63), 0, -1, 1.5, True, [], {}, [None], {"": None}])


SAME_TYPE = {
    str: st.sampled_from(["", "0", "-1", "1e3", "abc", "/", "..", "../x", " 1"]) | st.text(max_size=12),
    int: st.integers(-(1 << 65), 1 << 65) | st.sampled_from([0, -1, 1 << 64, 1 << 63]),
    bool: st.booleans(),
    list: st.just([]) | st.lists(json_values, max_size=3),
    dict: st.just({}) | st.dictionaries(st.text(max_size=10), json_values, max_size=3),
}


def paths(doc, prefix=()):
    """Every place in a JSON document: the document itself, and each item below it."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from paths(value, prefix + (key,))


def mutate(data, doc, times: int = 0):
    """``doc`` (a fresh copy) with 1 to 3 places anywhere in it replaced by another JSON
    value or removed: the input that passes a decoder's first checks and trips one
    deep inside."""
    doc = _copy(doc)
    for _ in range(times or data.draw(st.integers(1, 3))):
        places = list(paths(doc))[1:]
        if not places or data.draw(st.integers(0, 19)) == 19:  # seldom: not even an object
            return _copy(data.draw(json_values))
        where = data.draw(st.sampled_from(places))
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        old = parent[where[-1]]
        how = data.draw(st.integers(0, 3))
        if how == 3 and isinstance(parent, dict):
            del parent[where[-1]]
        elif how == 2:
            parent[where[-1]] = _copy(data.draw(tricky | json_values))  # tricky: shared objects
        else:  # the right JSON type, a value no one expected
            parent[where[-1]] = _copy(data.draw(SAME_TYPE.get(type(old), json_values)))
    return doc


def _copy(doc):
    if isinstance(doc, dict):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def truncations(whole: bytes):
    """``whole`` cut anywhere, with random bytes after the cut."""
    return st.tuples(st.integers(0, len(whole)), st.binary(max_size=32)).map(
        lambda cut: whole[:cut[0]] + cut[1])
