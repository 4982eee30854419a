"""A container's recorded state (state.json) and runc's state JSON built from it.

The shim writes state.json at every transition; CLI calls read it and check that the
shim still lives (same pid and start time), so a killed shim reads as ``stopped``.
"""
import fcntl
import json
import os
import socket
import time

from . import statedir

STATE_FILE = "state.json"
SHIM_SOCKET = "shim.sock"
LOCK_FILE = ".lock"
OCI_VERSION = "1.0.2-dev"


class NotFound(Exception):
    pass


def now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def process_start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot ('' if it is gone): with the pid
    it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2:].split()[19]
    except (OSError, IndexError):
        return ""


def write(path: str, record: dict) -> None:
    tmp = os.path.join(path, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(path, STATE_FILE))


def read(root: str, cid: str) -> dict:
    path = statedir.container_dir(root, cid)
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"container {cid!r} does not exist") from None
    except (OSError, ValueError):
        # A half-created container (create crashed) is reported as stopped.
        return {"id": cid, "status": "stopped", "pid": 0, "bundle": "", "path": path}
    record["path"] = path
    if record.get("status") != "stopped" and not shim_alive(record):
        record["status"] = "stopped"
    return record


def shim_alive(record: dict) -> bool:
    """The shim still runs (a zombie waiting for its parent to reap it does not)."""
    pid = record.get("shim_pid") or 0
    if pid <= 0 or process_start_time(pid) != record.get("shim_start", ""):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2] not in "ZX"
    except OSError:
        return False


def oci_state(record: dict) -> dict:
    """runc's `state` JSON."""
    status = record.get("status", "stopped")
    return {
        "ociVersion": OCI_VERSION,
        "id": record["id"],
        "pid": record.get("pid", 0) if status != "stopped" else 0,
        "status": status,
        "bundle": record.get("bundle", ""),
        "rootfs": record.get("rootfs", ""),
        "created": record.get("created", ""),
        "owner": record.get("owner", ""),
        "annotations": record.get("annotations") or {},
    }


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
        try:
            self.fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            return self  # the container is gone; the caller will find out
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("another runv-py call holds this container for too long")
                time.sleep(0.01)

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def connect_unix(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to a unix socket whatever the length of its path (via an O_PATH fd)."""
    dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
        return sock
    finally:
        os.close(dirfd)
