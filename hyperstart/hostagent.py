"""The hyperstart agent on the host, for the namespace driver.

``python3 -m runv_py.hyperstart.hostagent --control-fd N --stream-fd M --share DIR
--cgroup memory=PATH --cgroup pids=PATH ...`` is started by ``drivers/namespace.py``
already inside new mount, UTS, IPC and network namespaces and with CLONE_NEWPID
unshared, so its first child is PID 1 of a new pid namespace. That child runs the same
``Agent`` as the guest, with ``guest=False``; this process stays outside, waits for it
and kills it (SIGKILL on PID 1 ends every process of the namespace) when told to stop.

This host uses cgroup v1 (hybrid), where the memory, pids and cpu controllers cannot be
attached to a private cgroup2 hierarchy, so ``HostAgent`` keeps the agent's cgroup v2
calls but maps them onto one v1 directory per controller. cgroup v1 has no
``memory.oom.group``: the agent registers an OOM eventfd on the container's memory cgroup
and kills the whole container when the kernel reports an OOM, which is what
``memory.oom.group`` does in the guest (the kernel's own OOM kill of the largest task
still happens first).
"""
import argparse
import base64
import os
import signal
import sys
import time

from . import agent as a
from . import syscalls as sc
from .agent import write_file

V1_LIMITS = {"memory": ("memory", "memory.limit_in_bytes"), "pids": ("pids", "pids.max")}
# cgroup v2 file names the host asks for (READFILE with cgroup) and their v1 homes.
V1_FILES = {"memory.current": ("memory", "memory.usage_in_bytes"),
            "memory.max": ("memory", "memory.limit_in_bytes"),
            "memory.peak": ("memory", "memory.max_usage_in_bytes"),
            "memory.stat": ("memory", "memory.stat"),
            "pids.current": ("pids", "pids.current"), "pids.max": ("pids", "pids.max"),
            "cpu.stat": ("cpu", "cpu.stat")}
# runc's defaults: a container sharing the host's kernel must not reach these through
# its own /proc (in a VM they belong to the guest's kernel, so the guest keeps them).
PROC_READONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
PROC_MASKED = ("acpi", "asound", "kcore", "keys", "latency_stats", "timer_list",
               "timer_stats", "sched_debug", "scsi")
PR_CAPBSET_DROP = 24
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split()


