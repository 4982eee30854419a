"""Terminals on the host side of a shim: a pty whose master goes to a console socket
(as runc hands it over), and the size of a terminal."""
import os
import socket
from typing import Optional, Tuple

from ..hyperstart.errors import Unavailable
from .records import connect_unix


def host_pty(console_socket: str, controlling: bool = False) -> int:
    """A host pty whose master goes to ``console_socket`` (SCM_RIGHTS, as runc does);
    returns the slave, which the shim bridges to the guest's own pty. As the shim's
    controlling terminal, the slave brings it SIGWINCH when the caller resizes."""
    import fcntl
    import termios
    import tty
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        if controlling:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        with connect_unix(console_socket) as sock:
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except BaseException as e:
        os.close(slave)  # whatever failed: neither end outlives the set-up
        if isinstance(e, OSError):
            raise Unavailable(f"cannot set up the console for {console_socket}: {e}") from None
        raise
    finally:
        os.close(master)
    return slave


def terminal_size(fd: int = 0) -> Optional[Tuple[int, int]]:
    """(rows, columns) of the terminal on ``fd``; None if unknown (a 0x0 pty too)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return (size.lines, size.columns) if size.lines and size.columns else None
