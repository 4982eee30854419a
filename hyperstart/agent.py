"""The hyperstart agent: PID 1 of the guest, running container processes for the host.

One single-threaded poll loop serves the control channel (commands in, ACK/ERROR and
exit events out), the stream channel (stdin in, stdout/stderr out) and every process's
pipes. Nothing blocks on the host: channel writes are non-blocking and buffered, and while
the stream buffer is over its high-water mark the agent stops reading process output, so
a flooding process is slowed down instead of filling memory or stalling commands.

The same agent runs on the host under the namespace driver, with ``guest=False``: it
then skips the guest-only set-up (mounting /proc, rebooting the machine).
"""
import binascii
import errno
import fcntl
import os
import resource
import select
import struct
import sys
import time
import warnings  # noqa: F401  os.execvpe imports it, after the chroot where it cannot

# The C modules behind signal and socket: their Python wrappers import enum, which
# costs a tenth of a second of guest boot under TCG.
import _signal as signal
import _socket as socket

from . import protocol as p
from . import syscalls as sc

SHARE_DIR = "/run/runv/share"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "runv"
# Stop reading process output while this much is waiting for the stream channel.
STREAM_HIGH_WATER = 1024 * 1024
# How long an exited process's pipes may stay open (held by its own children) before the
# agent closes them and reports the exit anyway.
DRAIN_GRACE = 2.0

PTY_MARKER = -2   # in a child's stdio tuple: "open a pty in the container"
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}

MOUNT_FLAGS = {
    "ro": (sc.MS_RDONLY, True), "rw": (sc.MS_RDONLY, False),
    "nosuid": (sc.MS_NOSUID, True), "suid": (sc.MS_NOSUID, False),
    "nodev": (sc.MS_NODEV, True), "dev": (sc.MS_NODEV, False),
    "noexec": (sc.MS_NOEXEC, True), "exec": (sc.MS_NOEXEC, False),
    "sync": (sc.MS_SYNCHRONOUS, True), "async": (sc.MS_SYNCHRONOUS, False),
    "noatime": (sc.MS_NOATIME, True), "nodiratime": (sc.MS_NODIRATIME, True),
    "relatime": (sc.MS_RELATIME, True), "strictatime": (sc.MS_STRICTATIME, True),
    "bind": (sc.MS_BIND, True), "rbind": (sc.MS_BIND | sc.MS_REC, True),
    "private": (0, True), "rprivate": (0, True), "slave": (0, True), "rslave": (0, True),
    "shared": (0, True), "rshared": (0, True),
}

DEFAULT_DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                   ("urandom", 1, 9), ("tty", 5, 0)]


class AgentError(Exception):
    """A command that cannot be carried out; its text goes back in an ERROR frame."""


def log(*args) -> None:
    print("hyperstart:", *args, file=sys.stderr, flush=True)


