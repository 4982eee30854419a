"""Clients of containerd's CRI streaming server (the URLs that CRI Exec, Attach and
PortForward return), over WebSocket as kubelet's streaming server accepts it and newer
kubectl speaks it (websocket-client, the `test` extra).

The subprotocol is ``v4.channel.k8s.io``: every binary message starts with one channel
byte. Exec and attach: 0 stdin, 1 stdout, 2 stderr (both from the server), 3 the
status (a JSON metav1.Status when the process ends: ``{"status": "Success"}``, or
``"Failure"`` with reason ``NonZeroExitCode`` and the code as the message of the
``ExitCode`` cause), 4 resize (``{"Width": w, "Height": h}`` from the client). The
server first sends an empty message on stdout to say the streams are ready.
Port-forward: the ports are ``?port=N`` query parameters; port i has a data channel 2i
(both ways) and an error channel 2i+1 (text, from the server); the server's first
message on each carries the port as 2 bytes little-endian.

Every read has a deadline; a read past it raises ``StreamTimeout`` with what had come.
"""
import json
import struct
import time
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

import websocket

CHANNEL_PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


class StreamTimeout(AssertionError):
    """A read outlived its deadline; ``received`` is what each channel had."""

    def __init__(self, what: str, received: Dict[int, bytes]):
        super().__init__(f"timed out waiting for {what}; received {received!r}")
        self.received = received


class PortForwardError(Exception):
    """The server wrote on a port's error channel (containerd could not forward)."""


