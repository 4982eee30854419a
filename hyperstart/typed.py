"""``@message``: typed message classes for the hyperstart protocol, without dataclasses.

It gives a class what ``dataclasses`` would (keyword or positional construction,
defaults, equality, repr) plus typed decoding from the wire (camelCase JSON). It is not
``dataclasses`` itself because the guest imports this at boot, and ``dataclasses``
imports ``inspect`` and ``re``: 22 ms on this host, about 0.2 s of a cold boot under TCG.
Annotations stay strings (``from __future__``): nothing imports ``typing``.
"""
from __future__ import annotations

from . import protocol as p
from .errors import InvalidArgument

_REQUIRED = object()
_MESSAGES = {}        # class name -> class, for nested fields
REQUESTS = {}         # code -> request class
_PRIMITIVES = {"int": int, "str": str, "bool": bool, "dict": dict, "list": list}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def message(code: int = -1, reply=None):
    """Class decorator: fields come from the annotations, defaults from the class body.
    A default that is a message class (``user: User = User``) makes a fresh instance."""
    def make(cls):
        fields = []
        for name, kind in cls.__dict__.get("__annotations__", {}).items():
            default = cls.__dict__.get(name, _REQUIRED)
            fields.append((name, _camel(name), kind.replace(" ", ""), default))
        cls._fields = tuple(fields)
        cls.CODE = code
        cls.REPLY = reply
        for name, *_ in fields:
            if name in cls.__dict__:
                delattr(cls, name)
        for attr in ("__init__", "__eq__", "__repr__", "to_wire"):
            setattr(cls, attr, globals()["_" + attr.strip("_")])
        cls.from_wire = classmethod(_from_wire)
        cls.__hash__ = None
        _MESSAGES[cls.__name__] = cls
        if code >= 0:
            REQUESTS[code] = cls
        return cls
    return make


def _fresh(default):
    if isinstance(default, (list, dict)):
        return type(default)(default)
    if isinstance(default, type) and default.__name__ in _MESSAGES:
        return default()
    return default


def _init(self, *args, **kwargs) -> None:
    fields = type(self)._fields
    if len(args) > len(fields):
        raise TypeError(f"{type(self).__name__} takes at most {len(fields)} arguments")
    for (name, *_), value in zip(fields, args):
        if name in kwargs:
            raise TypeError(f"{type(self).__name__} got {name} twice")
        kwargs[name] = value
    for name, _wire, _kind, default in fields:
        if name in kwargs:
            value = kwargs.pop(name)
        elif default is _REQUIRED:
            raise TypeError(f"{type(self).__name__} needs {name}")
        else:
            value = _fresh(default)
        setattr(self, name, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__} has no field {', '.join(kwargs)}")


def _eq(self, other) -> bool:
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, f[0]) == getattr(other, f[0]) for f in self._fields)


def _repr(self) -> str:
    return f"{type(self).__name__}({', '.join(f'{f[0]}={getattr(self, f[0])!r}' for f in self._fields)})"


def _to_wire(self) -> dict:
    return {wire: _value_to_wire(getattr(self, name)) for name, wire, _, _ in self._fields}


def _value_to_wire(value):
    if hasattr(value, "_fields"):
        return value.to_wire()
    if isinstance(value, list):
        return [_value_to_wire(v) for v in value]
    return value


def _from_wire(cls, data):
    """The message from its JSON object; raises InvalidArgument naming the bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{cls.__name__}: expected a JSON object")
    values = {}
    for name, wire, kind, default in cls._fields:
        if wire in data:
            values[name] = _decode(kind, data[wire], f"{cls.__name__}.{wire}")
        elif default is _REQUIRED:
            raise InvalidArgument(f"{cls.__name__}: {wire} is required")
    return cls(**values)


def _decode(kind: str, value, where: str):
    if kind.endswith("|None"):
        return None if value is None else _decode(kind[:-5], value, where)
    if kind.startswith("list[") and kind.endswith("]"):
        if not isinstance(value, list):
            raise InvalidArgument(f"{where}: expected a list")
        return [_decode(kind[5:-1], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind.startswith("dict["):
        kind = "dict"
    nested = _MESSAGES.get(kind)
    if nested is not None:
        return nested.from_wire(value)
    expected = _PRIMITIVES.get(kind)
    if expected is not None and (not isinstance(value, expected)
                                 or (expected is int and isinstance(value, bool))):
        raise InvalidArgument(f"{where}: expected {kind}, got {type(value).__name__}")
    return value


def encode(msg, code: int = -1) -> bytes:
    """A control frame carrying ``msg`` (its class's code unless ``code`` is given)."""
    fields = msg.to_wire() if msg is not None else None
    return p.encode_control(msg.CODE if code < 0 else code, fields or None)


def decode(cls, payload: bytes):
    """The ``cls`` message in a control frame's payload."""
    return cls.from_wire(p.decode_message(payload))
