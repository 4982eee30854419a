"""A task's stdio FIFOs as containerd means them, turned into a sandbox ProcessIO.

stdin: clients (ctr, CRI's attach and exec) open the FIFO's writing end, close it when
their input ends, and call CloseIO. The sandbox reads its stdin fd until EOF; so a relay
reads the FIFO into a pipe the sandbox reads, and closing that pipe is the process's
end-of-file. It comes when the writers have gone (ctr closes its end without CloseIO
when it reads its input's end before the task is set up; runc's shim, which holds a
writer of its own, then never ends the input) or at CloseIO, which may come while a
client still holds its end (ctr calls it first): the relay then takes what is in the
FIFO, which is all the client wrote before (none of it is lost, as with runc), and
ends.

stdout and stderr: opened read-write, so that opening never waits for a reader and a
reader that comes and goes does not end the stream; the sandbox closes them when the
process's output ends, which is when the reader sees end-of-file."""
import logging
import os
import select
import threading

from ..hyperstart.errors import NotFound
from ..sandbox import ProcessIO

log = logging.getLogger("runv_py.shimv2.stdio")


class StdinRelay:
    """The stdin FIFO at ``path`` copied into ``read_fd`` (the sandbox's to read and
    close). ``closed``: CloseIO came before the process started."""

    def __init__(self, path: str, closed: bool = False):
        self.path = path
        self.lock = threading.Lock()
        self.closing = closed   # CloseIO: take what the FIFO holds, then end
        self.stopped = False    # the process ended: end now
        self.read_fd, self.write_fd = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        self.fifo = -1
        try:
            # Non-blocking: no waiting for a writer. Linux reports the FIFO readable
            # only once a writer has come: its end-of-file is a writer that went.
            self.fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            self._close_all()
            os.close(self.read_fd)
            raise NotFound(f"cannot open the task's stdin {path}: {e.strerror}") from None
        threading.Thread(target=self.run, name="stdin", daemon=True).start()

    def run(self) -> None:
        try:
            while True:
                with self.lock:
                    stopped, closing = self.stopped, self.closing
                if stopped:
                    break
                if closing:
                    self._drain()
                    break
                ready, _, _ = select.select([self.fifo, self.wake_r], [], [])
                if self.fifo in ready and self.wake_r not in ready and not self._copy_once():
                    break  # every writer has gone: end of input
        except OSError as e:
            log.debug("stdin %s: %s", self.path, e)
        finally:
            self._close_all()

    def _copy_once(self) -> bool:
        """One read from the FIFO into the pipe; False at end-of-file."""
        try:
            data = os.read(self.fifo, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]
        return True

    def _drain(self) -> None:
        """What the FIFO holds now, until it is empty or every writer has gone."""
        while True:
            ready, _, _ = select.select([self.fifo], [], [], 0)
            if not ready or not self._copy_once():
                return

    def close_stdin(self) -> None:
        """CloseIO: the input ends with what the FIFO holds."""
        with self.lock:
            self.closing = True
        self._wake()

    def stop(self) -> None:
        """The process ended: stop copying."""
        with self.lock:
            self.stopped = True
        self._wake()

    def _wake(self) -> None:
        with self.lock:
            if self.wake_w >= 0:
                os.write(self.wake_w, b"x")

    def _close_all(self) -> None:
        """Everything but ``read_fd`` (the sandbox's)."""
        with self.lock:
            fds = [self.fifo, self.write_fd, self.wake_r, self.wake_w]
            self.fifo = self.write_fd = self.wake_r = self.wake_w = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def process_io(stdin: str, stdout: str, stderr: str, terminal: bool, relays: list,
               stdin_closed: bool = False) -> ProcessIO:
    """The ProcessIO for these FIFO paths ('' for none); a stdin relay is appended to
    ``relays``, to stop when the process ends (``stdin_closed``: CloseIO came already)."""
    out = err = -1
    try:
        out = os.open(stdout, os.O_RDWR) if stdout else -1
        err = os.open(stderr, os.O_RDWR) if stderr and not terminal else -1
    except OSError as e:
        for fd in (out, err):
            if fd >= 0:
                os.close(fd)
        raise NotFound(f"cannot open the task's output {e.filename}: {e.strerror}") from None
    fd_in = -1
    if stdin:
        try:
            relay = StdinRelay(stdin, closed=stdin_closed)
        except NotFound:
            for fd in (out, err):
                if fd >= 0:
                    os.close(fd)
            raise
        relays.append(relay)
        fd_in = relay.read_fd
    return ProcessIO(fd_in, out, err)
