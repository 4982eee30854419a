"""Moving bytes between host file descriptors and the agent's streams."""
import os
import threading


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
