"""The shim v2's fork server: one process per node that has imported what a pod's
daemon needs and forks one daemon per pod.

Why: a daemon started from scratch pays the interpreter's start and its imports (about
0.15 s here) on every RunPodSandbox, and holds its own copy of every module (16 MiB of
PSS per pod). Forked from here, the modules are copy-on-write pages shared by all the
daemons; ``gc.freeze`` keeps the collector from writing to them. Each pod still has a
process of its own, so one daemon's crash takes no other pod with it.

- The server is single-threaded: its children run Python after fork, which a threaded
  process must not do. It forks twice, so daemons are not its children and outlive it.
- ``start`` sends the daemon's flags, its environment and cgroup, the bundle and the
  bound listener (SCM_RIGHTS); the daemon answers with its pid, then serves.
- A zygote whose code changed on disk since it loaded refuses and exits; ``start``
  then starts the daemon as before (one log line in its log) and a fresh zygote.
- Its socket is root's only (0600 in a 0700 directory); callers' uid is checked too.
"""
import logging
import os
import socket
import subprocess
import sys
from typing import List, Optional

from .. import paths
from ..factory import wire

log = logging.getLogger("runv_py.shimv2")

ZYGOTE_DIR = os.environ.get("RUNVPY_ZYGOTE_DIR", os.path.join(paths.STATE_ROOT, "shimv2"))
SOCKET = os.path.join(ZYGOTE_DIR, "zygote.sock")
LOCK = os.path.join(ZYGOTE_DIR, "zygote.lock")
LOG = os.path.join(ZYGOTE_DIR, "zygote.log")
REPLY_TIMEOUT = 10.0
TITLE_ROOM = 2048   # bytes of argv the zygote keeps for its daemons' command lines
COLD_REASON = "RUNVPY_SHIM_COLD_REASON"
forked_from = 0     # in a forked daemon: the zygote's pid
# Read once, when a module is imported (tests/test_structure.py keeps this list whole):
# a daemon forked from here has the zygote's values, so a caller with others gets a
# daemon of its own.
IMPORT_TIME_ENV = ("RUNV_CACHE", "RUNV_BOOT_TIMEOUT", "RUNV_FACTORY_DIR", "RUNV_TB_SIZE",
                   "RUNV_VIRTFS_PROXY", "RUNV_VIRTIOFSD", "RUNVPY_ZYGOTE_DIR")


def enabled() -> bool:
    """On unless ``RUNV_SHIM_ZYGOTE=off`` or ``shim_zygote = false`` in the settings."""
    from ..settings import switch
    return switch("RUNV_SHIM_ZYGOTE", "shim_zygote", True)


def spawn(argv: List[str], listener: int, bundle: str) -> int:
    """A daemon forked by the zygote serving ``listener``: its pid, or 0 with the reason
    in the environment for a daemon started the slow way (no zygote, or a stale one)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(SOCKET)
    except OSError as e:
        sock.close()
        start_server()
        os.environ[COLD_REASON] = f"no shim fork server ({e.strerror}): started one"
        return 0
    with sock:
        with open("/proc/self/cgroup") as f:
            cgroups = f.read()
        wire.send(sock, {"argv": argv, "cwd": bundle, "env": dict(os.environ),
                         "cgroups": cgroups}, [listener])
        reply, _ = wire.recv(sock)
    if reply.get("pid"):
        return int(reply["pid"])
    if reply.get("stale"):
        start_server()
    os.environ[COLD_REASON] = f"the shim fork server refused: {reply.get('reason')}"
    return 0


def start_server() -> None:
    """Start a zygote in the background (it exits at once if one runs already)."""
    os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
    room = "-title-room=" + "." * TITLE_ROOM
    with open(LOG, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "runv_py.shimv2", "zygote", room],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True, cwd="/")


def stop_server(timeout: float = 10.0) -> bool:
    """Ask the zygote to exit; False if none answered."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(SOCKET)
            wire.send(sock, {"op": "stop"})
            wire.recv(sock)
        return True
    except (OSError, EOFError, wire.WireError):
        return False


def running() -> bool:
    return os.path.exists(SOCKET)


def serve() -> int:
    """The zygote's loop: one request at a time, each answered by a fork."""
    import fcntl
    import gc
    os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another zygote serves the node
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s zygote: %(message)s")
    preload()
    stamp = code_stamp()
    set_title([sys.executable, "-m", "runv_py.shimv2", "zygote"])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.unlink(SOCKET)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server.bind(SOCKET)
    finally:
        os.umask(old)
    server.listen(64)
    gc.collect()
    gc.freeze()  # what is loaded now stays shared with every daemon
    log.info("serving on %s", SOCKET)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                if not answer(conn, server, stamp):
                    return 0
    finally:
        try:
            os.unlink(SOCKET)
        except FileNotFoundError:
            pass


