"""An exclusive flock with a deadline: a lock holder that hangs must not hang its waiters."""
import os
import time

from ..hyperstart.errors import Unavailable


def lock(path: str, timeout: float, busy: str) -> int:
    """An fd of ``path`` (created 0600) holding its exclusive flock; raises Unavailable
    with ``busy`` once ``timeout`` seconds have passed (the fd is closed then)."""
    import fcntl  # only for the callers that lock: not on every CLI path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"{busy} (waited {timeout:g} s for {path})") from None
                time.sleep(0.01)
    except BaseException:
        os.close(fd)
        raise
