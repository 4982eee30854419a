"""The host side of the hyperstart protocol: commands, exit events and stdio streams.

Two reader threads own the two channels. Commands are answered in order, so a request
appends a waiter to a FIFO under the send lock and the control reader hands each ACK or
ERROR to the oldest waiter. Stream frames go to the sink attached to their sequence
number; a sink that blocks (a full pipe) slows the guest down through virtio-serial's own
flow control, and never blocks the control channel.
"""
import collections
import os
import socket
import threading
import time

from .hyperstart import protocol as p


class AgentError(Exception):
    """The agent answered a command with ERROR."""


class AgentGone(AgentError):
    """The channel to the agent closed: the VM stopped or died."""


class _Waiter:
    def __init__(self, code: int):
        self.code = code
        self.done = threading.Event()
        self.ok = False
        self.message = None


class AgentClient:
    def __init__(self, control: socket.socket, stream: socket.socket):
        self.control = control
        self.stream = stream
        self.send_lock = threading.Lock()
        self.stream_lock = threading.Lock()
        self.waiters = collections.deque()
        self.ready = threading.Event()
        self.closed = threading.Event()
        self.cond = threading.Condition()
        self.exits = {}          # (container, process) -> event message
        self.sinks = {}          # seq -> callable(bytes); b"" is end-of-file
        self.eofs = set()        # sequences whose end-of-file has arrived
        self.event_callbacks = []
        self._next_seq = 1
        for target, name in ((self._read_control, "agent-control"),
                             (self._read_stream, "agent-stream")):
            threading.Thread(target=target, name=name, daemon=True).start()

    # ---- commands -------------------------------------------------------------------

    def wait_ready(self, timeout: float, alive=lambda: True) -> None:
        """Wait for the guest's READY; raises AgentGone/TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.closed.is_set() or not alive():
                raise AgentGone("the guest stopped before its agent was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest agent was not ready within {timeout:.0f}s")

    def request(self, code: int, message=None, timeout: float = 60.0):
        """Send one command and return the agent's ACK payload; raises AgentError."""
        waiter = _Waiter(code)
        with self.send_lock:
            if self.closed.is_set():
                raise AgentGone("the guest agent is gone")
            self.waiters.append(waiter)
            try:
                self.control.sendall(p.encode_control(code, message))
            except OSError as e:
                self._close()
                raise AgentGone(f"the guest agent is gone ({e})") from None
        if not waiter.done.wait(timeout):
            raise AgentError(f"{p.CODE_NAMES.get(code, code)}: no answer within {timeout:.0f}s")
        if not waiter.ok:
            if isinstance(waiter.message, AgentGone):
                raise waiter.message
            raise AgentError((waiter.message or {}).get("message", "unknown error"))
        return waiter.message

    def _read_control(self) -> None:
        reader = p.FrameReader(p.CONTROL_HEADER)
        try:
            while True:
                data = self.control.recv(65536)
                if not data:
                    break
                for code, payload in reader.feed(data):
                    self._on_control(code, p.decode_message(payload))
        except (OSError, p.ProtocolError):
            pass
        self._close()

    def _on_control(self, code: int, message) -> None:
        if code == p.READY:
            self.ready.set()
        elif code == p.PROCESSASYNCEVENT:
            with self.cond:
                self.exits[(message["container"], message["process"])] = message
                self.cond.notify_all()
            for callback in list(self.event_callbacks):
                callback(message)
        elif code in (p.ACK, p.ERROR):
            with self.send_lock:
                waiter = self.waiters.popleft() if self.waiters else None
            if waiter is not None:
                waiter.ok = code == p.ACK
                waiter.message = message
                waiter.done.set()

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with self.send_lock:
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.message = AgentGone("the guest agent is gone")
                waiter.done.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        self._close()
        for sock in (self.control, self.stream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # ---- streams --------------------------------------------------------------------

    def new_seq(self) -> int:
        with self.stream_lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def attach(self, seq: int, sink) -> None:
        """Send the output of stream ``seq`` to ``sink(bytes)`` (b"" at end-of-file)."""
        with self.cond:
            self.sinks[seq] = sink

    def write_stdin(self, seq: int, data: bytes) -> None:
        with self.stream_lock:
            for i in range(0, max(len(data), 1), p.STREAM_CHUNK):
                self.stream.sendall(p.encode_stream(seq, data[i:i + p.STREAM_CHUNK]))

    def close_stdin(self, seq: int) -> None:
        with self.stream_lock:
            self.stream.sendall(p.encode_stream(seq, b""))

    def _stream_closed(self, seq: int) -> None:
        try:
            self.request(p.STREAMCLOSED, {"seq": seq}, timeout=10)
        except AgentError:
            pass

    def _read_stream(self) -> None:
        reader = p.FrameReader(p.STREAM_HEADER)
        try:
            while True:
                data = self.stream.recv(262144)
                if not data:
                    break
                for seq, chunk in reader.feed(data):
                    sink = self.sinks.get(seq)
                    if sink is not None:
                        try:
                            sink(chunk)
                        except OSError:
                            # The reader went away: drop the rest, and let the writer in
                            # the guest find its pipe closed.
                            self.sinks[seq] = None
                            threading.Thread(target=self._stream_closed, args=(seq,),
                                             daemon=True).start()
                    if not chunk:
                        with self.cond:
                            self.eofs.add(seq)
                            self.cond.notify_all()
        except (OSError, p.ProtocolError):
            pass
        with self.cond:
            self.cond.notify_all()
        self._close()

    # ---- exits ----------------------------------------------------------------------

    def wait_exit(self, container: str, process: str, seqs=(), timeout=None):
        """The exit event of a process, once its output streams have ended too.

        Returns None when the timeout passes or the guest goes away first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        key = (container, process)
        with self.cond:
            while True:
                event = self.exits.get(key)
                if event is not None:
                    # The guest sends end-of-file before the exit event, on another
                    # channel: give the stream reader a moment to catch up.
                    end = time.monotonic() + 2.0
                    while not all(s in self.eofs for s in seqs if s) and time.monotonic() < end:
                        self.cond.wait(0.05)
                    return event
                if self.closed.is_set():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.cond.wait(remaining if remaining is not None else 1.0)


def fd_sink(fd: int, close_at_eof: bool = False):
    """A sink writing everything to ``fd`` (blocking, so a slow reader slows the guest)."""
    def sink(data: bytes) -> None:
        if not data:
            if close_at_eof:
                os.close(fd)
            return
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    return sink


def pump_stdin(agent: AgentClient, seq: int, fd: int, close: bool = True) -> None:
    """Forward ``fd`` to the stdin of stream ``seq`` until end-of-file, in a thread."""
    def run():
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                agent.write_stdin(seq, data)
            agent.close_stdin(seq)
        except OSError:
            pass
        if close:
            try:
                os.close(fd)
            except OSError:
                pass
    threading.Thread(target=run, name=f"stdin-{seq}", daemon=True).start()
