"""The hyperstart wire protocol, shared by the host client and the guest agent.

Control channel (virtio-serial port ``sh.hyper.channel.0``): frames of
``code u32 | length u32 | JSON payload``, big-endian, length counting the 8-byte header.
Stream channel (``sh.hyper.channel.1``): frames of ``seq u64 | length u32 | data``,
length counting the 12-byte header; an empty frame is end-of-file for that sequence.

Codes follow hyperstart's api.h. Every command gets exactly one ACK or ERROR, in order;
PROCESSASYNCEVENT is the only frame the guest sends unasked (besides READY).
"""
import struct

from .errors import InvalidArgument

try:  # the C accelerator alone: the json package imports re, which is slow under TCG
    import _json
except ImportError:  # pragma: no cover - every CPython build has it
    _json = None

VERSION = 4242

GETVERSION = 0
STARTPOD = 1
DESTROYPOD = 4
EXECCMD = 6
READY = 8
ACK = 9
ERROR = 10
WINSIZE = 11
PING = 12
NEXT = 14
WRITEFILE = 15
READFILE = 16
NEWCONTAINER = 17
KILLCONTAINER = 18
ONLINECPUMEM = 19
SETUPINTERFACE = 20
SETUPROUTE = 21
REMOVECONTAINER = 22
PROCESSASYNCEVENT = 23
SIGNALPROCESS = 24
DELETEINTERFACE = 25
# runv-py extensions, numbered past hyperstart's range.
PROCESSLIST = 64
RESEED = 65
STARTCONTAINER = 66
STREAMCLOSED = 67
FORWARDPORT = 68
RELEASESHARE = 69
RESETNETWORK = 70
RENAMECONTAINER = 71
WARMUP = 72

CODE_NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int) and k != "VERSION"}

CONTROL_PORT = "sh.hyper.channel.0"
STREAM_PORT = "sh.hyper.channel.1"

CONTROL_HEADER = struct.Struct(">II")
STREAM_HEADER = struct.Struct(">QI")
# A frame larger than this is a corrupt stream, not a message to buffer.
MAX_FRAME = 16 * 1024 * 1024
# Stream payloads are cut to this size so one process cannot hog the channel.
STREAM_CHUNK = 64 * 1024


class ProtocolError(InvalidArgument):
    """The peer sent bytes that are not a valid frame or message. ``frames`` holds the
    complete frames that came before the bad header, for a reader that goes on."""

    def __init__(self, message: str = "", frames=()):
        super().__init__(message)
        self.frames = list(frames)


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__
    memo = {}


def _not_serializable(obj):
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scan = _json.make_scanner(_ScanContext())

    def _encoder(item_separator: str, key_separator: str):
        return _json.make_encoder(None, _not_serializable, _json.encode_basestring_ascii, None,
                                  key_separator, item_separator, False, False, True)
    _compact, _spaced = _encoder(",", ":"), _encoder(", ", ": ")

    def json_dumps(obj, compact: bool = True) -> str:
        """Compact JSON, as json.dumps(obj, separators=(",", ":")) writes it; with
        ``compact=False``, as json.dumps(obj) does (what runc prints)."""
        return "".join((_compact if compact else _spaced)(obj, 0))

    def json_loads(text: str):
        try:
            obj, end = _scan(text.strip(), 0)
        except StopIteration as e:
            raise ValueError(f"expecting a JSON value at {e.value}") from None
        except RecursionError:  # "[[[[...": the C scanner recurses per level
            raise ValueError("JSON nested too deeply") from None
        except SystemError:  # its error needs json.decoder, which we never import
            raise ValueError("invalid JSON") from None
        if end != len(text.strip()):
            raise ValueError(f"extra data at {end}")
        return obj
else:  # pragma: no cover
    import json

    def json_dumps(obj, compact: bool = True) -> str:
        return json.dumps(obj, separators=(",", ":") if compact else None)

    def json_loads(text: str):
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def json_dumps_indented(obj, newline: str = "\n") -> str:
    """As json.dumps(obj, indent=2) writes it (runc's `state`), for dicts, lists and
    scalars: the C encoder cannot indent before Python 3.13. ``newline`` is the line
    break and indentation the enclosing level's items start with."""
    inner = newline + "  "
    if isinstance(obj, dict) and obj:  # keys as json.dumps converts them (1 -> "1")
        items = [json_dumps(k if isinstance(k, str) else json_dumps(k)) + ": "
                 + json_dumps_indented(v, inner) for k, v in obj.items()]
        brackets = "{}"
    elif isinstance(obj, (list, tuple)) and obj:
        items, brackets = [json_dumps_indented(v, inner) for v in obj], "[]"
    else:  # a scalar, or an empty container: "{}", "[]"
        return json_dumps(obj)
    return brackets[0] + inner + ("," + inner).join(items) + newline + brackets[1]


def encode_control(code: int, message=None) -> bytes:
    """One control frame; ``message`` is JSON-encoded (None gives an empty payload)."""
    payload = b"" if message is None else json_dumps(message).encode()
    return CONTROL_HEADER.pack(code, CONTROL_HEADER.size + len(payload)) + payload


def encode_stream(seq: int, data: bytes = b"") -> bytes:
    """One stream frame; empty ``data`` marks end-of-file for ``seq``."""
    return STREAM_HEADER.pack(seq, STREAM_HEADER.size + len(data)) + data


def decode_message(payload: bytes):
    """The JSON message of a control frame (None for an empty payload)."""
    if not payload:
        return None
    try:
        return json_loads(payload.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad JSON in control frame: {e}") from None


class FrameReader:
    """Accumulates bytes and yields complete ``(key, payload)`` frames.

    ``key`` is the code on the control channel and the sequence number on the stream
    channel; which header applies is chosen by ``header``.
    """

    def __init__(self, header: struct.Struct):
        self.header = header
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self.buffer += data
        frames = []
        size = self.header.size
        while len(self.buffer) >= size:
            key, length = self.header.unpack_from(self.buffer)
            if length < size or length > MAX_FRAME:
                # Nothing after a bad header can be framed: drop it, so that the next
                # feed starts afresh (a reader that goes on serving resynchronises).
                self.buffer.clear()
                raise ProtocolError(f"frame length {length} out of range", frames)
            if len(self.buffer) < length:
                break
            frames.append((key, bytes(self.buffer[size:length])))
            del self.buffer[:length]
        return frames


def exit_status(wait_status: int) -> int:
    """A shell-style exit code from a waitpid status: the code, or 128+N for signal N."""
    if wait_status & 0x7F == 0:
        return (wait_status >> 8) & 0xFF
    if wait_status & 0xFF == 0x7F:  # stopped, not exited; callers only pass exits
        return 128 + ((wait_status >> 8) & 0xFF)
    return 128 + (wait_status & 0x7F)
