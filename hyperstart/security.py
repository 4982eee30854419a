"""What confines a container process, applied in its child before exec in runc's order:
oom_score_adj, no_new_privs, the capability bounding set, the user (groups, gid, uid,
keeping capabilities across the switch), then the effective, permitted, inheritable and
ambient sets and the umask. Namespaced sysctls and the domain name are set here too.

In a VM this is what protects the agent (guest PID 1) from its containers and the
containers of a pod from each other: they share the guest kernel.
"""
import ctypes
import errno
import os

from . import syscalls as sc
from .errors import InvalidArgument

CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split()
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_VERSION_3 = 0x20080522

# Sysctls that belong to a namespace the container has of its own (runc's list).
NAMESPACED_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                      "kernel.shmall", "kernel.shmmax", "kernel.shmmni",
                      "kernel.shm_rmid_forced")
NAMESPACED_PREFIXES = ("fs.mqueue.", "net.")


_known: dict = {}  # name -> number, for the capabilities this kernel has (read once)


def known_capabilities() -> dict:
    if not _known:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except (OSError, ValueError):
            last = len(CAPABILITIES) - 1
        _known.update((name, i) for i, name in enumerate(CAPABILITIES[:last + 1]))
    return _known


def cap_numbers(names) -> set:
    """Capability numbers of ``names`` (CAP_X or X); unknown ones are left out, as runc
    leaves out capabilities this kernel does not have."""
    known = known_capabilities()
    return {known[n.upper().removeprefix("CAP_")] for n in names or []
            if n.upper().removeprefix("CAP_") in known}


def drop_bounding_set(keep) -> None:
    wanted = cap_numbers(keep)
    for number in range(len(known_capabilities())):
        if number not in wanted:
            sc.prctl(PR_CAPBSET_DROP, number)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: set, permitted: set, inheritable: set) -> None:
    data = (_Data * 2)()
    for field, caps in (("effective", effective), ("permitted", permitted),
                        ("inheritable", inheritable)):
        for cap in caps:
            word = data[cap // 32]
            setattr(word, field, getattr(word, field) | (1 << (cap % 32)))
    sc.capset(_Header(CAP_VERSION_3, 0), data)


def switch_user(user, caps) -> None:
    """Become ``user`` (a messages.User); with ``caps`` (messages.Capabilities, or None
    to keep root's), set the bounding set before and the other sets after the switch."""
    if caps is not None:
        drop_bounding_set(caps.bounding)
        sc.prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups(list(user.additional_gids))
    os.setgid(user.gid)
    os.setuid(user.uid)
    if caps is not None:
        sc.prctl(PR_SET_KEEPCAPS, 0)
        capset(cap_numbers(caps.effective), cap_numbers(caps.permitted),
               cap_numbers(caps.inheritable))
        for cap in sorted(cap_numbers(caps.ambient)):
            try:
                sc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
            except PermissionError:
                pass  # not in the inheritable set: the kernel refuses it, runc ignores it
    if user.umask is not None:
        os.umask(user.umask)


def set_oom_score_adj(value: int) -> None:
    """Write the process's oom_score_adj; where lowering it is refused (some hosts), keep
    the current value rather than fail, as CRI's restrict_oom_score_adj does."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise


def check_sysctl(key: str) -> None:
    if key not in NAMESPACED_SYSCTLS and not key.startswith(NAMESPACED_PREFIXES):
        raise InvalidArgument(f"sysctl {key!r} is not in a separate kernel namespace")


def set_sysctls(sysctls: dict) -> None:
    """In the container's namespaces, with its /proc mounted."""
    for key, value in sysctls.items():
        check_sysctl(key)
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))
        except OSError as e:
            raise InvalidArgument(f"sysctl {key}={value}: {e.strerror}") from None
