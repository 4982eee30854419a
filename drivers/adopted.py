"""A process this one did not start, watched through a pidfd: a VM handed over by the
node's factory (runv_py/factory), which stays QEMU's parent.

It answers what QemuVM asks of a ``subprocess.Popen`` (poll, wait, send_signal,
terminate, kill). A pidfd names the process itself, so a signal can never reach another
process that reused the pid; the exit status is the parent's to read, not ours.
"""
import os
import select
import signal
import subprocess
import time


class Signalled:
    """terminate() and kill() as Popen has them, over the class's send_signal."""

    def send_signal(self, sig: int) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Adopted(Signalled):
    def __init__(self, pid: int, pidfd: int = -1):
        """Watch ``pid``; ``pidfd`` (ours from now on) if the caller has one already."""
        self.pid = pid
        self.pidfd = pidfd if pidfd >= 0 else os.pidfd_open(pid)
        self.returncode = None
        self.args = [f"pid {pid}"]

    def poll(self):
        if self.returncode is None and self.pidfd >= 0:
            readable, _, _ = select.select([self.pidfd], [], [], 0)
            if readable:
                self._gone()
        return self.returncode

    def _gone(self) -> None:
        # The exit status belongs to the parent; -SIGKILL-like values would be a guess.
        self.returncode = 0
        os.close(self.pidfd)
        self.pidfd = -1

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            select.select([self.pidfd], [], [], left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass
