"""The JSON types of the OCI runtime spec's fields, checked once when config.json (or an
exec's process.json) is read, so that everything reading the spec later may trust them.

runc decodes config.json into typed Go structs: a field of the wrong JSON type is an
error, an unknown field is ignored and ``null`` leaves a field at its zero value. This
does the same for the fields the spec defines (runv-py reads a subset of them, other
runtimes' fields are checked too so that a spec good here is good there). ``null``
fields are dropped from their object: every reader treats an absent field as the zero
value. Types: ``str``, ``int`` (not ``true``), ``bool``, ``[T]`` a list of T, ``{name:
T}`` an object with these fields, ``Map(T)`` an object whose values are T, ``ANY``.
"""
from .bundle import BundleError

ANY = object()


class Map:
    def __init__(self, values):
        self.values = values


_NAMES = {str: "a string", int: "an integer", bool: "a boolean"}

ID_MAPPING = {"containerID": int, "hostID": int, "size": int}
RATE_DEVICE = [{"major": int, "minor": int, "rate": int}]

PROCESS = {
    "terminal": bool,
    "consoleSize": {"height": int, "width": int},
    "cwd": str,
    "env": [str],
    "args": [str],
    "commandLine": str,
    "rlimits": [{"type": str, "soft": int, "hard": int}],
    "apparmorProfile": str,
    "capabilities": {k: [str] for k in ("bounding", "effective", "inheritable", "permitted",
                                        "ambient")},
    "noNewPrivileges": bool,
    "oomScoreAdj": int,
    "selinuxLabel": str,
    "user": {"uid": int, "gid": int, "umask": int, "additionalGids": [int], "username": str},
    "scheduler": {"policy": str, "nice": int, "priority": int, "flags": [str],
                  "runtime": int, "deadline": int, "period": int},
    "ioPriority": {"class": str, "priority": int},
}

RESOURCES = {
    "devices": [{"allow": bool, "type": str, "major": int, "minor": int, "access": str}],
    "memory": {"limit": int, "reservation": int, "swap": int, "kernel": int, "kernelTCP": int,
               "swappiness": int, "disableOOMKiller": bool, "useHierarchy": bool,
               "checkBeforeUpdate": bool},
    "cpu": {"shares": int, "quota": int, "burst": int, "period": int, "realtimeRuntime": int,
            "realtimePeriod": int, "cpus": str, "mems": str, "idle": int},
    "pids": {"limit": int},
    "blockIO": {"weight": int, "leafWeight": int,
                "weightDevice": [{"major": int, "minor": int, "weight": int, "leafWeight": int}],
                "throttleReadBpsDevice": RATE_DEVICE, "throttleWriteBpsDevice": RATE_DEVICE,
                "throttleReadIOPSDevice": RATE_DEVICE, "throttleWriteIOPSDevice": RATE_DEVICE},
    "hugepageLimits": [{"pageSize": str, "limit": int}],
    "network": {"classID": int, "priorities": [{"name": str, "priority": int}]},
    "rdma": Map({"hcaHandles": int, "hcaObjects": int}),
    "unified": Map(str),
}

SECCOMP = {
    "defaultAction": str, "defaultErrnoRet": int, "architectures": [str], "flags": [str],
    "listenerPath": str, "listenerMetadata": str,
    "syscalls": [{"names": [str], "action": str, "errnoRet": int,
                  "args": [{"index": int, "value": int, "valueTwo": int, "op": str}]}],
}

HOOK = [{"path": str, "args": [str], "env": [str], "timeout": int}]

SPEC = {
    "ociVersion": str,
    "root": {"path": str, "readonly": bool},
    "mounts": [{"destination": str, "type": str, "source": str, "options": [str],
                "uidMappings": [ID_MAPPING], "gidMappings": [ID_MAPPING]}],
    "process": PROCESS,
    "hostname": str,
    "domainname": str,
    "hooks": {k: HOOK for k in ("prestart", "createRuntime", "createContainer",
                                "startContainer", "poststart", "poststop")},
    "annotations": Map(str),
    "linux": {
        "namespaces": [{"type": str, "path": str}],
        "uidMappings": [ID_MAPPING], "gidMappings": [ID_MAPPING],
        "timeOffsets": Map({"secs": int, "nanosecs": int}),
        "devices": [{"type": str, "path": str, "major": int, "minor": int, "fileMode": int,
                     "uid": int, "gid": int}],
        "cgroupsPath": str,
        "resources": RESOURCES,
        "rootfsPropagation": str,
        "seccomp": SECCOMP,
        "sysctl": Map(str),
        "maskedPaths": [str],
        "readonlyPaths": [str],
        "mountLabel": str,
        "personality": {"domain": str, "flags": [str]},
        "intelRdt": ANY,
    },
}


def check(value, kind, where: str, path: str = ""):
    """``value`` if it has the JSON type ``kind`` (objects lose their null fields);
    BundleError naming the file (``where``) and the field otherwise."""
    if kind is ANY:
        return value
    if isinstance(kind, (dict, Map)) and not isinstance(value, dict):
        raise BundleError(f"{where}: {path or 'the document'} must be an object")
    if isinstance(kind, dict):
        for name in [n for n, v in value.items() if v is None]:
            del value[name]
        for name, sub in kind.items():
            if name in value:
                check(value[name], sub, where, f"{path}.{name}" if path else name)
    elif isinstance(kind, Map):
        for name, item in value.items():
            check(item, kind.values, where, f"{path}[{name!r}]")
    elif isinstance(kind, list):
        if not isinstance(value, list):
            raise BundleError(f"{where}: {path} must be a list")
        for i, item in enumerate(value):
            check(item, kind[0], where, f"{path}[{i}]")
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{where}: {path} must be {_NAMES[kind]}, not {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "?")