def answer(conn: socket.socket, server: socket.socket, stamp: dict) -> bool:
    """Serve one request; False when the zygote should exit."""
    conn.settimeout(5.0)
    fds: list = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) != 0:
            raise wire.WireError("only root may ask for a shim")
        request, fds = wire.recv(conn)
        if request.get("op") == "stop":
            wire.send(conn, {"ok": True})
            log.info("stopping, as asked")
            return False
        if code_stamp() != stamp:
            wire.send(conn, {"reason": "runv-py's code changed since it started: exiting",
                             "stale": True})
            log.info("runv-py's code changed on disk: exiting")
            return False
        if len(fds) != 1 or not isinstance(request.get("argv"), list) or \
                not isinstance(request.get("env"), dict):
            raise wire.WireError("a request carries argv, env and one listener")
        differ = [k for k in IMPORT_TIME_ENV if request["env"].get(k) != os.environ.get(k)]
        if differ:
            wire.send(conn, {"reason": f"the caller's {', '.join(differ)} differ from the "
                                       "server's"})
            return True
        fork_daemon(request, fds[0], conn, server)
    except (OSError, EOFError, wire.WireError) as e:
        log.warning("request refused: %s", e)
        try:
            wire.send(conn, {"reason": str(e)})
        except OSError:
            pass
    finally:
        for fd in fds:
            os.close(fd)
    return True


def fork_daemon(request: dict, listener: int, conn: socket.socket,
                server: socket.socket) -> None:
    import threading
    assert threading.active_count() == 1, "the zygote must stay single-threaded"
    zygote_pid = os.getpid()
    middle = os.fork()
    if middle:
        os.waitpid(middle, 0)  # it exits as soon as it has forked the daemon
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        server.close()
        code = run_daemon(request, listener, conn, zygote_pid)
    except BaseException:  # nothing of a child may return into the zygote's loop
        logging.getLogger().exception("the forked daemon failed")
        code = 1
    os._exit(code)


def run_daemon(request: dict, listener: int, conn: socket.socket, zygote_pid: int) -> int:
    """In the forked daemon: the environment ``start`` would have given it, then serve."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir(request.get("cwd") or "/")
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    join_cgroups(str(request.get("cgroups") or ""))
    argv = [str(a) for a in request["argv"]] + ["-socket", str(listener), "serve"]
    global forked_from
    forked_from = zygote_pid
    wire.send(conn, {"pid": os.getpid()})
    conn.close()
    set_title([sys.executable, "-m", "runv_py.shimv2", *argv])
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers = []
    from .main import Flags, serve as serve_daemon
    return serve_daemon(Flags(argv))


def join_cgroups(cgroups: str) -> None:
    """The cgroups of the ``start`` that asked (where a daemon it started would be)."""
    unified = ("/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.controllers")
               else "/sys/fs/cgroup/unified")
    for line in cgroups.splitlines():
        _, controllers, where = line.split(":", 2)
        base = f"/sys/fs/cgroup/{controllers.replace('name=', '')}" if controllers else unified
        try:
            with open(os.path.join(base + where, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass  # not mounted there: the daemon stays in the zygote's


def preload() -> None:
    """What a daemon imports, loaded before the zygote forks."""
    from ..drivers import probe  # noqa: F401
    from ..factory import client  # noqa: F401
    from ..sandbox import private_mount_namespace  # noqa: F401
    from ..vm.boot import BootConfig  # noqa: F401
    from . import config, service  # noqa: F401
    import qemu.qmp.legacy  # noqa: F401  (a pooled VM is resumed over QMP: asyncio, ssl)


def code_stamp() -> dict:
    """(mtime, size) of every runv-py module loaded: a reinstall or an edit changes it."""
    stamp = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.startswith("runv_py"):
            try:
                st = os.stat(path)
                stamp[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp[path] = None
    return stamp


def set_title(argv: List[str]) -> None:
    """Rewrite this process's command line in place (ps, pgrep -f), as setproctitle
    does: within the room its own argv had; the last byte stays NUL."""
    import ctypes
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])   # arg_start, arg_end (proc(5))
    data = b"\0".join(a.encode() for a in argv)[:end - start - 1]
    data += b"\0" * (end - start - len(data))
    ctypes.memmove(start, data, len(data))


def pid_of_server() -> Optional[int]:
    """The running zygote's pid (for status and tests), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(SOCKET)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(creds[0:4], sys.byteorder)
    except OSError:
        return None
