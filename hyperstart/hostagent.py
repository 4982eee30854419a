"""The hyperstart agent on the host, for the namespace driver.

``python3 -m runv_py.hyperstart.hostagent --control-fd N --stream-fd M --share DIR
--cgroup memory=PATH --cgroup pids=PATH --parent PID [--netns-fd N] ...`` is started by
``drivers/namespace.py`` with SIGTERM blocked; it enters new mount, UTS, IPC and network
namespaces (or the pod's network namespace) and unshares CLONE_NEWPID itself, before
anything else, so its first child is PID 1 of a new pid namespace. That child runs the same
``Agent`` as the guest, on a ``HostPlatform``; this process stays outside, waits for it
and kills it (SIGKILL on PID 1 ends every process of the namespace) when told to stop.

This host uses cgroup v1 (hybrid), where the memory, pids and cpu controllers cannot be
attached to a private cgroup2 hierarchy: the platform's ``HostCgroups`` (cgroups.py) map
the agent's cgroup v2 requests onto one v1 directory per controller.
"""
import argparse
import os
import signal
import sys

from . import syscalls as sc
from .agent import Agent, log
from .cgroups import HostCgroups, remove_tree, write_file
from .errors import FailedPrecondition

# runc's defaults: a container sharing the host's kernel must not reach these through
# its own /proc (in a VM they belong to the guest's kernel, so the guest keeps them).
PROC_READONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
PROC_MASKED = ("acpi", "asound", "kcore", "keys", "latency_stats", "timer_list",
               "timer_stats", "sched_debug", "scsi")

class HostPlatform:
    """The host's kernel, shared with everything else: cgroup v1, no 9p (the share is
    the host directory itself), no RNG or power of its own, and containers kept away
    from the host kernel's knobs in /proc (runc's masks, whatever the spec says)."""

    cgroup_namespace = False
    guest_devices = False  # the spec's devices are this kernel's already
    # Masked and read-only whatever the spec says (rootfs.protect_paths).
    masked_paths = tuple("/proc/" + name for name in PROC_MASKED)
    readonly_paths = tuple("/proc/" + name for name in PROC_READONLY)

    def __init__(self, share_dir: str, cgroups: dict):
        self.cgroups = HostCgroups(cgroups)
        self.share_dir = share_dir
        self.volumes_dir = os.path.join(share_dir, "volumes")

    def set_hostname(self, name: str) -> None:
        sc.sethostname(name)  # our own UTS namespace

    copies_rootfs = False     # no guest memory to hold files, no VM to checkpoint

    def mount_share(self, tag: str, kind: str = "") -> None:
        pass

    def remount_share(self) -> None:
        pass

    def release_share(self) -> None:
        raise FailedPrecondition("a namespace sandbox cannot be checkpointed")

    def mount_volumes(self) -> None:
        pass  # binds straight from the share: propagation within each container only

    def reseed(self, data: bytes) -> None:
        pass  # the host's kernel RNG is not ours to reseed

    def set_time(self, time_ns: int) -> None:
        pass  # the host's clock is the host's

    def warm_up(self) -> None:
        pass  # no translation cache to warm: the host runs its code natively

    def online_cpu_mem(self, cpus: int, memory_mib: int) -> None:
        pass  # the host's CPUs and memory: the sandbox's cgroups cap them

    def setup_interface(self, msg) -> None:
        raise FailedPrecondition("the host agent is in the pod's network namespace already")

    setup_routes = reset_network = setup_interface



def become_namespace_init() -> None:
    """In PID 1 of the new pid namespace: a /proc that shows it, no mount events back."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    sc.die_with_parent(signal.SIGKILL)  # never outlive the launcher


def enter_namespaces(parent: int, netns_fd: int) -> None:
    """What no Python may do between fork and exec in the driver's threaded process:
    die with the launcher, join the pod's network namespace (or make one) and make new
    mount, UTS, IPC and pid namespaces. Single-threaded here, so unshare may."""
    sc.die_with_parent(signal.SIGTERM)
    if parent and os.getppid() != parent:
        sys.exit(1)  # the launcher died before the parent-death signal was set
    if netns_fd >= 0:
        sc.setns(netns_fd, sc.CLONE_NEWNET)
        os.close(netns_fd)
    sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID
               | (0 if netns_fd >= 0 else sc.CLONE_NEWNET))


def remove_cgroups(cgroups: dict) -> None:
    """Leave the sandbox's cgroups and remove them with what the agent left in them.

    Done here, not only by the driver, so that a runtime killed with SIGKILL (this
    process then gets SIGTERM as its parent-death signal) leaks no cgroup either."""
    for path in cgroups.values():
        try:
            write_file(os.path.join(os.path.dirname(path), "cgroup.procs"), "0")
        except OSError:
            pass
    for path in cgroups.values():
        if not remove_tree(path):
            log(f"cannot remove cgroup {path}")


def make_cgroups(cgroups: dict, memory_bytes: int, cpus: int) -> None:
    """Create the sandbox's cgroups, capped like the VM it stands in for, and join them."""
    for path in cgroups.values():
        os.makedirs(path, exist_ok=True)
    if memory_bytes and "memory" in cgroups:
        write_file(os.path.join(cgroups["memory"], "memory.limit_in_bytes"), str(memory_bytes))
    if cpus and "cpu" in cgroups:
        write_file(os.path.join(cgroups["cpu"], "cpu.cfs_quota_us"), str(cpus * 100000))
    for path in cgroups.values():
        write_file(os.path.join(path, "cgroup.procs"), "0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="runv_py.hyperstart.hostagent")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--stream-fd", type=int, required=True)
    parser.add_argument("--share", required=True)
    parser.add_argument("--cgroup", action="append", default=[], help="CONTROLLER=DIR")
    parser.add_argument("--memory", type=int, default=0, help="sandbox memory limit, bytes")
    parser.add_argument("--cpus", type=int, default=0, help="sandbox CPU quota, in CPUs")
    parser.add_argument("--name", default="", help="only for ps: which sandbox this is")
    parser.add_argument("--parent", type=int, default=0, help="the launcher: end without it")
    parser.add_argument("--netns-fd", type=int, default=-1, help="the pod's network namespace")
    args = parser.parse_args(argv)
    enter_namespaces(args.parent, args.netns_fd)
    cgroups = dict(item.split("=", 1) for item in args.cgroup)
    agent_cgroups = {c: p for c, p in cgroups.items() if c != "freezer"}
    # The driver starts us with SIGTERM blocked (it is also our parent-death signal): one
    # that came early waits until the handler below can kill the agent and clean up.
    state = {"child": 0, "stop": False}

    def stop(*_):
        state["stop"] = True
        if state["child"]:
            try:
                os.kill(state["child"], signal.SIGKILL)  # PID 1 ignores other signals
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        make_cgroups(cgroups, args.memory, args.cpus)
    except OSError as e:
        log(f"fatal: cannot set up the sandbox's cgroups: {e}")
        remove_cgroups(cgroups)
        return 1
    child = os.fork()
    if child == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])  # containers inherit the mask
            become_namespace_init()
            Agent(args.control_fd, args.stream_fd, HostPlatform(args.share, agent_cgroups)).run()
            os._exit(0)
        except BaseException as e:
            log(f"fatal: {type(e).__name__}: {e}")
            os._exit(1)
    state["child"] = child
    os.close(args.control_fd)
    os.close(args.stream_fd)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT])
    if state["stop"]:
        stop()
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    remove_cgroups(cgroups)
    return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
