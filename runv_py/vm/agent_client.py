"""The host side of the hyperstart protocol: commands, exit events and stdio streams.

Two reader threads own the two channels. Commands are answered in order, so a request
appends a waiter to a FIFO under the send lock and the control reader hands each ACK or
ERROR to the oldest waiter. Stream frames go to the sink attached to their sequence
number; a sink that blocks (a full pipe) slows the guest down through virtio-serial's own
flow control, and never blocks the control channel.
"""
import collections
import logging
import socket
import threading
import time

from ..hyperstart import messages as m
from ..hyperstart import protocol as p
from ..hyperstart.errors import Internal, RunvError, Unavailable, from_code

log = logging.getLogger("runv_py.agent")


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (SIOCINQ)."""
    import fcntl
    import struct
    import termios
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


class AgentGone(Unavailable):
    """The channel to the agent closed: the VM stopped or died."""


class _Waiter:
    def __init__(self):
        self.done = threading.Event()
        self.payload = b""
        self.error = None


class AgentClient:
    def __init__(self, control: socket.socket, stream: socket.socket, first_seq: int = 1,
                 leftovers: tuple = (b"", b"")):
        """``first_seq`` and ``leftovers`` (the bytes of a frame each channel had begun)
        continue a checkpointed client's streams (sandbox/checkpoint.py)."""
        self.control = control
        self.stream = stream
        self.send_lock = threading.Lock()
        self.stream_lock = threading.Lock()
        self.waiters = collections.deque()
        self.ready = threading.Event()
        self.closed = threading.Event()
        self.cond = threading.Condition()
        self.sinks = {}          # seq -> callable(bytes); b"" is end-of-file
        self.eofs = set()        # sequences whose end-of-file has arrived
        self.event_callbacks = []
        self._next_seq = first_seq
        self.readers = (p.FrameReader(p.CONTROL_HEADER), p.FrameReader(p.STREAM_HEADER))
        for reader, begun in zip(self.readers, leftovers):
            reader.buffer += begun
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

    def call(self, request, timeout: float = 60.0):
        """Send one command; returns the agent's reply message (None for a bare ACK).
        An ERROR comes back as the RunvError its code names; AgentGone if the VM went."""
        waiter = _Waiter()
        sent = time.monotonic()
        with self.send_lock:
            if self.closed.is_set():
                raise AgentGone("the guest agent is gone")
            self.waiters.append(waiter)
            try:
                self.control.sendall(m.encode(request))
            except OSError as e:
                self._close()
                raise AgentGone(f"the guest agent is gone ({e})") from None
        name = type(request).__name__
        if not waiter.done.wait(timeout):
            raise Unavailable(f"the guest agent did not answer {name} within {timeout:.0f}s")
        log.debug("%s answered in %.0f ms", name, (time.monotonic() - sent) * 1000)
        if waiter.error is not None:
            raise waiter.error
        reply_class = type(request).REPLY
        return m.decode(reply_class, waiter.payload) if reply_class else None

    def _read_control(self) -> None:
        reader = self.readers[0]
        try:
            while True:
                data = self.control.recv(65536)
                if not data:
                    break
                for code, payload in reader.feed(data):
                    self._on_control(code, payload)
        except (OSError, RunvError, p.ProtocolError):
            self._shutdown()  # the channel is dead: a writer on the other end must not block
        self._close()

    def _on_control(self, code: int, payload: bytes) -> None:
        if code == p.READY:
            self.ready.set()
        elif code == p.PROCESSASYNCEVENT:
            event = m.decode(m.ProcessExited, payload)
            for callback in list(self.event_callbacks):
                callback(event)
        elif code in (p.ACK, p.ERROR):
            with self.send_lock:
                waiter = self.waiters.popleft() if self.waiters else None
            if waiter is None:
                return
            if code == p.ERROR:
                try:
                    error = m.decode(m.ErrorReply, payload)
                    waiter.error = from_code(error.code, error.message)
                except RunvError as e:  # popped already: its caller must hear of it
                    waiter.error = Internal(f"the guest agent's ERROR does not decode: {e}")
            waiter.payload = payload
            waiter.done.set()

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with self.send_lock:
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.error = AgentGone("the guest agent is gone")
                waiter.done.set()
        with self.cond:
            self.cond.notify_all()

    def _shutdown(self) -> None:
        for sock in (self.control, self.stream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._close()
        self._shutdown()
        for sock in (self.control, self.stream):
            sock.close()

    # ---- streams --------------------------------------------------------------------

    def new_seq(self) -> int:
        with self.stream_lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def next_seq(self) -> int:
        with self.stream_lock:
            return self._next_seq

    def quiesce(self, quiet: float = 0.1, timeout: float = 5.0) -> tuple:
        """With the VM stopped: read what the guest had sent until both channels stay
        quiet for ``quiet`` seconds; returns the bytes of the frames each had begun."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = [len(r.buffer) for r in self.readers]
            waiting = [_unread(sock) for sock in (self.control, self.stream)]
            time.sleep(quiet)
            if not any(waiting) and before == [len(r.buffer) for r in self.readers]:
                break
        return tuple(bytes(r.buffer) for r in self.readers)

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
            self.call(m.StreamClosed(seq=seq), timeout=10)
        except RunvError:
            pass

    def _read_stream(self) -> None:
        reader = self.readers[1]
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
            self._shutdown()
        with self.cond:
            self.cond.notify_all()
        self._close()

    def wait_eof(self, seqs, timeout: float) -> bool:
        """Wait until the streams ``seqs`` have ended (or the channel closed); False on
        timeout. The guest ends a process's streams before it reports its exit, but on
        the other channel: a reader of the exit waits for them here."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(s in self.eofs for s in seqs if s):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self.closed.is_set():
                    return True
                self.cond.wait(min(left, 0.05))
            return True
