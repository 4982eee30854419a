"""What the agent does for each command of the host (one handler per message class).

Containers and processes follow the state machines of states.py: a container is
``created`` while its init waits at its start gate, ``running`` once started, ``stopped``
when its init has exited; commands that need another state fail with StateError (code
FAILED_PRECONDITION), unknown ids with NotFound, taken ids with AlreadyExists.
"""
import binascii
import os
import time

import _signal as signal

from . import messages as m
from . import protocol as p
from . import restored, rootfs, states
from . import syscalls as sc
from .errors import AlreadyExists, InvalidArgument, NotFound
from .model import Container, Process
from .rootfs import secure_join
from . import network
from .spawn import Spawner, make_stdio, set_winsize

# Where checkpointable containers' files live in guest memory, a tmpfs each.
GUEST_ROOTS = "/run/runv/rootfs"


class Commands:
    def __init__(self, agent, platform):
        self.agent = agent
        self.platform = platform
        self.cgroups = platform.cgroups
        self.cgroups.on_oom = self.on_oom
        self.spawner = Spawner(platform)
        self.containers = {}
        self.handlers = {
            p.GETVERSION: self.version, p.PING: self.ping, p.STARTPOD: self.start_pod,
            p.DESTROYPOD: self.destroy_pod, p.NEWCONTAINER: self.new_container,
            p.STARTCONTAINER: self.start_container, p.EXECCMD: self.exec,
            p.KILLCONTAINER: self.kill_container, p.SIGNALPROCESS: self.signal_process,
            p.REMOVECONTAINER: self.remove_container, p.WINSIZE: self.winsize,
            p.WRITEFILE: self.write_file, p.READFILE: self.read_file,
            p.PROCESSLIST: self.process_list, p.RESEED: self.reseed,
            p.STREAMCLOSED: self.stream_closed,
            p.SETUPINTERFACE: self.setup_interface, p.SETUPROUTE: self.setup_route,
            p.ONLINECPUMEM: self.online_cpu_mem, p.FORWARDPORT: self.forward_port,
            p.RELEASESHARE: self.release_share, p.RESETNETWORK: self.reset_network,
            p.RENAMECONTAINER: self.rename_container, p.WARMUP: self.warm_up,
        }

    def container(self, cid: str) -> Container:
        container = self.containers.get(cid)
        if container is None:
            raise NotFound(f"no such container {cid!r}")
        return container

    # ---- the sandbox ----------------------------------------------------------------

    def version(self, msg: m.GetVersion) -> m.VersionReply:
        return m.VersionReply(version=p.VERSION)

    def ping(self, msg: m.Ping) -> None:
        return None

    def start_pod(self, msg: m.StartPod) -> None:
        if msg.hostname:
            self.platform.set_hostname(msg.hostname)
        if msg.share_tag:
            self.platform.mount_share(msg.share_tag, msg.share_kind)
        return None

    def destroy_pod(self, msg: m.DestroyPod) -> None:
        for container in list(self.containers.values()):
            self.kill_all(container, signal.SIGKILL)
        self.agent.running = False  # the loop ends after this ACK is sent
        return None

    def reseed(self, msg: m.Reseed) -> None:
        """A VM cloned from a template must not share its random state or name with its
        siblings: fresh entropy from the host, and its own hostname; and the host's time,
        which its clock lost while it waited stopped."""
        if msg.time_ns:
            self.platform.set_time(msg.time_ns)
        self.platform.reseed(binascii.a2b_base64(msg.data))
        if msg.hostname:
            self.platform.set_hostname(msg.hostname)
        return None

    def setup_interface(self, msg: m.SetupInterface) -> None:
        self.platform.setup_interface(msg)
        return None

    def setup_route(self, msg: m.SetupRoute) -> None:
        self.platform.setup_routes(msg)
        return None

    # ---- containers -----------------------------------------------------------------

    def new_container(self, msg: m.NewContainer) -> m.PidReply:
        cid = check_id(msg.id)
        if cid in self.containers:
            raise AlreadyExists(f"container {cid!r} already exists")
        self.platform.remount_share()  # released for a checkpoint the VM outlived
        root = msg.rootfs if msg.rootfs.startswith("/") else \
            os.path.join(self.platform.share_dir, msg.rootfs)
        if not os.path.isdir(root):
            raise NotFound(f"rootfs {root} is not a directory")
        shared = {kind: self.running_init(other, kind) for kind, other in msg.share.items()}
        if msg.rootfs_in_guest:
            root = self.copy_in(msg, root)
        container = Container(msg, root)
        if any(mnt.volume for mnt in msg.mounts):
            self.platform.mount_volumes()
        proc = Process(container, msg.process)
        try:
            self.cgroups.create(cid, msg.limits, msg.device_rules)
            try:
                self.spawner.spawn(proc, init=True, wait=msg.wait, shared=shared)
            except Exception:
                self.cgroups.remove(cid)
                raise
        except Exception:
            self.drop_copy(container)
            raise
        container.init = proc
        container.processes[proc.id] = proc
        self.containers[cid] = container
        self.agent.track(proc)
        if not msg.wait:
            container.state.to(states.RUNNING, "start")
            proc.state.to(states.RUNNING, "start")
        return m.PidReply(pid=proc.pid)

    def copy_in(self, msg: m.NewContainer, root: str) -> str:
        """A checkpointable container: its files copied into guest memory (rootfs.py)."""
        if not self.platform.copies_rootfs:
            raise InvalidArgument("only a VM's guest can hold a container's rootfs in memory")
        base = os.path.join(GUEST_ROOTS, msg.id)
        try:
            root, msg.mounts = rootfs.copy_into_guest(base, root, msg.mounts,
                                                      self.platform.share_dir)
        except BaseException:
            self.drop_copy_at(base)
            raise
        return root

    def drop_copy(self, container: Container) -> None:
        if container.request.rootfs_in_guest:
            self.drop_copy_at(os.path.join(GUEST_ROOTS, container.request.id))

    @staticmethod
    def drop_copy_at(base: str) -> None:
        if os.path.ismount(base):
            sc.umount(base, sc.MNT_DETACH)
        try:
            os.rmdir(base)
        except OSError:
            pass

    def release_share(self, msg: m.ReleaseShare) -> None:
        self.platform.release_share()
        return None

    def warm_up(self, msg: m.WarmUp) -> None:
        self.platform.warm_up()
        return None

    def reset_network(self, msg: m.ResetNetwork) -> None:
        self.platform.reset_network()
        return None

    def rename_container(self, msg: m.RenameContainer) -> None:
        container = self.container(msg.container)
        check_id(msg.new_id)
        if msg.new_id in self.containers and msg.new_id != container.id:
            raise AlreadyExists(f"container {msg.new_id!r} already exists")
        if container.init is not None and not container.init.exited:
            if msg.hostname:
                restored.set_hostname(container.init.pid, msg.hostname)
            if msg.boot_id:
                restored.give_boot_id(container.init.pid, msg.boot_id)
        if msg.new_id != container.id:
            self.containers[msg.new_id] = self.containers.pop(container.id)
            self.cgroups.rename(container.id, msg.new_id)
            container.id = msg.new_id   # its copy's directory keeps the request's id
        return None

    def running_init(self, cid: str, kind: str) -> int:
        """The pid of ``cid``'s init, whose ``kind`` namespace a new container joins."""
        if kind not in ("ipc", "uts", "pid"):
            raise InvalidArgument(f"cannot share a {kind!r} namespace")
        init = self.container(cid).init
        if init is None or init.exited:
            raise states.StateError(f"container {cid}", f"share the {kind} namespace of",
                                    states.STOPPED, (states.CREATED, states.RUNNING))
        return init.pid

    def online_cpu_mem(self, msg: m.OnlineCpuMem) -> None:
        self.platform.online_cpu_mem(msg.cpus, msg.memory_mib)
        return None

    def start_container(self, msg: m.StartContainer) -> None:
        container = self.container(msg.container)
        container.state.require("start", states.CREATED)
        init = container.init
        os.write(init.start_gate, b"s")
        os.close(init.start_gate)
        init.start_gate = -1
        container.state.to(states.RUNNING, "start")
        if not init.exited:
            init.state.to(states.RUNNING, "start")
        return None

    def exec(self, msg: m.ExecCmd) -> m.PidReply:
        container = self.container(msg.container)
        container.state.require("exec in", states.CREATED, states.RUNNING)
        spec = msg.process
        if not spec.id:
            raise InvalidArgument("the process needs an id")
        if spec.id in container.processes:
            raise AlreadyExists(f"process {spec.id!r} already exists in {container.id}")
        proc = Process(container, spec)
        self.spawner.spawn(proc, init=False)
        container.processes[spec.id] = proc
        proc.state.to(states.RUNNING, "start")
        self.agent.track(proc)
        return m.PidReply(pid=proc.pid)

    def forward_port(self, msg: m.ForwardPort) -> m.PidReply:
        """kubectl port-forward: busybox's nc, as nobody in the agent's namespaces (the
        pod's network), joins stream ``msg.stdio`` to the guest's 127.0.0.1:port."""
        container = self.container(msg.container)
        container.state.require("forward a port of", states.RUNNING)
        if not 0 < msg.port < 65536:
            raise InvalidArgument(f"no such port: {msg.port}")
        if not msg.id or not msg.stdio or msg.id in container.processes:
            raise InvalidArgument("a forwarded connection needs a new id and a stream")
        proc = Process(container, m.ProcessSpec(id=msg.id, args=[], stdio=msg.stdio))
        proc.forwarder = True
        proc.pid = network.forward(make_stdio(proc), msg.port)
        container.processes[msg.id] = proc
        proc.state.to(states.RUNNING, "start")
        self.agent.track(proc)
        return m.PidReply(pid=proc.pid)

    def on_exit(self, proc: Process) -> None:
        """A process was reaped; its container stops with its init."""
        if proc.forwarder:  # one per connection: forgotten, or a long pod would hoard them
            proc.container.processes.pop(proc.id, None)
        if proc is proc.container.init:
            proc.container.state.stop()

    def kill_container(self, msg: m.KillContainer) -> None:
        container = self.container(msg.container)
        if msg.all:
            self.kill_all(container, msg.signal)
        elif not container.init.exited:
            os.kill(container.init.pid, msg.signal)
        return None

    def signal_process(self, msg: m.SignalProcess) -> None:
        proc = self.container(msg.container).process(msg.process)
        if not proc.exited:
            os.kill(proc.pid, msg.signal)
        return None

    def remove_container(self, msg: m.RemoveContainer) -> None:
        container = self.container(msg.container)
        self.kill_all(container, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.cgroups.pids(container.id) and time.monotonic() < deadline:
            time.sleep(0.01)
            self.agent.reap()
        for proc in container.processes.values():
            if proc.start_gate >= 0:
                os.close(proc.start_gate)
                proc.start_gate = -1
            self.agent.untrack(proc)
        self.cgroups.remove(container.id)
        self.drop_copy(container)
        del self.containers[container.id]
        return None

    def kill_all(self, container: Container, sig: int) -> None:
        for pid in self.cgroups.pids(container.id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def on_oom(self, cid: str) -> None:
        container = self.containers.get(cid)
        if container is not None:
            self.kill_all(container, signal.SIGKILL)

    # ---- streams and terminals --------------------------------------------------------

    def stream_closed(self, msg: m.StreamClosed) -> None:
        """The host's reader of stream ``seq`` went away: close the process's end too, so
        that it gets EPIPE (or SIGPIPE) as it would writing to a closed pipe on the host."""
        self.agent.close_stream(msg.seq)
        return None

    def winsize(self, msg: m.WinSize) -> None:
        proc = self.agent.by_seq.get(msg.seq)
        if proc is None or proc.pty_master < 0:
            raise NotFound(f"no terminal on stream {msg.seq}")
        set_winsize(proc.pty_master, msg.row, msg.column)
        return None

    # ---- files and processes ----------------------------------------------------------

    def write_file(self, msg: m.WriteFile) -> None:
        container = self.container(msg.container)
        data = binascii.a2b_base64(msg.data)
        if msg.cgroup:
            self.cgroups.write(container.id, msg.file, data.decode())
        else:
            with open(secure_join(container.root_path(), msg.file), "wb") as f:
                f.write(data)
        return None

    def read_file(self, msg: m.ReadFile) -> m.FileData:
        container = self.container(msg.container)
        if msg.cgroup:
            data = self.cgroups.read(container.id, msg.file)
        else:
            with open(secure_join(container.root_path(), msg.file), "rb") as f:
                data = f.read(1 << 20)
        return m.FileData(data=binascii.b2a_base64(data, newline=False).decode())

    def process_list(self, msg: m.ProcessList) -> m.ProcessListReply:
        container = self.container(msg.container)
        rows = []
        for pid in self.cgroups.pids(container.id):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            rows.append(m.ProcessInfo(
                pid=pid, ppid=int(fields[1]), state=fields[0],
                uid=int(status.get("Uid", "0").split()[0]),
                rss_kb=int(status.get("VmRSS", "0 kB").split()[0]),
                cmd=cmd or stat[stat.find("(") + 1:stat.rfind(")")],
                nspid=int(status.get("NSpid", str(pid)).split()[-1])))
        return m.ProcessListReply(processes=rows)


def check_id(cid: str) -> str:
    """A container id that names one directory (its cgroup's, its copy's)."""
    if not cid or "/" in cid or cid in (".", ".."):
        raise InvalidArgument(f"bad container id {cid!r}")
    return cid
