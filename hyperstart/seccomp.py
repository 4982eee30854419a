"""An OCI seccomp profile (``linux.seccomp``) compiled and loaded with libseccomp.

libseccomp (Debian's libseccomp2, shipped in the initrd) does the BPF; this module only
translates the profile through ctypes, as runc does through libseccomp-golang: every
action with its errno, argument comparisons (several comparisons of one argument become
one rule each, which libseccomp cannot AND), extra architectures and filter flags.
Syscall names libseccomp does not know are skipped, and a rule whose action is the
default action is left out, as runc does.
"""
import ctypes

from .errors import InvalidArgument

ACT_KILL_THREAD = 0x00000000
ACT_KILL_PROCESS = 0x80000000
ACT_TRAP = 0x00030000
ACT_ERRNO = 0x00050000
ACT_TRACE = 0x7FF00000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000
ACTIONS = {"SCMP_ACT_KILL": ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": ACT_KILL_THREAD,
           "SCMP_ACT_KILL_PROCESS": ACT_KILL_PROCESS, "SCMP_ACT_TRAP": ACT_TRAP,
           "SCMP_ACT_ERRNO": ACT_ERRNO, "SCMP_ACT_TRACE": ACT_TRACE, "SCMP_ACT_LOG": ACT_LOG,
           "SCMP_ACT_ALLOW": ACT_ALLOW}
COMPARE = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
           "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
# scmp_filter_attr
ATTR_CTL_NNP = 3
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 4, "SECCOMP_FILTER_FLAG_LOG": 6,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 7}
EPERM = 1


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_LIB = None


def preload() -> None:
    """Load libseccomp in the agent, before a container process forks: in the child,
    after it has moved into the container's root, the library is not there to load."""
    _library()


def _library():
    global _LIB
    if _LIB is not None:
        return _LIB
    _LIB = lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return lib


def action(name: str, errno_ret=None) -> int:
    """The libseccomp action of an OCI action name (ERRNO and TRACE carry an errno)."""
    if name not in ACTIONS:
        raise InvalidArgument(f"seccomp: unsupported action {name!r}")
    value = ACTIONS[name]
    if value in (ACT_ERRNO, ACT_TRACE):
        value |= (EPERM if errno_ret is None else int(errno_ret)) & 0xFFFF
    return value


def conditions(args: list) -> list:
    """The OCI ``args`` of a rule as lists of comparisons, one list per rule to add."""
    cmps = []
    for a in args or []:
        op = COMPARE.get(a.get("op", ""))
        if op is None:
            raise InvalidArgument(f"seccomp: unsupported comparison {a.get('op')!r}")
        cmps.append(ArgCmp(int(a.get("index", 0)), op, int(a.get("value", 0)),
                           int(a.get("valueTwo", 0))))
    indexes = [c.arg for c in cmps]
    if len(set(indexes)) != len(indexes):
        return [[c] for c in cmps]  # one argument compared twice: one rule each
    return [cmps]


def build(profile: dict) -> int:
    """Compile ``profile`` (OCI linux.seccomp) into a libseccomp filter context, to
    ``install`` later. The context is never released: the process that builds it
    installs it and execs (or exits), which frees it."""
    lib = _library()
    default = action(profile.get("defaultAction", ""), profile.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise InvalidArgument("seccomp: cannot create a filter for the default action")
    try:
        _check(lib.seccomp_attr_set(ctx, ATTR_CTL_NNP, 0), "no_new_privs attribute")
        for flag in profile.get("flags") or []:
            if flag not in FLAGS:
                raise InvalidArgument(f"seccomp: unsupported flag {flag!r}")
            _check(lib.seccomp_attr_set(ctx, FLAGS[flag], 1), flag)
        for arch in profile.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            if not token:
                raise InvalidArgument(f"seccomp: unknown architecture {arch!r}")
            result = lib.seccomp_arch_add(ctx, token)
            if result not in (0, -17):  # -EEXIST: the native one is there already
                _check(result, f"architecture {arch}")
        for rule in profile.get("syscalls") or []:
            act = action(rule.get("action", ""), rule.get("errnoRet"))
            if act == default:
                continue
            for name in rule.get("names") or []:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == -1:
                    continue  # not a syscall of this kernel's architectures
                for cmps in conditions(rule.get("args")):
                    array = (ArgCmp * len(cmps))(*cmps)
                    _check(lib.seccomp_rule_add_array(ctx, act, nr, len(cmps), array),
                           f"rule for {name}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


def install(ctx: int) -> None:
    """Load a filter from ``build`` into this process."""
    _check(_library().seccomp_load(ctx), "loading the filter")


def _check(result: int, what: str) -> None:
    if result < 0:
        import os
        raise InvalidArgument(f"seccomp: {what}: {os.strerror(-result)}")


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def library_version() -> str:
    """libseccomp's version ('' if it is not installed)."""
    try:
        lib = _library()
    except OSError:
        return ""
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"
