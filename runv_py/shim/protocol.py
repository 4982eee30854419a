"""The per-sandbox shim's socket protocol (``shim.sock`` in the state directory), shared
by the shim's server and its clients.

A request is one JSON line ``{"op": NAME, ...fields}``; file descriptors (an exec's
stdin, stdout and stderr) travel with it as SCM_RIGHTS. Answers are JSON lines:
``{"ok": true, ...}``, or ``{"ok": false, "code": CODE, "message": TEXT}`` where CODE is
one of hyperstart.errors' codes, so the client raises the same error class the shim
caught. ``Exec`` and ``Wait`` answer twice: once accepted (``pid``), once more when the
process has exited (``exit``).
"""
import dataclasses
import json
import os
import socket
import time
from typing import ClassVar, Dict, Optional, Type, get_args

from ..hyperstart.errors import InvalidArgument, RunvError, code_of, from_code

REQUESTS: Dict[str, Type["Request"]] = {}


def request(op: str):
    def register(cls):
        cls = dataclasses.dataclass(cls)
        cls.OP = op
        REQUESTS[op] = cls
        return cls
    return register


@dataclasses.dataclass
class Request:
    OP: ClassVar[str] = ""
    container: str = ""


@request("start")
class Start(Request):
    pass


@request("kill")
class Kill(Request):
    signal: int = 15
    all: bool = False


@request("signal")
class Signal(Request):
    """Signal one process (exec_id "" is the container's init)."""
    exec_id: str = ""
    signal: int = 15


@request("pause")
class Pause(Request):
    pass


@request("resume")
class Resume(Request):
    pass


@request("ps")
class Ps(Request):
    pass


@request("winsize")
class Winsize(Request):
    exec_id: str = ""
    rows: int = 24
    cols: int = 80


@request("close_stdin")
class CloseStdin(Request):
    exec_id: str = ""


@request("stats")
class Stats(Request):
    pass


@request("update")
class Update(Request):
    resources: Optional[dict] = None      # OCI LinuxResources


@request("exec")
class Exec(Request):
    """Run ``process`` (OCI JSON); its stdio are the three fds sent along, or a pty whose
    master goes to ``console_socket``."""
    exec_id: str = ""
    process: Optional[dict] = None
    console_socket: str = ""


@request("wait")
class Wait(Request):
    exec_id: str = ""


@request("shutdown")
class Shutdown(Request):
    """End the sandbox now (its containers stop as if the VM died)."""


@request("checkpoint")
class Checkpoint(Request):
    """Save the sandbox's VM into the state file whose fd comes along (sandbox/
    checkpoint.py); the container stops, as runc's does, unless ``leave_running``."""
    leave_running: bool = False


@request("join")
class Join(Request):
    """Create ``container`` in this sandbox's VM, a pod member (shim/member.py): its
    spec is ``bundle``'s, its host pid ``pid``; four fds come along: its stdin, stdout
    and stderr and its rootfs as a detached mount tree (the member's mount namespace
    has mounts this one may lack)."""
    bundle: str = ""
    pid: int = 0


@request("leave")
class Leave(Request):
    """Remove the pod member ``container`` from this sandbox's VM."""


def encode(req: Request) -> bytes:
    return json.dumps(dict(dataclasses.asdict(req), op=req.OP)).encode() + b"\n"


def decode(line: bytes) -> Request:
    """The request in one line; InvalidArgument for anything but a known op whose fields
    have the types its class declares (a handler may trust them)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"bad shim request: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("bad shim request: not a JSON object")
    op = data.pop("op", None)
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise InvalidArgument(f"bad shim request: unknown op {op!r}")
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in kinds:
            raise InvalidArgument(f"bad shim request: {op} has no field {name!r}")
        if not _is_a(value, kinds[name]):
            names = [k.__name__ for k in get_args(kinds[name]) or (kinds[name],)]
            raise InvalidArgument(f"bad shim request: {op}.{name} must be "
                                  + " or ".join(names).replace("NoneType", "null"))
    return cls(**data)


def _is_a(value, kind) -> bool:
    if kind is int:  # JSON's true is not a number
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return any(_is_a(value, k) for k in get_args(kind))  # Optional[X]: X or NoneType


def ok(**fields) -> bytes:
    return json.dumps(dict(fields, ok=True)).encode() + b"\n"


def error(exc: BaseException) -> bytes:
    message = str(exc) if isinstance(exc, RunvError) else f"{type(exc).__name__}: {exc}"
    return json.dumps({"ok": False, "code": code_of(exc), "message": message}).encode() + b"\n"


def check(reply: dict) -> dict:
    """The reply, or the error it carries raised as its class."""
    if not reply.get("ok"):
        raise from_code(reply.get("code", ""), reply.get("message", "the shim failed"))
    return reply


def recv_request(conn: socket.socket, max_size: int, timeout: float):
    """One request and the fds sent with it (at most 4), read within ``timeout`` (which
    then bounds the answers' sends too); InvalidArgument for a late, oversized or
    malformed one, whose fds are closed."""
    conn.settimeout(timeout)
    deadline = time.monotonic() + timeout
    fds = []
    try:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, max_size + 1, 4)
            while data and not data.endswith(b"\n") and len(data) <= max_size:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                more = conn.recv(max_size + 1 - len(data))
                if not more:
                    break
                data += more
        except TimeoutError:
            raise InvalidArgument(f"no complete request within {timeout:.0f}s") from None
        conn.settimeout(timeout)
        if len(data) > max_size:
            raise InvalidArgument(f"a request is at most {max_size} bytes")
        return decode(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def send(sock: socket.socket, data: bytes, fds=()) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def refuse(conn: socket.socket, exc: BaseException) -> None:
    """Answer ``exc`` without reading the request (an accept loop must not wait)."""
    try:
        conn.setblocking(False)
        conn.send(error(exc))
    except OSError:
        pass
    conn.close()
