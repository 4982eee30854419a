"""A task's stdio FIFOs as containerd means them, turned into a sandbox ProcessIO.

stdin: the client (ctr, CRI) opens the writing end when it is ready and closes it at end
of input, and the process must then see end-of-file. The sandbox reads its stdin fd
until EOF; so a relay opens the FIFO for reading (blocking until the writer comes),
copies it into a pipe the sandbox reads, and closes the pipe at the FIFO's EOF.

stdout and stderr: opened read-write, so that opening never waits for a reader and a
reader that comes and goes does not end the stream; the sandbox closes them when the
process's output ends, which is when the reader sees end-of-file."""
import logging
import os
import threading

from ..hyperstart.errors import NotFound
from ..sandbox import ProcessIO

log = logging.getLogger("runv_py.shimv2.stdio")


class StdinRelay:
    def __init__(self, path: str):
        self.path = path
        self.read_fd, self.write_fd = os.pipe()
        self.stopped = threading.Event()
        threading.Thread(target=self.run, name="stdin", daemon=True).start()

    def run(self) -> None:
        fifo = -1
        try:
            fifo = os.open(self.path, os.O_RDONLY)  # waits for the client's writer
            while not self.stopped.is_set():
                data = os.read(fifo, 65536)
                if not data:
                    break
                os.write(self.write_fd, data)
        except OSError as e:
            log.debug("stdin %s: %s", self.path, e)
        finally:
            if fifo >= 0:
                os.close(fifo)
            self.close_write()

    def close_write(self) -> None:
        fd, self.write_fd = self.write_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def stop(self) -> None:
        """The process ended: stop waiting for a writer that may never come."""
        self.stopped.set()
        try:  # opening the writing end ourselves ends a reader's blocking open
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def process_io(stdin: str, stdout: str, stderr: str, terminal: bool, relays: list) -> ProcessIO:
    """The ProcessIO for these FIFO paths ('' for none); a stdin relay is appended to
    ``relays``, to stop when the process ends."""
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
        relay = StdinRelay(stdin)
        relays.append(relay)
        fd_in = relay.read_fd
    return ProcessIO(fd_in, out, err)
