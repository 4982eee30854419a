"""A task's stdin FIFO as containerd means it: the client (ctr, CRI) opens the writing
end when it is ready and closes it at end of input, and the process must then see
end-of-file. runv-py's shim reads its stdin fd until EOF; so the daemon opens the FIFO for
reading (blocking until the writer comes), copies it into a pipe the shim reads, and
closes the pipe at the FIFO's EOF."""
import logging
import os
import threading

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


def open_stdio(paths: tuple, relays: list) -> tuple:
    """fds for (stdin, stdout, stderr): stdin through a StdinRelay (appended to
    ``relays``), the others opened as runv-py's lifecycle opens them."""
    from .lifecycle import open_stdio as open_paths
    stdin, rest = paths[0], paths[1:]
    fds = open_paths(("",) + tuple(rest))
    if stdin:
        relay = StdinRelay(stdin)
        relays.append(relay)
        os.close(fds[0])
        fds = (relay.read_fd,) + fds[1:]
    return fds
