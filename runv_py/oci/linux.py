"""OCI's ``linux`` section (and the spec-level fields beside it) as the agent's
NewContainer fields: masked and read-only paths, sysctls, devices and device rules, root
propagation, the domain name and the seccomp profile. The agent applies them in the
guest, in runc's order (hyperstart/rootfs.py, security.py, seccomp.py)."""
from ..hyperstart import messages as m
from .bundle import BundleError


def container_fields(spec: dict) -> dict:
    linux = spec.get("linux") or {}
    resources = linux.get("resources") or {}
    sysctl = linux.get("sysctl") or {}
    if not isinstance(sysctl, dict):
        raise BundleError("linux.sysctl must be an object")
    return {
        "domainname": spec.get("domainname") or "",
        "masked_paths": list(linux.get("maskedPaths") or []),
        "readonly_paths": list(linux.get("readonlyPaths") or []),
        "sysctl": {str(k): str(v) for k, v in sysctl.items()},
        "devices": [device(d) for d in linux.get("devices") or []],
        "device_rules": [device_rule(r) for r in resources.get("devices") or []],
        "rootfs_propagation": linux.get("rootfsPropagation") or "",
        "seccomp": linux.get("seccomp"),
    }


def device(d: dict) -> m.Device:
    path, kind = d.get("path", ""), d.get("type", "")
    if not path.startswith("/dev/") or kind not in ("c", "b", "u", "p"):
        raise BundleError(f"linux.devices: bad device {path!r} of type {kind!r}")
    return m.Device(path=path, type=kind, major=int(d.get("major", 0)),
                    minor=int(d.get("minor", 0)), file_mode=d.get("fileMode"),
                    uid=d.get("uid"), gid=d.get("gid"))


def device_rule(r: dict) -> m.DeviceRule:
    kind = r.get("type") or "a"
    if kind not in ("a", "c", "b"):
        raise BundleError(f"linux.resources.devices: bad type {kind!r}")
    access = r.get("access") or "rwm"
    if set(access) - set("rwm"):
        raise BundleError(f"linux.resources.devices: bad access {access!r}")
    return m.DeviceRule(allow=bool(r.get("allow")), type=kind, major=r.get("major"),
                        minor=r.get("minor"), access=access)


def shared_namespaces(spec: dict) -> dict:
    """The namespaces a pod member joins in the guest: those its spec gives a path
    (CRI and podman point them at the sandbox's or infra's pid); the network is the VM's
    anyway. Values are True: the caller names whose they are."""
    shared = {}
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        kind = {"ipc": "ipc", "uts": "uts", "pid": "pid"}.get(ns.get("type"))
        if kind and ns.get("path"):
            shared[kind] = True
    return shared
