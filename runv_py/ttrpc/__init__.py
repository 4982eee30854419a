"""ttrpc (containerd's lightweight RPC over unix sockets): a threaded server and a
small client, enough for a shim v2.

Frames are a 10-byte header ``>IIBB`` (payload length without the header, stream id,
type, flags) and a protobuf payload: a Request (type 1) or a Response (type 2). The
peer multiplexes calls on one connection (containerd's Wait blocks for a long time while
other calls go on), so every request runs in its own thread and frames are written under
a lock so that they never interleave.
"""
import logging
import select
import socket
import struct
import threading
from typing import Callable, Dict, Optional, Tuple

from google.protobuf.message import DecodeError

from . import ttrpc_pb2 as pb

log = logging.getLogger("runv_py.ttrpc")

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2

# google.rpc codes that containerd's errdefs maps back to its errors.
OK = 0
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
FAILED_PRECONDITION = 9
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

Handler = Callable[[bytes], bytes]


class TtrpcError(Exception):
    """An error with a google.rpc code, sent back as the Response's status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# How long a client may take to send the rest of a frame it has begun (and the server
# to send an answer).
FRAME_TIMEOUT = 10.0


def recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    """``n`` bytes, or None if the peer closed first."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Optional[Tuple[int, int, int, Optional[bytes]]]:
    """(stream id, type, flags, payload); payload is None when it was over the limit
    (its bytes are read and dropped so the connection stays in step)."""
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    length, stream, kind, flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        left = length
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                return None
            left -= len(chunk)
        return stream, kind, flags, None
    payload = recv_exact(sock, length) if length else b""
    if payload is None:
        return None
    return stream, kind, flags, payload


def decode_request(payload: bytes) -> pb.Request:
    """A frame's Request; TtrpcError(INVALID_ARGUMENT) if the bytes are not one."""
    try:
        return pb.Request.FromString(payload)
    except DecodeError as e:
        raise TtrpcError(INVALID_ARGUMENT, f"cannot decode the request: {e}") from None


def write_frame(sock: socket.socket, lock: threading.Lock, stream: int, kind: int,
                payload: bytes) -> None:
    if len(payload) > MAX_MESSAGE:
        raise TtrpcError(RESOURCE_EXHAUSTED, f"message of {len(payload)} bytes is over the 4 MiB limit")
    with lock:
        sock.sendall(HEADER.pack(len(payload), stream, kind, 0) + payload)


class Server:
    """Serves ``handlers[(service, method)](payload) -> payload`` on a listening socket."""

    def __init__(self, handlers: Dict[Tuple[str, str], Handler]):
        self.handlers = handlers
        self.connections = set()
        self.lock = threading.Lock()
        self.on_close: Optional[Callable[[], None]] = None

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until the listener is closed."""
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections.add(conn)
            threading.Thread(target=self.handle_connection, args=(conn,),
                             name="ttrpc-conn", daemon=True).start()

    def handle_connection(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()
        # Idle as long as the client likes (containerd keeps its connection); a frame
        # once begun must arrive whole in time, or the client is cut off.
        try:
            idle = select.poll()
            idle.register(conn, select.POLLIN)
            conn.settimeout(FRAME_TIMEOUT)
            while True:
                idle.poll()
                frame = read_frame(conn)
                if frame is None:
                    break
                stream, kind, _flags, payload = frame
                if kind != TYPE_REQUEST:
                    continue  # a client sends only requests; ignore anything else
                if payload is None:
                    self.respond(conn, write_lock, stream, None,
                                 TtrpcError(RESOURCE_EXHAUSTED, "request over the 4 MiB limit"))
                    continue
                threading.Thread(target=self.dispatch, args=(conn, write_lock, stream, payload),
                                 name="ttrpc-call", daemon=True).start()
        except OSError:
            pass
        finally:
            with self.lock:
                self.connections.discard(conn)
            conn.close()

    def dispatch(self, conn: socket.socket, write_lock: threading.Lock, stream: int,
                 payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except TtrpcError as e:
            self.respond(conn, write_lock, stream, None, e)
            return
        handler = self.handlers.get((request.service, request.method))
        if handler is None:
            self.respond(conn, write_lock, stream, None, TtrpcError(
                UNIMPLEMENTED, f"{request.service}/{request.method} is not implemented"))
            return
        try:
            result, error = handler(request.payload), None
        except TtrpcError as e:
            result, error = None, e
        except Exception as e:  # a bug must not take the connection down
            log.exception("%s/%s failed", request.service, request.method)
            result, error = None, TtrpcError(UNKNOWN, str(e) or type(e).__name__)
        self.respond(conn, write_lock, stream, result, error)

    def respond(self, conn: socket.socket, write_lock: threading.Lock, stream: int,
                result: Optional[bytes], error: Optional[TtrpcError]) -> None:
        response = pb.Response()
        if error is not None:
            response.status.code = error.code
            response.status.message = error.message
        else:
            response.payload = result or b""
        try:
            write_frame(conn, write_lock, stream, TYPE_RESPONSE, response.SerializeToString())
        except TtrpcError as e:
            self.respond(conn, write_lock, stream, None, e)
        except OSError:
            pass


class Client:
    """A ttrpc client on a unix socket; calls may come from several threads."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.lock = threading.Lock()
        self.next_stream = 1

    def call(self, service: str, method: str, payload: bytes, timeout: float = 10.0) -> bytes:
        """One call, answered before the next starts (enough for publishing events)."""
        request = pb.Request(service=service, method=method, payload=payload,
                             timeout_nano=int(timeout * 1e9))
        with self.lock:
            stream = self.next_stream
            self.next_stream += 2  # client streams are odd
            self.sock.settimeout(timeout)
            write_frame(self.sock, threading.Lock(), stream, TYPE_REQUEST,
                        request.SerializeToString())
            while True:
                frame = read_frame(self.sock)
                if frame is None:
                    raise ConnectionError("the ttrpc server closed the connection")
                got, kind, _flags, data = frame
                if got == stream and kind == TYPE_RESPONSE:
                    break
        try:
            response = pb.Response.FromString(data or b"")
        except DecodeError:
            raise TtrpcError(INTERNAL, "the ttrpc server sent a response that does not decode") from None
        if response.status.code != OK:
            raise TtrpcError(response.status.code, response.status.message)
        return response.payload

    def close(self) -> None:
        self.sock.close()
