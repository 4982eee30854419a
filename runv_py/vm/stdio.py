"""Moving bytes between host file descriptors and the agent's streams."""
import os
import threading


class FdSink:
    """Writes a stream's output to ``fd`` (blocking, so a slow reader slows the guest);
    with ``close_at_eof`` the fd is the sink's, closed once: at end-of-file, when its
    reader has gone (EPIPE), or by close()."""

    def __init__(self, fd: int, close_at_eof: bool = False):
        self.fd = fd
        self.owned = close_at_eof
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        if not data:
            self.close()
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            self.close()  # no more output goes there: the caller drops the stream
            raise

    def close(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0 and self.owned:
            try:
                os.close(fd)
            except OSError:
                pass


def fd_sink(fd: int, close_at_eof: bool = False) -> FdSink:
    """A sink writing everything to ``fd`` (see FdSink)."""
    return FdSink(fd, close_at_eof)


def pump_stdin(agent, seq: int, fd: int, close: bool = True) -> None:
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