class HostAgent(a.Agent):
    """The agent with host-side set-up: no 9p, no reboot, cgroup v1 controllers."""

    def __init__(self, control_fd: int, stream_fd: int, share_dir: str, cgroups: dict):
        super().__init__(control_fd, stream_fd, guest=False)
        self.share_dir = share_dir
        self.cgroup_parents = cgroups         # controller -> the sandbox's directory
        self.groups = {}                      # container id -> {controller: path}
        self.oom = {}                         # container id -> OOM seen
        self.oom_fds = {}                     # container id -> its OOM eventfd

    def cmd_startpod(self, msg: dict):
        # Our own UTS namespace: the hostname is ours to set. The share is the host path.
        self.hostname = msg.get("hostname") or ""
        if self.hostname:
            sc.sethostname(self.hostname)
        return None

    def cmd_reseed(self, msg: dict):
        return None  # the host's kernel RNG is not ours to reseed

    def make_cgroup(self, cid: str, resources: dict) -> str:
        paths = {c: os.path.join(parent, cid) for c, parent in self.cgroup_parents.items()}
        for path in paths.values():
            os.makedirs(path, exist_ok=True)
        self.groups[cid] = paths
        for key, (controller, name) in V1_LIMITS.items():
            if resources.get(key) and controller in paths:
                write_file(os.path.join(paths[controller], name), str(resources[key]))
        if resources.get("memory") and "memory" in paths:
            memsw = os.path.join(paths["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # no swapping past the limit, as in the guest
                write_file(memsw, str(resources["memory"]))
            self.watch_oom(cid, paths["memory"])
        if resources.get("cpu") and "cpu" in paths:
            quota, period = str(resources["cpu"]).split()
            write_file(os.path.join(paths["cpu"], "cpu.cfs_period_us"), period)
            write_file(os.path.join(paths["cpu"], "cpu.cfs_quota_us"), quota)
        return paths.get("memory") or next(iter(paths.values()))

    def watch_oom(self, cid: str, path: str) -> None:
        """Get told of the container's OOMs, to kill all of it as memory.oom.group would.

        (``oom_kill_disable`` would hold the tasks instead, but then an allocation made
        inside a system call fails with EFAULT rather than waiting.)"""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = os.open(os.path.join(path, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        write_file(os.path.join(path, "cgroup.event_control"), f"{efd} {control}")
        os.close(control)

        def on_oom() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            container = self.containers.get(cid)
            if container is not None:
                self.oom[cid] = True
                self.kill_all(container, signal.SIGKILL)

        self.watch[efd] = on_oom
        self.oom_fds[cid] = efd

    def join_cgroup(self, container: a.Container) -> None:
        for path in self.groups[container.id].values():
            write_file(os.path.join(path, "cgroup.procs"), "0")

    def oom_killed(self, container: a.Container) -> bool:
        return self.oom.get(container.id, False)

    def remove_cgroup(self, container: a.Container) -> None:
        paths = self.groups.pop(container.id, {})
        efd = self.oom_fds.pop(container.id, -1)
        if efd >= 0:
            del self.watch[efd]
            os.close(efd)
        for path in paths.values():
            try:
                os.rmdir(path)
            except OSError:
                pass
        self.oom.pop(container.id, None)

    def mount_one(self, root: str, m: dict) -> None:
        super().mount_one(root, m)
        if m.get("type") == "proc" and m.get("destination", "").rstrip("/") == "/proc":
            protect_proc(a.secure_join(root, "/proc"))

    def child_exec(self, proc: a.Process, init: bool, stdio: tuple, err_w: int, gate_r: int) -> None:
        """Limit the capability bounding set to the process's (or else its container's):
        a container that shares the host's kernel must not keep all of root's powers.
        Set-up before exec still has them; the exec'd program gets only these."""
        try:
            caps = proc.spec.get("capabilities")
            if not caps and proc.container.init is not None:
                caps = proc.container.init.spec.get("capabilities")
            if caps and caps.get("bounding") is not None:
                drop_bounding_set(caps["bounding"])
        except BaseException as e:
            os.write(err_w, f"container set-up failed: capabilities: {e}".encode())
            os._exit(1)
        super().child_exec(proc, init, stdio, err_w, gate_r)

    def cmd_readfile(self, msg: dict) -> dict:
        if msg.get("cgroup"):
            container = self.container(msg)
            controller, name = V1_FILES.get(os.path.basename(msg["file"]), (None, None))
            if controller not in self.groups.get(container.id, {}):
                raise a.AgentError(f"no cgroup file {msg['file']} on this host")
            with open(os.path.join(self.groups[container.id][controller], name), "rb") as f:
                return {"data": base64.b64encode(f.read(1 << 20)).decode()}
        return super().cmd_readfile(msg)


def drop_bounding_set(keep: list) -> None:
    wanted = {n.upper().removeprefix("CAP_") for n in keep}
    unknown = wanted - set(CAPABILITIES)
    if unknown:
        raise a.AgentError(f"unknown capabilities {sorted(unknown)}")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for number, name in enumerate(CAPABILITIES[:last + 1]):
        if name not in wanted:
            sc.prctl(PR_CAPBSET_DROP, number)


def protect_proc(proc: str) -> None:
    """Make the host kernel's knobs in a container's /proc read-only or invisible."""
    for name in PROC_READONLY:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
    for name in PROC_MASKED:
        path = os.path.join(proc, name)
        if os.path.isdir(path):
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY)
        elif os.path.exists(path):
            sc.mount("/dev/null", path, None, sc.MS_BIND)


def become_namespace_init() -> None:
    """In PID 1 of the new pid namespace: a /proc that shows it, no mount events back."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the launcher


def remove_cgroups(cgroups: dict, timeout: float = 5.0) -> None:
    """Leave the sandbox's cgroups and remove them with what the agent left in them.

    Done here, not only by the driver, so that a runtime killed with SIGKILL (this
    process then gets SIGTERM as its parent-death signal) leaks no cgroup either."""
    for path in cgroups.values():
        try:
            write_file(os.path.join(os.path.dirname(path), "cgroup.procs"), "0")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    for path in cgroups.values():
        while os.path.isdir(path):
            try:
                for root, dirs, _ in os.walk(path, topdown=False):
                    for d in dirs:
                        os.rmdir(os.path.join(root, d))
                os.rmdir(path)
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    a.log(f"cannot remove cgroup {path}")
                    break
                time.sleep(0.02)  # the killed tasks are still exiting


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
    args = parser.parse_args(argv)
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
        a.log(f"fatal: cannot set up the sandbox's cgroups: {e}")
        remove_cgroups(cgroups)
        return 1
    child = os.fork()
    if child == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])  # containers inherit the mask
            become_namespace_init()
            HostAgent(args.control_fd, args.stream_fd, args.share, agent_cgroups).run()
            os._exit(0)
        except BaseException as e:
            a.log(f"fatal: {type(e).__name__}: {e}")
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
