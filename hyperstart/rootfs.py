"""A container's root filesystem, set up by its init before it execs, in runc's order:
root propagation, the OCI mounts (with their propagation), /dev with the default and
the spec's devices, a read-only root, the move into it (MS_MOVE + chroot), then masked
and read-only paths.

Propagation: the sandbox's share is made a shared mount in the container's mount
namespace before anything is bound from it, so the root and every bind mount are peers
of it, and the spec's ``shared``/``slave``/``private`` options (and rootfsPropagation,
runc's default rslave) then mean what they mean under runc."""
import errno
import os

from . import devices as dv
from . import messages as m
from . import syscalls as sc
from .errors import InvalidArgument

MS_NOSYMFOLLOW = 256
MOUNT_FLAGS = {
    "ro": (sc.MS_RDONLY, True), "rw": (sc.MS_RDONLY, False),
    "nosuid": (sc.MS_NOSUID, True), "suid": (sc.MS_NOSUID, False),
    "nodev": (sc.MS_NODEV, True), "dev": (sc.MS_NODEV, False),
    "noexec": (sc.MS_NOEXEC, True), "exec": (sc.MS_NOEXEC, False),
    "sync": (sc.MS_SYNCHRONOUS, True), "async": (sc.MS_SYNCHRONOUS, False),
    "noatime": (sc.MS_NOATIME, True), "nodiratime": (sc.MS_NODIRATIME, True),
    "relatime": (sc.MS_RELATIME, True), "strictatime": (sc.MS_STRICTATIME, True),
    "bind": (sc.MS_BIND, True), "rbind": (sc.MS_BIND | sc.MS_REC, True),
    "dirsync": (sc.MS_DIRSYNC, True), "nosymfollow": (MS_NOSYMFOLLOW, True),
    "symfollow": (MS_NOSYMFOLLOW, False), "defaults": (0, True),
}
PROPAGATION = {
    "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE | sc.MS_REC,
    "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE, "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}

DEV_TMPFS = m.Mount(destination="/dev", type="tmpfs", source="tmpfs",
                    options=["nosuid", "strictatime", "mode=755", "size=65536k"])
