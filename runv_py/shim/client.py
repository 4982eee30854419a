"""The client side of shim.sock: how everything outside a per-sandbox shim (the CLI,
the 0.2 daemon) reaches a sandbox. Errors come back as the classes the shim raised."""
import json
import socket
from typing import Optional, Tuple

from ..hyperstart.errors import Unavailable
from . import protocol as p
from .records import Record, connect_unix


class Connection:
    """A connection to a shim; answers are JSON lines, and several may arrive at once."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def settimeout(self, timeout) -> None:
        self.sock.settimeout(timeout)

    def read(self) -> Optional[dict]:
        """The next answer, or None if the shim closed the connection or went silent."""
        try:
            line = self.reader.readline()
        except (socket.timeout, OSError):
            return None
        return json.loads(line) if line.endswith(b"\n") else None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class ShimClient:
    """Requests to the shim serving ``record``'s container."""

    def __init__(self, record: Record, timeout: float = 60.0):
        self.record = record
        self.timeout = timeout

    def open(self, req: p.Request, fds=()) -> Tuple[dict, Connection]:
        """Send ``req``; returns its first answer and the connection (for a second one)."""
        req.container = req.container or self.record.id
        try:
            sock = connect_unix(self.record.socket, timeout=5)
        except OSError:
            raise Unavailable(f"container {self.record.id} is not running "
                              "(its shim is gone)") from None
        sock.settimeout(self.timeout)
        conn = Connection(sock)
        try:
            p.send(sock, p.encode(req), fds)
            reply = conn.read()
            if reply is None:
                raise Unavailable(f"the shim of {self.record.id} closed the connection")
            p.check(reply)
        except BaseException:
            conn.close()
            raise
        return reply, conn

    def call(self, req: p.Request, fds=()) -> dict:
        reply, conn = self.open(req, fds)
        conn.close()
        return reply
