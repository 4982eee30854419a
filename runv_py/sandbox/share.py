"""The sandbox's share: host directories the guest sees (over 9p).

The container's rootfs and every bind-mount source are bind-mounted into
``share/<container>/``. The process that owns the sandbox first calls
``private_mount_namespace()``, so those bind mounts exist only in its own mount namespace
(and QEMU's, its child) and vanish with them: a killed owner cannot leak a mount. A VM
from the node factory runs in the factory's mount namespace: the binds are made there
(``ns_pid``), and the factory removes them if the owner dies first.

That namespace is a slave of the host's: a mount the host makes later under a bind
mount's source reaches the share (and the guest sees what it holds), and nothing made
here goes back. Bind mounts that ask for propagation (``shared``, ``slave`` and their
recursive forms) of a directory are the sandbox's volumes: one bind per source for every
container of the sandbox (``Volumes``), so the guest binds them from one mount and
mounts propagate between the pod's containers as between runc's on one host.
"""
import hashlib
import logging
import os
import threading

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


def bind(source: str, target: str, ns_pid: int = 0, recursive: bool = True,
         private: bool = False, tree: int = -1) -> None:
    """Bind ``source`` (a file or directory, with the mounts below it if ``recursive``)
    onto a new ``target`` in the share; with ``ns_pid``, in that process's mount
    namespace (a VM the node factory made, whose QEMU lives there): the mounts are cloned
    here and attached there. A ``private`` bind no longer receives the host's mounts.
    A ``tree`` (clone_tree of ``source``, by the caller's caller) is attached instead."""
    is_dir = os.path.isdir(source)

    def place(tree: int = -1):
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        if tree < 0:
            syscalls.mount(source, target, None,
                           syscalls.MS_BIND | (syscalls.MS_REC if recursive else 0))
        else:
            syscalls.move_into(tree, target)
        if private:
            syscalls.mount(None, target, None, syscalls.MS_PRIVATE | syscalls.MS_REC)
    if tree >= 0:
        in_mount_namespace(ns_pid, lambda: place(tree))
        return
    if not ns_pid:
        place()
        return
    tree = syscalls.clone_tree(source, recursive)
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


PROPAGATING = ("shared", "rshared", "slave", "rslave")
PRIVATE = ("private", "rprivate", "unbindable", "runbindable")


class Volumes:
    """A sandbox's volumes: host directories bound once into ``share/volumes/<key>``
    for all the containers that bind them with propagation, released by the last."""

    def __init__(self, share_dir: str, ns_pid: int = 0):
        self.share_dir = share_dir
        self.ns_pid = ns_pid
        self.lock = threading.Lock()
        self.held: dict = {}   # key -> number of containers holding it

    def acquire(self, source: str, recursive: bool) -> str:
        """The volume's key (its path under ``volumes/``), bound if it is new."""
        real = os.path.realpath(source)
        key = hashlib.sha256(f"{int(recursive)}:{real}".encode()).hexdigest()[:16]
        with self.lock:
            if key not in self.held:
                bind(real, self.path(key), self.ns_pid, recursive)
                self.held[key] = 0
            self.held[key] += 1
        return key

    def path(self, key: str) -> str:
        return os.path.join(self.share_dir, "volumes", key)

    def release(self, keys: list) -> None:
        """Let go of ``keys`` (emptied); a volume no container holds is unbound."""
        with self.lock:   # held while unbinding: an acquire of the key waits for it
            gone = []
            while keys:
                key = keys.pop()
                if key not in self.held:
                    continue  # released with the whole sandbox already
                self.held[key] -= 1
                if not self.held[key]:
                    del self.held[key]
                    gone.append(self.path(key))
            unbind(gone, self.ns_pid)

    def release_all(self) -> None:
        with self.lock:
            gone = [self.path(key) for key in self.held]
            self.held.clear()
            unbind(gone, self.ns_pid)


def guest_mounts(share_dir: str, cid: str, spec_mounts: list, made: list,
                 ns_pid: int = 0, volumes: Volumes = None, held: list = None) -> list:
    """The bundle's mounts as Mount messages; bind sources are shared into the VM
    (their host binds are appended to ``made``; the keys of the sandbox's ``volumes`` a
    mount takes, to ``held``)."""
    out = []
    for i, mount in enumerate(spec_mounts or []):
        options = list(mount.get("options") or [])
        msg = m.Mount(destination=mount["destination"], type=mount.get("type") or "",
                      source=mount.get("source") or "", options=options)
        if is_bind(mount):
            if not os.path.exists(msg.source):
                raise BundleError(f"bind mount source {msg.source} does not exist")
            recursive = "rbind" in options
            if volumes is not None and os.path.isdir(msg.source) and \
                    any(o in PROPAGATING for o in options):
                key = volumes.acquire(msg.source, recursive)
                held.append(key)
                msg.source, msg.volume, msg.type = key, True, "bind"
            else:
                rel = os.path.join(cid, "mounts", str(i))
                target = os.path.join(share_dir, rel)
                bind(msg.source, target, ns_pid, recursive,
                     private=any(o in PRIVATE for o in options))
                made.append(target)
                msg.source, msg.shared, msg.type = rel, True, "bind"
        out.append(msg)
    return out