DEV_PTS = m.Mount(destination="/dev/pts", type="devpts", source="devpts",
                  options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"])


def mount_options(options) -> tuple:
    """Split OCI mount options into mount(2) flags and the filesystem data string
    (propagation options are neither: see PROPAGATION)."""
    flags, data = 0, []
    for opt in options or []:
        if opt in PROPAGATION:
            continue
        if opt in MOUNT_FLAGS:
            bit, on = MOUNT_FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(opt)
    return flags, ",".join(data) or None


def secure_join(root: str, path: str) -> str:
    """``root/path`` with every symlink resolved inside ``root``: a container's mount
    destination cannot point the agent outside the container's root."""
    parts = [x for x in path.split("/") if x not in ("", ".")]
    current = ""
    for _ in range(255):
        if not parts:
            return root + (current or "")
        part = parts.pop(0)
        if part == "..":
            current = current.rsplit("/", 1)[0]
            continue
        candidate = current + "/" + part
        full = root + candidate
        if os.path.islink(full):
            target = os.readlink(full)
            if target.startswith("/"):
                current = ""
            parts = [x for x in target.split("/") if x not in ("", ".")] + parts
            continue
        current = candidate
    raise InvalidArgument(f"too many symlinks in {path}")


def setup_rootfs(request: m.NewContainer, root: str, share_dir: str,
                 guest_devices: bool = False, volumes_dir: str = "") -> None:
    """In the container's init: mount its filesystems and make its root the root (the
    masked and read-only paths come later, after the sysctls: protect_paths). With
    ``guest_devices``, a container allowed every device (privileged) gets the devices of
    the kernel it runs on (devices.py)."""
    propagation = PROPAGATION.get(request.rootfs_propagation or "rslave")
    if propagation is None:
        raise InvalidArgument(f"unknown rootfsPropagation {request.rootfs_propagation!r}")
    # runc's first step: the whole namespace takes rootfsPropagation (rslave unless
    # asked), so the volumes' mount stays a peer of the agent's only when it is shared.
    sc.mount(None, "/", None, propagation)
    if request.rootfs_in_guest:
        # Its files are copies in guest memory: its namespace keeps nothing of the share,
        # which the agent can then unmount for a checkpoint.
        for point in (volumes_dir, share_dir):
            if point and os.path.ismount(point):
                sc.umount(point, sc.MNT_DETACH)
        share_mount = None
    else:
        share_mount = _mount_point(share_dir)
        sc.mount(None, share_mount, None, sc.MS_SHARED)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)   # a peer of the share
    sc.mount(None, root, None, propagation)
    mounts = list(request.mounts)
    destinations = {mnt.destination.rstrip("/") for mnt in mounts}
    if "/dev" not in destinations:
        mounts.insert(0, DEV_TMPFS)
    if "/dev/pts" not in destinations:
        mounts.append(DEV_PTS)
    dev_tmpfs = False
    for mnt in mounts:
        mount_one(root, mnt, share_dir, volumes_dir)
        where = mnt.destination.rstrip("/")
        if where == "/dev" and mnt.type == "tmpfs":
            dev_tmpfs = True
            dv.make_devices(os.path.join(root, "dev"))
    devices = list(request.devices)
    if guest_devices and dv.allows_all(request.device_rules):
        devices += dv.guest_devices()   # after the spec's (the host's): the guest's win
    for device in devices:
        dv.make_device(root, device, secure_join)
    if dev_tmpfs:
        dv.setup_ptmx(os.path.join(root, "dev"))
    if request.readonly:
        sc.mount(None, root, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
    if request.hostname:
        sc.sethostname(request.hostname)
    os.chdir(root)
    # A mount whose parent is shared (the share) cannot move, nor move onto a shared one
    # (the old root); the root and the bind mounts stay peers of one another.
    if share_mount:
        sc.mount(None, share_mount, None, sc.MS_PRIVATE)
    sc.mount(None, "/", None, sc.MS_PRIVATE)
    sc.mount(root, "/", None, sc.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def protect_paths(request: m.NewContainer, platform) -> None:
    """In the container (after the move and the sysctls): masked and read-only paths,
    the spec's and the platform's (what it hides of its kernel whatever the spec says)."""
    for path in (*request.masked_paths, *platform.masked_paths):
        mask_path(path)
    for path in (*request.readonly_paths, *platform.readonly_paths):
        readonly_path(path)


def _mount_point(path: str) -> str:
    """The mount point ``path`` lies on."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def mask_path(path: str) -> None:
    """Hide ``path`` (in the container, after the move): /dev/null over a file, an empty
    read-only tmpfs over a directory, as runc does."""
    if os.path.isdir(path) and not os.path.islink(path):
        sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY)
    elif os.path.exists(path):
        sc.mount("/dev/null", path, None, sc.MS_BIND)


def readonly_path(path: str) -> None:
    if not os.path.exists(path):
        return
    sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
    sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC)


def mount_one(root: str, mnt: m.Mount, share_dir: str, volumes_dir: str = "") -> None:
    kind = mnt.type or "bind"
    flags, data = mount_options(mnt.options)
    target = secure_join(root, mnt.destination)
    source = mnt.source or kind
    if mnt.volume:
        if not volumes_dir or "/" in source or source in (".", ".."):
            raise InvalidArgument(f"bad volume {source!r}")
        source = os.path.join(volumes_dir, source)
    elif mnt.shared:
        source = os.path.join(share_dir, source)
    if flags & sc.MS_BIND or kind == "bind":
        flags |= sc.MS_BIND
        if not os.path.exists(target):
            if os.path.isdir(source):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
        sc.mount(source, target, None, flags & (sc.MS_BIND | sc.MS_REC))
        if flags & ~(sc.MS_BIND | sc.MS_REC):
            sc.mount(None, target, None, flags | sc.MS_REMOUNT | sc.MS_BIND)
        propagate(target, mnt.options)
        return
    os.makedirs(target, exist_ok=True)
    if kind == "cgroup":
        kind, source, data = "cgroup2", "cgroup2", None
    if "tmpcopyup" in mnt.options and kind == "tmpfs":
        mount_tmpfs_copy_up(target, flags, _without(data, "tmpcopyup"))
        propagate(target, mnt.options)
        return
    try:
        sc.mount(source, target, kind, flags, data)
    except OSError as e:
        if kind == "mqueue" and e.errno in (errno.ENODEV, errno.EPERM):
            return  # an optional filesystem the guest kernel may not carry
        raise
    propagate(target, mnt.options)


def _without(data, option: str):
    rest = [o for o in (data or "").split(",") if o and o != option]
    return ",".join(rest) or None


def mount_tmpfs_copy_up(target: str, flags: int, data) -> None:
    """runc's ``tmpcopyup``: a tmpfs over ``target`` that starts with what was there."""
    scratch = os.path.join("/run", f"tmpcopyup-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    sc.mount("tmpfs", scratch, "tmpfs", flags, data)
    copy_tree(target, scratch)
    sc.mount(scratch, target, None, sc.MS_MOVE)
    os.rmdir(scratch)


def copy_into_guest(base: str, source_root: str, mounts, share_dir: str) -> tuple:
    """A checkpointable container's files: its rootfs and what it binds from the share,
    copied into a tmpfs of its own at ``base``; returns (root, mounts) to use instead."""
    os.makedirs(base, exist_ok=True)
    sc.mount("tmpfs", base, "tmpfs", 0, "mode=700")
    root = os.path.join(base, "rootfs")
    _copy_entry(source_root, root)
    copied = []
    for i, mnt in enumerate(mounts):
        if mnt.volume:
            raise InvalidArgument(f"{mnt.destination}: a pod volume cannot be copied into a "
                                  "checkpointable container")
        if mnt.shared:
            source = os.path.join(base, f"mount-{i}")
            _copy_entry(secure_join(share_dir, mnt.source), source)
            mnt = m.Mount(destination=mnt.destination, type=mnt.type, source=source,
                          options=mnt.options)
        copied.append(mnt)
    return root, copied


def _copy_entry(source: str, dest: str) -> None:
    st = os.stat(source)
    if os.path.isdir(source):
        os.mkdir(dest)
        copy_tree(source, dest)
    else:
        _copy_file(source, dest)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, st.st_mode & 0o7777)


def _copy_file(source: str, dest: str) -> None:
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)


def copy_tree(source: str, target: str) -> None:
    """Copy a directory's contents (files, links, directories, with modes and owners);
    the guest's Python has no shutil."""
    for entry in os.scandir(source):
        dest = os.path.join(target, entry.name)
        st = entry.stat(follow_symlinks=False)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(dest)
            copy_tree(entry.path, dest)
        elif entry.is_file(follow_symlinks=False):
            _copy_file(entry.path, dest)
        else:
            continue  # sockets, devices: not copied up, as runc
        os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
        if not entry.is_symlink():
            os.chmod(dest, st.st_mode & 0o7777)


def propagate(target: str, options) -> None:
    for opt in options or []:
        if opt in PROPAGATION:
            sc.mount(None, target, None, PROPAGATION[opt])