def write_file(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def mount_options(options) -> tuple:
    """Split OCI mount options into mount(2) flags and the filesystem data string."""
    flags, data = 0, []
    for opt in options or []:
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
    raise AgentError(f"too many symlinks in {path}")


class Process:
    """A process the host asked for: its pipes, sequence numbers and exit status."""

    def __init__(self, container: "Container", pid_id: str, spec: dict):
        self.container = container
        self.id = pid_id
        self.spec = spec
        self.terminal = bool(spec.get("terminal"))
        self.seq_out = spec.get("stdio") or 0
        self.seq_err = spec.get("stderr") or 0
        self.pid = 0
        self.stdin_fd = -1        # pipe write end, or the pty master
        self.pty_master = -1
        self.out_fds = {}         # fd -> sequence number of its stream
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.status = None
        self.exited_at = 0.0
        self.eof_position = 0     # stream bytes that must be sent before the exit event
        self.start_gate = -1      # write end that releases a created-but-not-started init
        self.pty_channel = None   # socket on which the process sends its pty master


class Container:
    def __init__(self, cid: str, spec: dict):
        self.id = cid
        self.spec = spec
        self.processes = {}       # process id -> Process
        self.init = None
        self.cgroup = ""
        self.root = ""


class Agent:
    def __init__(self, control_fd: int, stream_fd: int, guest: bool = True):
        self.guest = guest
        self.ctl = control_fd
        self.stream = stream_fd
        for fd in (control_fd, stream_fd):
            os.set_blocking(fd, False)
        self.ctl_reader = p.FrameReader(p.CONTROL_HEADER)
        self.stream_reader = p.FrameReader(p.STREAM_HEADER)
        self.ctl_out = bytearray()
        self.stream_out = bytearray()
        self.stream_queued = 0    # total bytes ever queued on the stream channel
        self.stream_sent = 0      # total bytes ever written to it
        self.containers = {}
        self.by_pid = {}          # host-visible pid -> Process
        self.by_seq = {}          # stdin sequence -> Process
        self.fd_owner = {}        # output fd -> Process
        self.share_mounted = False
        self.share_dir = SHARE_DIR  # the namespace driver points this at the host's share
        self.watch = {}           # extra fd -> callback (the namespace driver's OOM events)
        self.hostname = ""
        self.running = True
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.handlers = {
            p.GETVERSION: self.cmd_version, p.PING: self.cmd_ping,
            p.STARTPOD: self.cmd_startpod, p.DESTROYPOD: self.cmd_destroypod,
            p.NEWCONTAINER: self.cmd_newcontainer, p.EXECCMD: self.cmd_exec,
            p.KILLCONTAINER: self.cmd_killcontainer, p.SIGNALPROCESS: self.cmd_signal,
            p.REMOVECONTAINER: self.cmd_removecontainer, p.WINSIZE: self.cmd_winsize,
            p.WRITEFILE: self.cmd_writefile, p.READFILE: self.cmd_readfile,
            p.PROCESSLIST: self.cmd_processlist, p.RESEED: self.cmd_reseed,
            p.STARTCONTAINER: self.cmd_startcontainer,
            p.STREAMCLOSED: self.cmd_streamclosed,
        }

    # ---- channel output -------------------------------------------------------------

    def send(self, code: int, message=None) -> None:
        self.ctl_out += p.encode_control(code, message)

    def queue_stream(self, seq: int, data: bytes) -> None:
        for i in range(0, max(len(data), 1), p.STREAM_CHUNK):
            frame = p.encode_stream(seq, data[i:i + p.STREAM_CHUNK])
            self.stream_out += frame
            self.stream_queued += len(frame)

    def flush(self, fd: int, buf: bytearray) -> int:
        try:
            n = os.write(fd, buf)
        except (BlockingIOError, InterruptedError):
            return 0
        del buf[:n]
        return n

    # ---- main loop ------------------------------------------------------------------

    def run(self) -> None:
        self.send(p.READY)
        while self.running:
            self.poll_once()

    def poll_once(self) -> None:
        poller = select.poll()
        poller.register(self.wakeup_r, select.POLLIN)
        poller.register(self.ctl, select.POLLIN | (select.POLLOUT if self.ctl_out else 0))
        backlog = sum(len(pr.stdin_buf) for pr in self.by_seq.values())
        poller.register(self.stream, (select.POLLIN if backlog < STREAM_HIGH_WATER else 0)
                        | (select.POLLOUT if self.stream_out else 0))
        if len(self.stream_out) < STREAM_HIGH_WATER:
            for fd in self.fd_owner:
                poller.register(fd, select.POLLIN)
        for proc in self.by_seq.values():
            if proc.stdin_buf and proc.stdin_fd >= 0:
                poller.register(proc.stdin_fd, select.POLLOUT)
        for fd in self.watch:
            poller.register(fd, select.POLLIN)
        draining = any(pr.status is not None for pr in self.by_pid.values())
        try:
            events = poller.poll(200 if draining else 5000)
        except InterruptedError:
            events = []
        for fd, mask in events:
            if fd == self.wakeup_r:
                self.drain_wakeup()
            elif fd == self.ctl:
                self.on_control(mask)
            elif fd == self.stream:
                self.on_stream(mask)
            elif fd in self.fd_owner:
                self.on_output(fd)
            elif fd in self.watch:
                self.watch[fd]()
            else:
                self.on_stdin_writable(fd)
        self.reap()
        self.finish_exited()

    def drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def on_control(self, mask: int) -> None:
        if mask & select.POLLOUT and self.ctl_out:
            self.flush(self.ctl, self.ctl_out)
        if mask & select.POLLIN:
            try:
                data = os.read(self.ctl, 65536)
            except BlockingIOError:
                return
            for code, payload in self.ctl_reader.feed(data):
                self.dispatch(code, payload)
        elif mask & select.POLLHUP:
            time.sleep(0.05)  # host not connected (yet, or any more): nothing to do

    def dispatch(self, code: int, payload: bytes) -> None:
        handler = self.handlers.get(code)
        if handler is None:
            self.send(p.ERROR, {"message": f"unknown command code {code}"})
            return
        try:
            reply = handler(p.decode_message(payload) or {})
        except (AgentError, OSError, KeyError, ValueError, TypeError) as e:
            self.send(p.ERROR, {"message": f"{p.CODE_NAMES.get(code, code)}: {e}"})
            return
        self.send(p.ACK, reply)

    def on_stream(self, mask: int) -> None:
        if mask & select.POLLOUT and self.stream_out:
            self.stream_sent += self.flush(self.stream, self.stream_out)
        if mask & select.POLLIN:
            try:
                data = os.read(self.stream, 65536)
            except BlockingIOError:
                return
            for seq, chunk in self.stream_reader.feed(data):
                proc = self.by_seq.get(seq)
                if proc is None or proc.stdin_fd < 0:
                    continue
                if chunk:
                    proc.stdin_buf += chunk
                else:
                    proc.stdin_eof = True
                self.on_stdin_writable(proc.stdin_fd)
        elif mask & select.POLLHUP:
            time.sleep(0.05)

    def on_output(self, fd: int) -> None:
        proc = self.fd_owner[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:  # EIO: the pty's last slave closed
            if e.errno != errno.EIO:
                raise
            data = b""
        seq = proc.out_fds[fd]
        if data:
            self.queue_stream(seq, data)
        else:
            self.close_output(proc, fd)

    def close_output(self, proc: Process, fd: int) -> None:
        seq = proc.out_fds.pop(fd)
        del self.fd_owner[fd]
        if fd == proc.pty_master:
            proc.pty_master = -1
            proc.stdin_fd = -1
        os.close(fd)
        self.queue_stream(seq, b"")
        proc.eof_position = self.stream_queued

    def on_stdin_writable(self, fd: int) -> None:
        for proc in self.by_seq.values():
            if proc.stdin_fd == fd:
                break
        else:
            return
        try:
            if proc.stdin_buf:
                n = os.write(fd, proc.stdin_buf)
                del proc.stdin_buf[:n]
        except BlockingIOError:
            return
        except BrokenPipeError:
            proc.stdin_buf.clear()
            proc.stdin_eof = True
        if proc.stdin_eof and not proc.stdin_buf and not proc.terminal:
            os.close(fd)
            proc.stdin_fd = -1

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.get(pid)
            if proc is not None and proc.status is None:
                proc.status = p.exit_status(status)
                proc.exited_at = time.monotonic()
                if proc.stdin_fd >= 0 and proc.stdin_fd != proc.pty_master:
                    os.close(proc.stdin_fd)
                    proc.stdin_fd = -1

    def finish_exited(self) -> None:
        """Report exits whose output has fully reached the stream channel."""
        now = time.monotonic()
        for pid, proc in list(self.by_pid.items()):
            if proc.status is None:
                continue
            if proc.out_fds and now - proc.exited_at > DRAIN_GRACE:
                for fd in list(proc.out_fds):
                    self.close_output(proc, fd)
            if proc.out_fds or self.stream_sent < proc.eof_position:
                continue
            del self.by_pid[pid]
            self.by_seq.pop(proc.seq_out, None)
            container = proc.container
            event = {"container": container.id, "process": proc.id, "event": "finished",
                     "status": proc.status}
            if proc is container.init:
                event["oom"] = self.oom_killed(container)
            self.send(p.PROCESSASYNCEVENT, event)

    def oom_killed(self, container: Container) -> bool:
        try:
            with open(os.path.join(container.cgroup, "memory.events")) as f:
                counts = dict(line.split() for line in f if len(line.split()) == 2)
            return int(counts.get("oom_kill", "0")) > 0
        except (OSError, ValueError):
            return False

    # ---- commands -------------------------------------------------------------------

    def cmd_version(self, msg: dict) -> dict:
        return {"version": p.VERSION}

    def cmd_ping(self, msg: dict):
        return None

    def cmd_startpod(self, msg: dict):
        self.hostname = msg.get("hostname") or ""
        if self.guest and self.hostname:
            sc.sethostname(self.hostname)
        tag = msg.get("shareTag")
        if tag and not self.share_mounted:
            os.makedirs(SHARE_DIR, exist_ok=True)
            sc.mount(tag, SHARE_DIR, "9p", 0,
                     "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client")
            self.share_mounted = True
        return None

    def cmd_destroypod(self, msg: dict):
        for container in list(self.containers.values()):
            self.kill_all(container, signal.SIGKILL)
        if self.guest:
            self.ctl_out += p.encode_control(p.ACK)
            os.set_blocking(self.ctl, True)
            self.flush(self.ctl, self.ctl_out)
            os.sync()
            sc.reboot(sc.LINUX_REBOOT_CMD_RESTART)
        self.running = False
        return None

    def container(self, msg: dict) -> Container:
        cid = msg.get("container", "")
        if cid not in self.containers:
            raise AgentError(f"no such container {cid!r}")
        return self.containers[cid]

    def cmd_newcontainer(self, msg: dict) -> dict:
        cid = msg["id"]
        if not cid or "/" in cid or cid in self.containers:
            raise AgentError(f"bad or duplicate container id {cid!r}")
        container = Container(cid, msg)
        root = msg["rootfs"]
        if not root.startswith("/"):
            root = os.path.join(self.share_dir, root)
        if not os.path.isdir(root):
            raise AgentError(f"rootfs {root} is not a directory")
        container.root = root
        container.cgroup = self.make_cgroup(cid, msg.get("resources") or {})
        proc = Process(container, "init", msg["process"])
        try:
            self.spawn(proc, init=True, wait=bool(msg.get("wait")))
        except Exception:
            self.remove_cgroup(container)
            raise
        container.init = proc
        container.processes["init"] = proc
        self.containers[cid] = container
        return {"pid": proc.pid}

    def cmd_startcontainer(self, msg: dict):
        init = self.container(msg).init
        if init.start_gate < 0:
            raise AgentError("container already started")
        os.write(init.start_gate, b"s")
        os.close(init.start_gate)
        init.start_gate = -1
        return None

    def cmd_exec(self, msg: dict) -> dict:
        container = self.container(msg)
        spec = msg["process"]
        pid_id = spec.get("id") or msg.get("process_id") or ""
        if not pid_id or pid_id in container.processes:
            raise AgentError(f"bad or duplicate process id {pid_id!r}")
        if container.init.status is not None:
            raise AgentError(f"container {container.id} is not running")
        proc = Process(container, pid_id, spec)
        self.spawn(proc, init=False)
        container.processes[pid_id] = proc
        return {"pid": proc.pid}

    def cmd_killcontainer(self, msg: dict):
        container = self.container(msg)
        sig = int(msg.get("signal", signal.SIGTERM))
        if msg.get("all"):
            self.kill_all(container, sig)
        elif container.init.status is None:
            os.kill(container.init.pid, sig)
        return None

    def cmd_signal(self, msg: dict):
        container = self.container(msg)
        proc = container.processes.get(msg.get("process", ""))
        if proc is None:
            raise AgentError(f"no such process {msg.get('process')!r}")
        if proc.status is None:
            os.kill(proc.pid, int(msg.get("signal", signal.SIGTERM)))
        return None

    def cmd_removecontainer(self, msg: dict):
        container = self.container(msg)
        self.kill_all(container, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.cgroup_pids(container) and time.monotonic() < deadline:
            time.sleep(0.01)
            self.reap()
        for proc in container.processes.values():
            if proc.start_gate >= 0:
                os.close(proc.start_gate)
            for fd in list(proc.out_fds):
                self.close_output(proc, fd)
            if proc.stdin_fd >= 0:
                os.close(proc.stdin_fd)
            self.by_pid.pop(proc.pid, None)
            self.by_seq.pop(proc.seq_out, None)
        self.remove_cgroup(container)
        del self.containers[container.id]
        return None

    def cmd_streamclosed(self, msg: dict):
        """The host's reader of stream ``seq`` went away: close the process's end too, so
        that it gets EPIPE (or SIGPIPE) as it would writing to a closed pipe on the host."""
        seq = msg.get("seq", 0)
        for proc in list(self.by_pid.values()):
            for fd, s in list(proc.out_fds.items()):
                if s == seq:
                    self.close_output(proc, fd)
        return None

    def cmd_winsize(self, msg: dict):
        proc = self.by_seq.get(msg.get("seq", 0))
        if proc is None or proc.pty_master < 0:
            raise AgentError("no terminal for that sequence")
        set_winsize(proc.pty_master, msg.get("row", 24), msg.get("column", 80))
        return None

    def cmd_writefile(self, msg: dict):
        container = self.container(msg)
        if msg.get("cgroup"):
            path = os.path.join(container.cgroup, os.path.basename(msg["file"]))
        else:
            path = secure_join(self.container_root(container), msg["file"])
        with open(path, "wb") as f:
            f.write(binascii.a2b_base64(msg.get("data", "")))
        return None

    def cmd_readfile(self, msg: dict) -> dict:
        container = self.container(msg)
        if msg.get("cgroup"):
            path = os.path.join(container.cgroup, os.path.basename(msg["file"]))
        else:
            path = secure_join(self.container_root(container), msg["file"])
        with open(path, "rb") as f:
            return {"data": binascii.b2a_base64(f.read(1 << 20), newline=False).decode()}

    def cmd_processlist(self, msg: dict) -> dict:
        container = self.container(msg)
        rows = []
        for pid in self.cgroup_pids(container):
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
            rows.append({"pid": pid, "ppid": int(fields[1]), "state": fields[0],
                         "uid": int(status.get("Uid", "0").split()[0]),
                         "rss_kb": int(status.get("VmRSS", "0 kB").split()[0]),
                         "cmd": cmd or stat[stat.find("(") + 1:stat.rfind(")")],
                         "nspid": int(status.get("NSpid", str(pid)).split()[-1])})
        return {"processes": rows}

    def cmd_reseed(self, msg: dict):
        """Mix host-provided entropy into the pool and force a reseed: a VM cloned from a
        template must not share its random state with its siblings."""
        data = binascii.a2b_base64(msg.get("data", ""))
        with open("/dev/urandom", "wb") as f:
            fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(f, RNDRESEEDCRNG)
        if msg.get("hostname"):
            self.hostname = msg["hostname"]
            sc.sethostname(self.hostname)
        return None

    # ---- cgroups --------------------------------------------------------------------

    def make_cgroup(self, cid: str, resources: dict) -> str:
        path = os.path.join(CGROUP_ROOT, CGROUP_PARENT, cid)
        os.makedirs(path, exist_ok=True)
        limits = {"memory.max": resources.get("memory"), "pids.max": resources.get("pids"),
                  "cpu.max": resources.get("cpu")}
        for name, value in limits.items():
            if value:
                write_file(os.path.join(path, name), str(value))
        if resources.get("memory"):
            # No swap in the guest; an over-limit container is OOM-killed as a group.
            try:
                write_file(os.path.join(path, "memory.oom.group"), "1")
            except OSError:
                pass
        return path

    def join_cgroup(self, container: Container) -> None:
        write_file(os.path.join(container.cgroup, "cgroup.procs"), "0")

    def remove_cgroup(self, container: Container) -> None:
        try:
            os.rmdir(container.cgroup)
        except OSError:
            pass

    def cgroup_pids(self, container: Container) -> list:
        try:
            with open(os.path.join(container.cgroup, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def kill_all(self, container: Container, sig: int) -> None:
        for pid in self.cgroup_pids(container):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def container_root(self, container: Container) -> str:
        if container.init and container.init.status is None:
            return f"/proc/{container.init.pid}/root"
        return container.root

    # ---- process creation -----------------------------------------------------------

    def spawn(self, proc: Process, init: bool, wait: bool = False) -> None:
        """Start ``proc`` in its container: a helper child enters (or creates) the
        container's namespaces and forks the real process, whose pid it reports; it then
        exits, so the real process is reparented to the agent, which reaps it.

        Returns once the process has exec'd, or (with ``wait``) once its set-up is done
        and it waits for STARTCONTAINER; a set-up failure raises AgentError."""
        child_stdio = self.make_stdio(proc)
        pid_r, pid_w = os.pipe()
        err_r, err_w = os.pipe()
        gate_r = -1
        if wait:
            gate_r, proc.start_gate = os.pipe()
        helper = os.fork()
        if helper == 0:
            try:
                os.close(pid_r)
                os.close(err_r)
                if init:
                    self.child_enter_new(proc)
                else:
                    self.child_enter_existing(proc)
                pid = os.fork()
                if pid == 0:
                    self.child_exec(proc, init, child_stdio, err_w, gate_r)
                os.write(pid_w, str(pid).encode())
                os._exit(0)
            except BaseException as e:  # report any failure, never return into the loop
                try:
                    os.write(err_w, f"{e}".encode())
                finally:
                    os._exit(1)
        for fd in (pid_w, err_w, gate_r, *child_stdio):
            if fd >= 0 and fd not in (proc.stdin_fd, *proc.out_fds):
                try:
                    os.close(fd)
                except OSError:
                    pass  # the pty slave appears three times
        pid_raw = read_all(pid_r)
        os.waitpid(helper, 0)
        if proc.terminal:
            self.receive_pty(proc)
        # The error pipe closes at exec (close-on-exec), when a gated process has finished
        # its set-up, or when set-up fails after writing why.
        error = read_all(err_r).decode(errors="replace")
        if not pid_raw or error:
            self.discard_stdio(proc)
            if proc.start_gate >= 0:
                os.close(proc.start_gate)
                proc.start_gate = -1
            raise AgentError(error or "container process could not be created")
        proc.pid = int(pid_raw)
        self.by_pid[proc.pid] = proc
        if proc.seq_out:
            self.by_seq[proc.seq_out] = proc

    def make_stdio(self, proc: Process) -> tuple:
        """Pipes or a pty for the process; returns the child's (stdin, stdout, stderr)."""
        if proc.terminal:
            # The pty is opened by the process itself, from its container's own devpts,
            # so that ttyname() works there; the master comes back over this socket.
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            proc.pty_channel = ours
            return (PTY_MARKER, theirs.detach(), -1)
        if proc.seq_out:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            os.set_blocking(in_w, False)
            os.set_blocking(out_r, False)
            proc.stdin_fd = in_w
            proc.out_fds[out_r] = proc.seq_out
            self.fd_owner[out_r] = proc
        else:
            in_r = out_w = os.open("/dev/null", os.O_RDWR)
        if proc.seq_err:
            err_r, err_w = os.pipe()
            os.set_blocking(err_r, False)
            proc.out_fds[err_r] = proc.seq_err
            self.fd_owner[err_r] = proc
        else:
            err_w = out_w
        return (in_r, out_w, err_w)

    def receive_pty(self, proc: Process) -> None:
        channel = proc.pty_channel
        proc.pty_channel = None
        channel.settimeout(30)
        try:
            fds = recv_fds(channel)
        except OSError:
            fds = []
        finally:
            channel.close()
        if not fds:
            return  # set-up failed before the pty: the error pipe says why
        master = fds[0]
        os.set_blocking(master, False)
        proc.pty_master = proc.stdin_fd = master
        proc.out_fds[master] = proc.seq_out
        self.fd_owner[master] = proc

    def discard_stdio(self, proc: Process) -> None:
        for fd in list(proc.out_fds):
            del self.fd_owner[fd]
            os.close(fd)
        proc.out_fds.clear()
        if proc.stdin_fd >= 0 and proc.stdin_fd != proc.pty_master:
            os.close(proc.stdin_fd)
        proc.stdin_fd = proc.pty_master = -1

    def child_enter_new(self, proc: Process) -> None:
        """In the helper: join the container's cgroup and make its namespaces."""
        self.join_cgroup(proc.container)
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID)

    def child_enter_existing(self, proc: Process) -> None:
        """In the helper: join the namespaces, cgroup and root of the container's init."""
        container = proc.container
        init_pid = container.init.pid
        self.join_cgroup(container)
        root_fd = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY)
        fds = [(os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY), flag) for ns, flag in
               (("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS),
                ("pid", sc.CLONE_NEWPID), ("mnt", sc.CLONE_NEWNS))]
        for fd, flag in fds:
            sc.setns(fd, flag)
            os.close(fd)
        os.fchdir(root_fd)
        os.chroot(".")
        os.close(root_fd)

    def child_exec(self, proc: Process, init: bool, stdio: tuple, err_w: int, gate_r: int) -> None:
        """In the container process: finish set-up and exec. Never returns."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM,
                        signal.SIGHUP, signal.SIGQUIT, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            spec = proc.spec
            if init:
                self.setup_rootfs(proc.container)
            os.setsid()
            if stdio[0] == PTY_MARKER:
                stdio = open_container_pty(stdio[1], spec.get("consoleSize") or {})
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            if proc.terminal:
                fcntl.ioctl(0, TIOCSCTTY, 0)
            close_fds_except({err_w, gate_r})
            apply_rlimits(spec.get("rlimits") or [])
            if spec.get("noNewPrivileges"):
                sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            user = spec.get("user") or {}
            uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
            os.setgroups([int(g) for g in user.get("additionalGids") or []])
            os.setgid(gid)
            os.setuid(uid)
            cwd = spec.get("cwd") or "/"
            os.chdir(cwd)
            env = dict(e.split("=", 1) for e in spec.get("env") or [] if "=" in e)
            env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            env.setdefault("HOME", "/root" if uid == 0 else "/")
            args = spec.get("args") or []
            if not args:
                raise AgentError("process has no args")
        except BaseException as e:
            os.write(err_w, f"container set-up failed: {e}".encode())
            os._exit(1)
        if gate_r >= 0:
            os.close(err_w)   # set-up is done; the host sees success now
            if os.read(gate_r, 1) != b"s":  # blocks until the host starts the container
                os._exit(1)  # the gate closed without a start: the container was removed
            os.close(gate_r)
        try:
            os.execvpe(args[0], args, env)
        except FileNotFoundError:
            code, why = 127, "executable file not found in $PATH" if "/" not in args[0] \
                else "no such file or directory"
        except PermissionError:
            code, why = 126, "permission denied"
        except OSError as e:
            code, why = 126, e.strerror
        os.write(2, f"runv-py: exec: {args[0]!r}: {why}\n".encode())
        os._exit(code)

    def setup_rootfs(self, container: Container) -> None:
        """In the container init: mount its filesystems and make its root the root."""
        spec = container.spec
        root = container.root
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)
        mounts = spec.get("mounts") or []
        destinations = {m.get("destination", "").rstrip("/") for m in mounts}
        if "/dev" not in destinations:
            mounts = [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}] + mounts
        if "/dev/pts" not in destinations:
            mounts.append({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                           "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                                       "mode=0620"]})
        for m in mounts:
            self.mount_one(root, m)
            if m.get("destination", "").rstrip("/") == "/dev" and m.get("type") == "tmpfs":
                make_devices(os.path.join(root, "dev"))
        if spec.get("readonly"):
            sc.mount(None, root, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
        if spec.get("hostname"):
            sc.sethostname(spec["hostname"])
        os.chdir(root)
        sc.mount(root, "/", None, sc.MS_MOVE)
        os.chroot(".")
        os.chdir("/")

    def mount_one(self, root: str, m: dict) -> None:
        kind = m.get("type") or "bind"
        flags, data = mount_options(m.get("options"))
        target = secure_join(root, m["destination"])
        source = m.get("source") or kind
        if m.get("shared"):
            source = os.path.join(self.share_dir, source)
        if "bind" in (m.get("options") or []) or "rbind" in (m.get("options") or []) or kind == "bind":
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
            return
        os.makedirs(target, exist_ok=True)
        if kind == "cgroup":
            kind, source, data = "cgroup2", "cgroup2", None
        try:
            sc.mount(source, target, kind, flags, data)
        except OSError as e:
            if kind in ("mqueue",) and e.errno in (errno.ENODEV, errno.EPERM):
                return  # optional filesystems the guest kernel may not carry
            raise


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


def recv_fds(channel) -> list:
    """File descriptors passed over ``channel`` with SCM_RIGHTS (none at end-of-file)."""
    _msg, ancdata, _flags, _addr = channel.recvmsg(16, socket.CMSG_SPACE(4 * 4))
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    return fds


def open_container_pty(channel_fd: int, size: dict) -> tuple:
    """In the container process: open a pty from the container's /dev/ptmx, send the
    master to the agent, and return the slave as stdin, stdout and stderr."""
    master, slave = os.openpty()
    if size:
        set_winsize(master, size.get("height", 24), size.get("width", 80))
    channel = socket.socket(fileno=channel_fd)
    channel.sendmsg([b"pty"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", master))])
    channel.close()
    os.close(master)
    return (slave, slave, slave)


def close_fds_except(keep: set) -> None:
    """Close every fd above stderr but ``keep``: a process waiting at its start gate
    must not hold the agent's channels or other processes' pipes."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3) + [65536]:
        os.closerange(low, fd)
        low = fd + 1


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def make_devices(dev: str) -> None:
    for name, major, minor in DEFAULT_DEVICES:
        path = os.path.join(dev, name)
        if not os.path.exists(path):
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
            os.chmod(path, 0o666)
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.symlink(target, path)
    os.makedirs(os.path.join(dev, "shm"), exist_ok=True)
    os.makedirs(os.path.join(dev, "pts"), exist_ok=True)


def apply_rlimits(rlimits: list) -> None:
    for r in rlimits:
        resource.setrlimit(RLIMITS[r["type"]], (int(r["soft"]), int(r["hard"])))


# ---- guest boot ---------------------------------------------------------------------

def mount_guest_filesystems() -> None:
    for source, target, kind, flags, data in (
            ("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
            ("sysfs", "/sys", "sysfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
            ("devtmpfs", "/dev", "devtmpfs", sc.MS_NOSUID, None),
            ("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "ptmxmode=0666,mode=0620"),
            ("shm", "/dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, None),
            ("tmpfs", "/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755"),
            ("cgroup2", CGROUP_ROOT, "cgroup2", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None)):
        os.makedirs(target, exist_ok=True)
        sc.mount(source, target, kind, flags, data)
    write_file(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "+memory +pids +cpu")
    os.makedirs(os.path.join(CGROUP_ROOT, CGROUP_PARENT), exist_ok=True)
    write_file(os.path.join(CGROUP_ROOT, CGROUP_PARENT, "cgroup.subtree_control"),
               "+memory +pids +cpu")


def find_port(name: str, timeout: float = 10.0) -> str:
    """The /dev node of the virtio-serial port called ``name`` (no udev in the guest).

    Ports are announced asynchronously after the driver binds, so wait for them."""
    base = "/sys/class/virtio-ports"
    deadline = time.monotonic() + timeout
    while True:
        try:
            entries = sorted(os.listdir(base))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(base, entry, "name")) as f:
                    if f.read().strip() == name and os.path.exists(os.path.join("/dev", entry)):
                        return os.path.join("/dev", entry)
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise AgentError(f"virtio-serial port {name} not found (have {entries})")
        time.sleep(0.002)


def guest_main() -> None:
    """Entry point as /init in the guest."""
    try:
        mount_guest_filesystems()
        ctl = os.open(find_port(p.CONTROL_PORT), os.O_RDWR | os.O_NONBLOCK)
        stream = os.open(find_port(p.STREAM_PORT), os.O_RDWR | os.O_NONBLOCK)
        Agent(ctl, stream, guest=True).run()
    except BaseException as e:
        log(f"fatal: {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    # PID 1 must never exit: power the machine off instead (QEMU runs with -no-reboot).
    os.sync()
    sc.reboot(sc.LINUX_REBOOT_CMD_RESTART)