class ChannelSocket:
    """One WebSocket with the channel protocol: frames in, per-channel buffers out."""

    def __init__(self, url: str, timeout: float = 30):
        parts = urllib.parse.urlsplit(url)
        ws_url = urllib.parse.urlunsplit(
            ({"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme),) + tuple(parts[1:]))
        # Never through a proxy from the environment: the server is on loopback.
        self.ws = websocket.create_connection(ws_url, timeout=timeout,
                                              subprotocols=[CHANNEL_PROTOCOL],
                                              http_no_proxy=["*"])
        self.protocol = self.ws.getsubprotocol()
        self.timeout = timeout
        self.buffers: Dict[int, bytearray] = {}
        self.frames: Dict[int, int] = {}      # channel -> messages received on it
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close as a client should: send the close message and wait for the server's.
        The server answers it only after what came before it has been taken in; a
        socket closed sooner is reset, and the server drops what it had not read yet
        (stdin that a slow process had not taken)."""
        try:
            self.ws.close(timeout=self.timeout)
        except (websocket.WebSocketException, OSError):
            pass  # the server had closed it

    def send(self, channel: int, data: bytes) -> None:
        self.ws.send_binary(bytes([channel]) + data)

    def received(self) -> Dict[int, bytes]:
        return {ch: bytes(buf) for ch, buf in self.buffers.items()}

    def pump(self, deadline: float) -> bool:
        """Take one message into its channel's buffer; False once the server closed.
        Raises StreamTimeout at ``deadline``."""
        if self.closed:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeout("a message", self.received())
        self.ws.settimeout(remaining)
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            raise StreamTimeout("a message", self.received()) from None
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            self.closed = True
            return False
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            return False
        if data:
            channel = data[0]
            self.frames[channel] = self.frames.get(channel, 0) + 1
            self.buffers.setdefault(channel, bytearray()).extend(data[1:])
        return True


class RemoteCommand(ChannelSocket):
    """A streaming exec or attach."""

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait for the server's first message (empty, on its lowest writable channel:
        the streams are set up)."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            if not self.pump(deadline):
                raise StreamTimeout("the ready message (the stream closed)", self.received())

    def write(self, data) -> None:
        self.send(STDIN, data.encode() if isinstance(data, str) else data)

    def resize(self, width: int, height: int) -> None:
        self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def read_until(self, marker, channel: int = STDOUT, timeout: float = 30) -> bytes:
        """Read until ``marker`` is in ``channel``'s output; returns that output up to
        and including the marker, and keeps the rest for the next read."""
        marker = marker.encode() if isinstance(marker, str) else marker
        deadline = time.monotonic() + timeout
        while True:
            buf = self.buffers.setdefault(channel, bytearray())
            at = buf.find(marker)
            if at >= 0:
                out = bytes(buf[:at + len(marker)])
                del buf[:at + len(marker)]
                return out
            if not self.pump(deadline):
                raise StreamTimeout(f"{marker!r} (the stream closed)", self.received())

    def status(self, timeout: float = 30) -> dict:
        """The status the server sends when the process ends (its JSON), waiting for
        it (or for the server to close the stream, then ``{}`` if none came)."""
        deadline = time.monotonic() + timeout
        while True:
            raw = bytes(self.buffers.get(ERROR, b""))
            if raw:
                try:
                    return json.loads(raw)
                except ValueError:
                    pass  # not all of it yet
            if not self.pump(deadline):
                return json.loads(raw) if raw else {}

    def exit_code(self, timeout: float = 30) -> int:
        """The process's exit code, from the status: 0 for Success, the ExitCode
        cause's for NonZeroExitCode; anything else is an AssertionError."""
        status = self.status(timeout)
        if status.get("status") == "Success":
            return 0
        causes = (status.get("details") or {}).get("causes") or []
        codes = [int(c["message"]) for c in causes if c.get("reason") == "ExitCode"]
        if status.get("reason") != "NonZeroExitCode" or len(codes) != 1:
            raise AssertionError(f"no exit code in the status {status!r}")
        return codes[0]


class PortForward(ChannelSocket):
    """A streaming port-forward of ``ports`` (one connection to each in the pod)."""

    def __init__(self, url: str, ports: Sequence[int], timeout: float = 30):
        query = urllib.parse.urlencode([("port", str(p)) for p in ports])
        super().__init__(f"{url}{'&' if '?' in url else '?'}{query}", timeout)
        self.ports: List[int] = list(ports)
        self.deadline_default = timeout
        self.prefixed: Dict[int, bool] = {}

    def _take_prefix(self, channel: int, port: int) -> None:
        """Each channel's first 2 bytes name its port (little-endian)."""
        buf = self.buffers.get(channel, bytearray())
        if not self.prefixed.get(channel) and len(buf) >= 2:
            (got,) = struct.unpack("<H", bytes(buf[:2]))
            if got != port:
                raise AssertionError(f"channel {channel} is for port {got}, not {port}")
            del buf[:2]
            self.prefixed[channel] = True

    def wait_ready(self, index: int = 0, timeout: float = 30) -> None:
        """Wait for the port prefixes on the data and error channels of port ``index``."""
        data, error = 2 * index, 2 * index + 1
        deadline = time.monotonic() + timeout
        while True:
            for ch in (data, error):
                self._take_prefix(ch, self.ports[index])
            if self.prefixed.get(data) and self.prefixed.get(error):
                return
            if not self.pump(deadline):
                raise StreamTimeout("the port prefixes (the stream closed)", self.received())

    def exchange(self, request: bytes, index: int = 0, timeout: float = 30,
                 complete=None) -> bytes:
        """Send ``request`` to port ``index`` and read its reply until the server closes
        the stream or ``complete(reply)`` is true. The error channel's text, if any,
        raises PortForwardError."""
        self.wait_ready(index, timeout)
        data, error = 2 * index, 2 * index + 1
        self.send(data, request)
        deadline = time.monotonic() + timeout
        while True:
            if self.buffers.get(error):
                raise PortForwardError(bytes(self.buffers[error]).decode(errors="replace"))
            reply = bytes(self.buffers.get(data, b""))
            if complete is not None and complete(reply):
                return reply
            if not self.pump(deadline):
                if self.buffers.get(error):
                    raise PortForwardError(bytes(self.buffers[error]).decode(errors="replace"))
                return reply


def parse_http_response(raw: bytes, final: bool = False
                        ) -> Optional[Tuple[int, Dict[str, str], bytes]]:
    """(status, headers, body) once ``raw`` holds a whole response (by its
    Content-Length; without one, only when ``final``: the connection closed), None
    before."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is None and not final or length is not None and len(body) < int(length):
        return None
    return status, headers, body


def http_get(url: str, port: int, path: str = "/", timeout: float = 30) -> Tuple[int, bytes]:
    """GET ``path`` from ``port`` in the pod through a port-forward URL: (status, body).
    HTTP/1.0, so the server closes the connection after its reply."""
    request = (f"GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\n"
               "User-Agent: runv-py-tests\r\nConnection: close\r\n\r\n").encode()
    with PortForward(url, [port], timeout) as forward:
        raw = forward.exchange(request, timeout=timeout,
                               complete=lambda r: parse_http_response(r) is not None)
    parsed = parse_http_response(raw, final=True)
    if parsed is None:
        raise AssertionError(f"no whole HTTP response through the forward: {raw!r}")
    status, _, body = parsed
    return status, body
