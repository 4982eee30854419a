"""The factory's socket protocol: length-prefixed JSON messages, file descriptors beside
a reply (SCM_RIGHTS). Messages are bounded; a malformed one is a WireError."""
import json
import socket
import struct

from ..hyperstart.errors import InvalidArgument

HEADER = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class WireError(InvalidArgument):
    """A message that is not one (too long, truncated, not a JSON object)."""


def send(sock: socket.socket, message: dict, fds=()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    frame = HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv(sock: socket.socket) -> tuple:
    """(message, fds); raises WireError, EOFError when the peer closed at once, or
    socket.timeout per the socket's timeout."""
    buf, fds = b"", []
    need = HEADER.size
    while len(buf) < need:
        data, got, _, _ = socket.recv_fds(sock, need - len(buf), MAX_FDS)
        fds.extend(got)
        if not data:
            _close(fds)
            if not buf:
                raise EOFError("the peer closed the connection")
            raise WireError("truncated message")
        buf += data
        if need == HEADER.size and len(buf) == need:
            (length,) = HEADER.unpack(buf)
            if length > MAX_MESSAGE:
                _close(fds)
                raise WireError(f"message of {length} bytes (at most {MAX_MESSAGE})")
            need += length
    try:
        message = json.loads(buf[HEADER.size:])
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        _close(fds)
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        _close(fds)
        raise WireError("not a JSON object")
    return message, fds


def _close(fds: list) -> None:
    import os
    for fd in fds:
        os.close(fd)
