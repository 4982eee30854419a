"""The hyperstart agent's channels and event loop: PID 1 of the guest (or, under the
namespace driver, of a pid namespace on the host).

One single-threaded poll loop serves the control channel (commands in, ACK/ERROR and
exit events out), the stream channel (stdin in, stdout/stderr out) and every process's
pipes. Nothing blocks on the host: channel writes are non-blocking and buffered, and while
the stream buffer is over its high-water mark the agent stops reading process output, so
a flooding process is slowed down instead of filling memory or stalling commands.

What the commands mean is in commands.py; what differs between the guest and the host
(cgroups, the share, proc protection) is the platform object the agent is given.
"""
import errno
import os
import select
import sys
import time

# The C modules behind signal: the Python wrapper imports enum, which costs a tenth of a
# second of guest boot under TCG.
import _signal as signal

from . import messages as m
from . import protocol as p
from .commands import Commands
from .errors import code_of
from .model import Process

# Stop reading process output while this much is waiting for the stream channel.
STREAM_HIGH_WATER = 1024 * 1024
# How long an exited process's pipes may stay open (held by its own children) before the
# agent closes them and reports the exit anyway.
DRAIN_GRACE = 2.0


def log(*args) -> None:
    print("hyperstart:", *args, file=sys.stderr, flush=True)


class Agent:
    def __init__(self, control_fd: int, stream_fd: int, platform):
        self.platform = platform
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
        self.by_pid = {}          # pid -> Process not yet reported as exited
        self.by_seq = {}          # stdin sequence -> Process
        self.fd_owner = {}        # output fd -> Process
        self.running = True
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.commands = Commands(self, platform)

    # ---- channel output -------------------------------------------------------------

    def send(self, msg, code: int = -1) -> None:
        self.ctl_out += m.encode(msg, code)

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

    def flush_control_now(self) -> None:
        """Send what is queued on the control channel before the machine goes away."""
        os.set_blocking(self.ctl, True)
        while self.ctl_out:
            self.flush(self.ctl, self.ctl_out)

    # ---- processes ------------------------------------------------------------------

    def track(self, proc: Process) -> None:
        """Serve a started process's stdio and watch for its exit."""
        for fd in proc.out_fds:
            self.fd_owner[fd] = proc
        self.by_pid[proc.pid] = proc
        if proc.seq_out:
            self.by_seq[proc.seq_out] = proc

    def untrack(self, proc: Process) -> None:
        """Forget a process without reporting it (its container is being removed)."""
        for fd in list(proc.out_fds):
            self.close_output(proc, fd)
        if proc.stdin_fd >= 0:
            os.close(proc.stdin_fd)
            proc.stdin_fd = -1
        self.by_pid.pop(proc.pid, None)
        self.by_seq.pop(proc.seq_out, None)

    def close_stream(self, seq: int) -> None:
        """Close every process output that feeds stream ``seq``."""
        for proc in list(self.by_pid.values()):
            for fd, s in list(proc.out_fds.items()):
                if s == seq:
                    self.close_output(proc, fd)

    # ---- main loop ------------------------------------------------------------------

    def run(self) -> None:
        self.send(None, p.READY)
        while self.running:
            self.poll_once()
        self.flush_control_now()  # the last ACK (DestroyPod's) reaches the host

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
        watch = self.platform.cgroups.watch
        for fd in watch:
            poller.register(fd, select.POLLIN)
        draining = any(pr.exited for pr in self.by_pid.values())
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
            elif fd in watch:
                watch[fd]()
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
            try:
                frames, bad = self.ctl_reader.feed(data), None
            except p.ProtocolError as e:  # PID 1 must not die of what the host sends
                frames, bad = e.frames, e
            for code, payload in frames:
                self.dispatch(code, payload)
            if bad is not None:  # the reader dropped the rest: the next frame is new
                self.send(m.ErrorReply(message=f"control channel: {bad}", code=bad.code))
        elif mask & select.POLLHUP:
            time.sleep(0.05)  # host not connected (yet, or any more): nothing to do

    def dispatch(self, code: int, payload: bytes) -> None:
        """Run one command; exactly one ACK (with the reply, if any) or ERROR goes back."""
        cls = m.REQUESTS.get(code)
        handler = self.commands.handlers.get(code)
        try:
            if cls is None or handler is None:
                raise p.ProtocolError(f"unknown command code {code}")
            reply = handler(m.decode(cls, payload))
        except Exception as e:  # anything else is INTERNAL; PID 1 must not die of it
            name = p.CODE_NAMES.get(code, code)
            message = f"{name}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
            if isinstance(e, OSError) and e.filename:
                message += f": {e.filename}"
            self.send(m.ErrorReply(message=message, code=code_of(e)))
            return
        self.send(reply, p.ACK)

    def on_stream(self, mask: int) -> None:
        if mask & select.POLLOUT and self.stream_out:
            self.stream_sent += self.flush(self.stream, self.stream_out)
        if mask & select.POLLIN:
            try:
                data = os.read(self.stream, 65536)
            except BlockingIOError:
                return
            try:
                frames = self.stream_reader.feed(data)
            except p.ProtocolError as e:  # dropped: the stream channel has no replies
                log(f"stream channel: {e}")
                frames = e.frames
            for seq, chunk in frames:
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
        self.fd_owner.pop(fd, None)
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
            if proc is not None and not proc.exited:
                proc.exit(p.exit_status(status), time.monotonic(),
                          os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)
                if proc.stdin_fd >= 0 and proc.stdin_fd != proc.pty_master:
                    os.close(proc.stdin_fd)
                    proc.stdin_fd = -1
                self.commands.on_exit(proc)

    def finish_exited(self) -> None:
        """Report exits whose output has fully reached the stream channel."""
        now = time.monotonic()
        for pid, proc in list(self.by_pid.items()):
            if not proc.exited:
                continue
            if proc.out_fds and now - proc.exited_at > DRAIN_GRACE:
                for fd in list(proc.out_fds):
                    self.close_output(proc, fd)
            if proc.out_fds or self.stream_sent < proc.eof_position:
                continue
            del self.by_pid[pid]
            self.by_seq.pop(proc.seq_out, None)
            container = proc.container
            oom = proc is container.init and self.platform.cgroups.oom_killed(container.id)
            self.send(m.ProcessExited(container=container.id, process=proc.id,
                                      status=proc.status, oom=oom, signal=proc.signal))
