"""The sandbox's share: host directories the guest sees (over 9p).

The container's rootfs and every bind-mount source are bind-mounted into
``share/<container>/``. The process that owns the sandbox first calls
``private_mount_namespace()``, so those bind mounts exist only in its own mount namespace
(and QEMU's, its child) and vanish with them: a killed owner cannot leak a mount.
"""
import logging
import os

from ..hyperstart import messages as m
from ..hyperstart import syscalls
from ..oci.bundle import BundleError

log = logging.getLogger("runv_py.sandbox")


def private_mount_namespace(keep_shared: str = "") -> None:
    syscalls.private_mount_namespace(keep_shared)


def bind(source: str, target: str) -> None:
    """Bind ``source`` (a file or directory) onto a new ``target`` in the share."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)


def unbind(targets: list) -> None:
    """Undo binds made by ``bind`` (innermost last in ``targets``, which is emptied)."""
    while targets:
        target = targets.pop()
        try:
            syscalls.umount(target, syscalls.MNT_DETACH)
        except OSError as e:
            log.warning("cannot unmount %s: %s", target, e)


def is_bind(mount: dict) -> bool:
    options = mount.get("options") or []
    kind = mount.get("type") or ""
    return kind == "bind" or (kind in ("", "none") and ("bind" in options or "rbind" in options))


def guest_mounts(share_dir: str, cid: str, spec_mounts: list, made: list) -> list:
    """The bundle's mounts as Mount messages; bind sources are shared into the VM
    (their host binds are appended to ``made``)."""
    out = []
    for i, mount in enumerate(spec_mounts or []):
        msg = m.Mount(destination=mount["destination"], type=mount.get("type") or "",
                      source=mount.get("source") or "", options=list(mount.get("options") or []))
        if is_bind(mount):
            if not os.path.exists(msg.source):
                raise BundleError(f"bind mount source {msg.source} does not exist")
            rel = os.path.join(cid, "mounts", str(i))
            target = os.path.join(share_dir, rel)
            bind(msg.source, target)
            made.append(target)
            msg.source, msg.shared, msg.type = rel, True, "bind"
        out.append(msg)
    return out
