"""Terminals for containerd tasks: the runv-py shim hands a pty master to a console
socket (as runc does); the shim v2 daemon receives it and copies between it and the
FIFOs containerd gave (stdin FIFO -> master, master -> stdout FIFO)."""
import logging
import os
import select
import socket
import threading
import time
from typing import Optional

log = logging.getLogger("runv_py.shimv2.console")

ACCEPT_TIMEOUT = 120.0


class Console:
    """One console socket, one pty master, two copying threads."""

    def __init__(self, path: str, stdin: str, stdout: str):
        self.path = path
        self.stdin_path, self.stdout_path = stdin, stdout
        self.master = -1
        self.out_fd = -1
        self.got = threading.Event()
        self.finished = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener.bind(path)
        self.listener.listen(1)
        threading.Thread(target=self.accept, name="console", daemon=True).start()

    def accept(self) -> None:
        self.listener.settimeout(ACCEPT_TIMEOUT)
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
        except OSError as e:
            log.warning("no console arrived on %s: %s", self.path, e)
            return
        finally:
            self.close_listener()
        if not fds:
            return
        self.master = fds[0]
        self.out_fd = open_writer(self.stdout_path)
        self.got.set()
        threading.Thread(target=self.copy_out, name="console-out", daemon=True).start()
        if self.stdin_path:
            threading.Thread(target=self.copy_in, name="console-in", daemon=True).start()

    def close_listener(self) -> None:
        try:
            self.listener.close()
            os.unlink(self.path)
        except OSError:
            pass

    def copy_out(self) -> None:
        """Until the pty's last slave closes (EIO), or finish() says the process ended."""
        while not self.finished.is_set():
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if ready and not self.write_out(os.read(self.master, 65536)):
                    break
            except OSError:
                break
        self.drain()
        for fd in (self.out_fd, self.master):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.out_fd = self.master = -1
        self.closed.set()

    def write_out(self, data: bytes) -> bool:
        if not data:
            return False
        if self.out_fd >= 0:
            try:
                os.write(self.out_fd, data)
            except OSError:
                self.out_fd = -1  # nobody reads any more: keep draining the pty
        return True

    def drain(self) -> None:
        """What the process wrote just before it ended is already in the pty."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.05)
                if not ready or not self.write_out(os.read(self.master, 65536)):
                    return
            except OSError:
                return

    def copy_in(self) -> None:
        try:
            fd = os.open(self.stdin_path, os.O_RDONLY)
        except OSError as e:
            log.warning("cannot open stdin %s: %s", self.stdin_path, e)
            return
        try:
            while self.master >= 0:
                data = os.read(fd, 65536)
                if not data:
                    break
                os.write(self.master, data)
        except OSError:
            pass
        finally:
            os.close(fd)

    def finish(self) -> None:
        """The process ended: flush what is left and let go of the FIFO."""
        self.finished.set()
        self.close_listener()
        if self.stdin_path:  # end copy_in's wait for a writer that may never come
            try:
                os.close(os.open(self.stdin_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        if self.got.is_set():
            self.closed.wait(3.0)

    def wait_ready(self, timeout: float) -> Optional[int]:
        return self.master if self.got.wait(timeout) else None


def open_writer(path: str) -> int:
    """The stdout FIFO for writing (its reader, containerd's client, is already there);
    only this fd holds it, so the reader sees end-of-file when the copy ends."""
    if not path:
        return -1
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        return fd
    except OSError:
        try:
            return os.open(path, os.O_RDWR)
        except OSError as e:
            log.warning("cannot open stdout %s: %s", path, e)
            return -1
