"""What the per-sandbox shim keeps: only the capabilities its work needs, and
no_new_privs, set before it starts any thread (capabilities are per thread, and new
threads and children inherit them).

It needs: mounts and namespaces (SYS_ADMIN, SYS_CHROOT), taps and tc filters
(NET_ADMIN, NET_RAW), cgroups, state files and signals to QEMU's user (DAC_OVERRIDE,
DAC_READ_SEARCH, FOWNER, CHOWN, KILL, SYS_PTRACE to read /proc of QEMU), pinning QEMU's
vCPU threads (SYS_NICE), the jail's tools (SETUID, SETGID, SETPCAP, SYS_RESOURCE), and
what it hands on to the share's server (its capabilities: host/jail.py). Everything
else goes: loading modules, raw I/O, the clock, reboot, BPF, perf, audit, MAC policy.
"""
from ..hyperstart import security, syscalls
from ..drivers import jail

SHIM_CAPS = {"SYS_ADMIN", "SYS_CHROOT", "NET_ADMIN", "NET_RAW", "DAC_OVERRIDE",
             "DAC_READ_SEARCH", "FOWNER", "CHOWN", "KILL", "SYS_PTRACE", "SETUID", "SETGID",
             "SETPCAP", "SYS_RESOURCE", "SYS_NICE",
             *(c.upper() for c in jail.SHARE_SERVER_CAPS)}


def confine_shim() -> None:
    """Drop every other capability (bounding, effective, permitted, inheritable sets)
    and set no_new_privs, in the calling thread: call it before any thread starts."""
    security.drop_bounding_set(SHIM_CAPS)
    keep = security.cap_numbers(SHIM_CAPS) & permitted()  # a capset may only shrink
    security.capset(keep, keep, set())
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def permitted() -> set:
    """This thread's permitted capabilities (root in a container may lack some)."""
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                value = int(line.split()[1], 16)
                return {bit for bit in range(64) if value >> bit & 1}
    return set()
