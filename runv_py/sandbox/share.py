"""The sandbox's share: host directories the guest sees (over 9p).

The container's rootfs and every bind-mount source are bind-mounted into
``share/<container>/``. The process that owns the sandbox first calls
``private_mount_namespace()``, so those bind mounts exist only in its own mount namespace
(and QEMU's, its child) and vanish with them: a killed owner cannot leak a mount. A VM
from the node factory runs in the factory's mount namespace: the binds are made there
(``ns_pid``), and the factory removes them if the owner dies first.
"""
import logging
import os

from ..hyperstart import messages as m
from ..hyperstart import syscalls
from ..host.nsthread import in_namespace
from ..oci.bundle import BundleError

log = logging.getLogger("runv_py.sandbox")


def private_mount_namespace() -> None:
    syscalls.private_mount_namespace()


def in_mount_namespace(pid: int, fn):
    """``fn()`` in the mount namespace of ``pid`` (0: this one)."""
    if not pid:
        return fn()
    return in_namespace(f"/proc/{pid}/ns/mnt", syscalls.CLONE_NEWNS, fn)


def bind(source: str, target: str, ns_pid: int = 0) -> None:
    """Bind ``source`` (a file or directory) onto a new ``target`` in the share; with
    ``ns_pid``, in that process's mount namespace (a VM the node factory made, whose QEMU
    lives there): the mounts are cloned here and attached there."""
    is_dir = os.path.isdir(source)

    def place(tree: int = -1):
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        if tree < 0:
            syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
        else:
            syscalls.move_into(tree, target)
    if not ns_pid:
        place()
        return
    tree = syscalls.clone_tree(source)
    try:
        in_mount_namespace(ns_pid, lambda: place(tree))
    finally:
        os.close(tree)


def unbind(targets: list, ns_pid: int = 0) -> None:
    """Undo binds made by ``bind`` (innermost last in ``targets``, which is emptied)."""
    def detach():
        while targets:
            target = targets.pop()
            try:
                syscalls.umount(target, syscalls.MNT_DETACH)
            except OSError as e:
                log.warning("cannot unmount %s: %s", target, e)
    try:
        in_mount_namespace(ns_pid, detach)
    except OSError as e:  # the VM (and its namespace) is gone: so are the mounts
        log.info("mounts in the VM's namespace: %s", e)
        targets.clear()


def is_bind(mount: dict) -> bool:
    options = mount.get("options") or []
    kind = mount.get("type") or ""
    return kind == "bind" or (kind in ("", "none") and ("bind" in options or "rbind" in options))


def guest_mounts(share_dir: str, cid: str, spec_mounts: list, made: list,
                 ns_pid: int = 0) -> list:
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
            bind(msg.source, target, ns_pid)
            made.append(target)
            msg.source, msg.shared, msg.type = rel, True, "bind"
        out.append(msg)
    return out
