"""A container's record (state.json in its state directory), written by its shim.

The shim rewrites the record at every transition; CLI calls read it without waking the
shim and check that the shim still lives (same pid and start time), so a killed shim
reads as ``stopped``. A lock file serialises CLI calls on one container.

`runv-py state` and `list` read records at every call of the tools that poll them: what
only locks or connects (fcntl, socket) is imported where it is used.
"""
from __future__ import annotations  # annotations stay text: typing is not imported

import os

from ..host import proc, statedir
from ..hyperstart import states
from ..hyperstart.errors import NotFound
from ..hyperstart.protocol import json_dumps, json_loads  # json's decoder imports re
from ..oci.state import oci_state

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import socket

STATE_FILE = "state.json"
SHIM_SOCKET = "shim.sock"
LOCK_FILE = ".lock"
LOCK_TIMEOUT = 120.0

# A record's fields after its id, as state.json holds them, with their defaults (dict
# and list: a new empty one for each record). A table, not a dataclass: dataclasses
# imports inspect, which costs more than a `runv-py state`.
FIELDS = {
    "status": states.STOPPED,
    "pid": 0,                     # the container's host pid: its shim
    "bundle": "",
    "rootfs": "",
    "created": "",
    "owner": "",
    "annotations": dict,          # str -> str
    "shim_pid": 0,
    "shim_start": "",
    "qemu_pid": 0,
    "started": "",
    "finished": "",
    "exit_status": None,          # int, once the container has exited
    "oom_killed": False,
    "host_cgroups": list,         # cgroupsPath dirs (str)
    "netns": "",                  # the pod's network namespace, if it has one
    "sandbox": "",                # a pod member's: the container whose VM holds it
    "taps": list,                 # our VM's taps in it (what redirects to them is ours)
    "execs": dict,                # exec id -> guest pid
    "exec_exits": dict,           # exec id -> exit status
}


class Record:
    """A container's record: ``id``, the FIELDS, and ``path``, its state directory (not
    stored). ``Record(id=..., **fields)`` as a dataclass would take them."""

    __slots__ = ("id", *FIELDS, "path")

    def __init__(self, id: str, *, path: str = "", **fields) -> None:
        unknown = fields.keys() - FIELDS.keys()
        if unknown:
            raise TypeError(f"Record() got unexpected fields: {', '.join(sorted(unknown))}")
        self.id, self.path = id, path
        for name, default in FIELDS.items():
            if name in fields:
                setattr(self, name, fields[name])
            else:
                setattr(self, name, default() if isinstance(default, type) else default)

    def stored(self) -> dict:
        """What state.json holds: every field but ``path``."""
        return {name: getattr(self, name) for name in ("id", *FIELDS)}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.stored().items())
        return f"Record({fields}, path={self.path!r})"

    def __eq__(self, other) -> bool:
        if type(other) is not Record:
            return NotImplemented
        return (self.stored(), self.path) == (other.stored(), other.path)

    @property
    def shim_alive(self) -> bool:
        return proc.alive(self.shim_pid, self.shim_start)

    @property
    def socket(self) -> str:
        return os.path.join(self.path, SHIM_SOCKET)

    def oci_state(self) -> dict:
        return oci_state(self.id, self.status, self.pid, self.bundle, self.rootfs, self.created,
                         self.owner, self.annotations)

    def write(self) -> None:
        tmp = os.path.join(self.path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json_dumps(self.stored(), compact=False))
        os.replace(tmp, os.path.join(self.path, STATE_FILE))


def read(root: str, cid: str) -> Record:
    """The record of ``cid``; NotFound if there is none. A record whose shim is gone
    reads as stopped, and so does a half-written one (create crashed)."""
    path = statedir.container_dir(root, cid)
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            data = json_loads(f.read())
        if not isinstance(data, dict):
            raise TypeError("state.json holds no object")
        record = Record(**{k: v for k, v in data.items() if k == "id" or k in FIELDS})
    except FileNotFoundError:
        if os.path.isdir(path):  # created right now, or a create that crashed
            return Record(id=cid, path=path)
        raise NotFound(f"container {cid!r} does not exist") from None
    except (OSError, ValueError, TypeError):
        return Record(id=cid, path=path)
    record.path = path
    if record.status != states.STOPPED and not record.shim_alive:
        record.status = states.STOPPED
    return record


def list_ids(root: str) -> list:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE))]


class Lock:
    """Serialises CLI calls on one container (flock on a file in its directory)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self):
        from ..host.flock import lock
        try:
            self.fd = lock(os.path.join(self.path, LOCK_FILE), LOCK_TIMEOUT,
                           "another runv-py call holds this container for too long")
        except FileNotFoundError:
            pass  # the container is gone; the caller will find out
        return self

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def connect_unix(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to a unix socket whatever the length of its path (via an O_PATH fd)."""
    import socket
    dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
        return sock
    finally:
        os.close(dirfd)
