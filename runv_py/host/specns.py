"""The shim's own namespaces on the host: the ones the spec names.

runv-py reports the shim's pid as the container's (state, --pid-file), and callers
compare ``/proc/<pid>/ns/*`` with the namespaces they asked for (podman's pod members
name ``/proc/<infra pid>/ns/net``). So the shim joins the network, ipc, uts and cgroup
namespaces the spec gives a path for, and makes new ones where it gives none, as runc's
container init does. The VM holds the container's real ones; these are the host side.
Called from the shim's main thread: /proc/<pid>/ns shows that thread's namespaces.
"""
import os

from ..hyperstart import syscalls
from ..oci.bundle import BundleError

KINDS = {"network": syscalls.CLONE_NEWNET, "ipc": syscalls.CLONE_NEWIPC,
         "uts": syscalls.CLONE_NEWUTS, "cgroup": syscalls.CLONE_NEWCGROUP}


def enter(spec: dict, hostname: str = "") -> None:
    """Join or make the spec's network, ipc, uts and cgroup namespaces (the cgroup one
    after the shim joined its cgroupsPath: a new one is rooted there)."""
    for entry in (spec.get("linux") or {}).get("namespaces") or []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        flag = KINDS.get(kind)
        if flag is None:
            continue
        path = entry.get("path") or ""
        try:
            if path:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    syscalls.setns(fd, flag)
                finally:
                    os.close(fd)
            else:
                syscalls.unshare(flag)
                if kind == "uts" and hostname:
                    syscalls.sethostname(hostname)
        except OSError as e:
            raise BundleError(f"{kind} namespace {path or '(new)'}: {e.strerror or e}") from None
