"""Where ``linux.cgroupsPath`` lands on the host, as runc's libcontainer puts it.

runc cleans the path as if it were rooted at ``/`` before joining it to anything, so
``..`` can never climb above a hierarchy's root: ``/../../tmp/x`` is ``/tmp/x`` under
each hierarchy's mount point, and a relative ``../x`` is ``x`` under the caller's own
cgroup (runc's parent cgroup for relative paths). A path ``slice:prefix:name`` is
systemd's form (what ``--systemd-cgroup`` callers pass): it names
``<expanded slice>/<prefix>-<name>.scope``, with runc's checks on the slice and unit
names; runv-py makes it as plain directories (it does not talk to systemd).
"""
import os
import posixpath

from ..hyperstart.errors import InvalidArgument

UNIFIED = "/sys/fs/cgroup"
DEFAULT_SLICE = "system.slice"     # runc's parent when a systemd path names none


def clean(path: str) -> str:
    """runc's utils.CleanPath: lexically cleaned; a relative path is cleaned as if it
    were rooted at "/" and stays relative, so no ``..`` is left in either."""
    if not path:
        return ""
    path = posixpath.normpath(path)
    if not path.startswith("/"):
        path = posixpath.relpath(posixpath.normpath("/" + path), "/")
    path = posixpath.normpath(path)
    # POSIX keeps a leading "//"; a cgroup path has no use for it.
    return "/" + path.lstrip("/") if path.startswith("/") else path


def expand_slice(slice_name: str) -> str:
    """systemd's slice name as a path: ``a-b.slice`` -> ``/a.slice/a-b.slice``."""
    suffix = ".slice"
    if len(slice_name) <= len(suffix) or not slice_name.endswith(suffix) or "/" in slice_name:
        raise InvalidArgument(f"invalid slice name: {slice_name!r}")
    stem = slice_name[:-len(suffix)]
    if stem == "-":
        return "/"
    path, prefix = "", ""
    for component in stem.split("-"):
        if not component:     # "a--b.slice" and "-a.slice" are not valid
            raise InvalidArgument(f"invalid slice name: {slice_name!r}")
        path += "/" + prefix + component + suffix
        prefix += component + "-"
    return path


def systemd_path(path: str) -> str:
    """``slice:prefix:name`` as a cgroup path, the way runc's systemd driver names it."""
    parts = path.split(":")
    if len(parts) != 3:
        raise InvalidArgument(f'expected cgroupsPath to be of format "slice:prefix:name" '
                              f"for systemd cgroups, got {path!r} instead")
    slice_name, prefix, name = parts
    if not name or "/" in name or "/" in prefix or name in (".", ".."):
        raise InvalidArgument(f"invalid unit name in cgroupsPath {path!r}")
    unit = name if name.endswith(".slice") else \
        (f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
    return clean(posixpath.join(expand_slice(slice_name or DEFAULT_SLICE), unit))


def inner_path(cgroups_path: str) -> str:
    """The cleaned path inside each hierarchy: absolute, or relative to our own cgroup."""
    if ":" in cgroups_path:
        return systemd_path(cgroups_path)
    path = clean(cgroups_path)
    if path in ("", ".", "/"):
        raise InvalidArgument(f"cgroupsPath {cgroups_path!r} names no cgroup of its own")
    return path


def under(base: str, inner: str) -> str:
    """``inner`` (already clean) joined under the directory ``base``; never outside it."""
    target = os.path.normpath(os.path.join(base, inner.lstrip("/")))
    if os.path.commonpath([target, base]) != os.path.normpath(base):
        raise InvalidArgument(f"cgroup path {inner!r} leaves {base}")   # cannot happen
    return target
