"""Linux system calls the standard library of Python 3.11 lacks (mount, unshare, setns...).

Used by the guest agent, by the host (private mount namespaces for bind mounts) and by
the namespace driver. Only ctypes and libc: no compiled helper to ship.
"""
import ctypes
import os

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SYS_CAPSET = 126                 # x86_64
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(value):
    return None if value is None else os.fsencode(value)


def mount(source, target, fstype, flags: int = 0, data=None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {source} on {target} ({fstype})")


def umount(target, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


def capset(header, data) -> None:
    """capset(2), which libc does not wrap: ``header`` and ``data`` are its structures."""
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(header), data), "capset")


def clone_tree(path: str, recursive: bool = True) -> int:
    """A detached copy of the mount at ``path`` (and the mounts below it if
    ``recursive``: open_tree(2) with OPEN_TREE_CLONE[|AT_RECURSIVE]), as a file
    descriptor: a bind mount yet to be placed, maybe in another mount namespace
    (move_into)."""
    flags = OPEN_TREE_CLONE | (AT_RECURSIVE if recursive else 0) | os.O_CLOEXEC
    return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, _b(path), flags), f"open_tree {path}")


def move_into(tree_fd: int, target: str) -> None:
    """Attach a detached tree (clone_tree) at ``target`` in this thread's mount namespace."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, _b(target),
                         MOVE_MOUNT_F_EMPTY_PATH), f"move_mount to {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl {option}")


def reboot(cmd: int) -> None:
    _check(_libc.reboot(cmd), "reboot")


def private_mount_namespace() -> None:
    """Move this process into a new mount namespace that sends no mount events.

    Mounts made afterwards exist only here (and in children), and vanish when the last
    process in the namespace exits: nothing can leak onto the host. It is the host's
    slave: what the host mounts or unmounts later reaches it (a later mount under the
    source of a bind mount into a sandbox's share, which the guest then sees).
    """
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)


def die_with_parent(sig: int) -> None:
    """Get ``sig`` when the parent (the thread that forked us) dies."""
    prctl(PR_SET_PDEATHSIG, sig)


def mounts_below(path: str, include_self: bool = False) -> list:
    """Mount points below ``path`` in this mount namespace, deepest first. mountinfo
    escapes space, tab, newline and backslash in paths as octal (\\040...)."""
    prefix = os.path.abspath(path).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if point.startswith(prefix) or (include_self and point == prefix[:-1]):
                    found.append(point)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def unmount_below(path: str) -> None:
    """Detach every mount at or below ``path``, deepest (and last stacked) first."""
    for point in mounts_below(path, include_self=True):
        try:
            umount(point, MNT_DETACH)
        except OSError:
            pass


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
