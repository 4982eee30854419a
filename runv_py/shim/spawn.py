"""Starting a per-sandbox shim and waiting until it has created its container.

A single-threaded caller (the CLI) forks the shim: it is running Python already and the
fork costs nothing. A multi-threaded caller (the 0.2 daemon) must not fork Python, so
it execs ``python -m runv_py.shim``. Either way the shim reports through a pipe, in the
shim protocol's reply format, whether the container exists.
"""
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading

from ..host import proc as hostproc
from ..hyperstart import syscalls
from ..hyperstart.errors import Unavailable
from . import protocol as p
from .params import ShimParams

LOG_FILE = "shim.log"


def spawn(params: ShimParams, timeout: float, stdio_fds=()) -> int:
    """Start the shim for ``params``; returns its pid once its container is created.
    The container's stdio are the caller's fds 0, 1, 2, or ``stdio_fds`` when given. A
    container whose terminal goes to a console socket has no use for them: the shim
    then holds none of the caller's (a caller may wait for its output pipe to close)."""
    devnull = []
    if params.console_socket:
        devnull = [os.open(os.devnull, os.O_RDWR)]
        stdio_fds = devnull * 3
    read_end, write_end = os.pipe()
    try:
        if threading.active_count() == 1:
            pid = _fork(params, stdio_fds, read_end, write_end)
        else:
            pid = _exec(params, stdio_fds, write_end)
    finally:
        os.close(write_end)
        for fd in devnull:
            os.close(fd)
    ready, _, _ = select.select([read_end], [], [], timeout)
    raw = os.read(read_end, 65536) if ready else b""
    os.close(read_end)
    try:
        reply = json.loads(raw) if raw else {"ok": False, "code": "UNAVAILABLE",
                                             "message": "the shim did not answer in time"}
    except ValueError:
        reply = {"ok": False, "code": "INTERNAL", "message": "the shim sent garbage"}
    if not reply.get("ok"):
        hostproc.kill_and_wait(pid)
    p.check(reply)
    return pid


def _fork(params: ShimParams, stdio_fds, read_end: int, write_end: int) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        os.close(read_end)
        if params.die_with_parent:
            syscalls.die_with_parent(signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
        os.setsid()
        for target, fd in enumerate(stdio_fds):
            os.dup2(fd, target)
        # Close the caller's log handlers properly first: a file object closed later by
        # the garbage collector would close whatever fd has taken its number by then.
        for old in logging.getLogger().handlers:
            old.close()
        # Keep only stdio and the report pipe: an inherited lock or socket of the
        # caller must not live on in the shim.
        os.closerange(3, write_end)
        os.closerange(write_end + 1, 65536)
        status = serve(params, write_end)
    finally:
        os._exit(status)


def _exec(params: ShimParams, stdio_fds, write_end: int) -> int:
    stdio = dict(zip(("stdin", "stdout", "stderr"), stdio_fds))
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "runv_py.shim", "--report-fd", str(write_end),
             "--params", params.to_json()],
            pass_fds=(write_end,), start_new_session=True, **stdio)
    except OSError as e:
        raise Unavailable(f"cannot start the shim: {e}") from None
    return child.pid


def serve(params: ShimParams, report_fd: int) -> int:
    """Run the shim in this process (logging to shim.log); returns its exit status."""
    from ..host.privileges import confine_shim
    from ..logs import handler
    from .server import ShimServer
    root = logging.getLogger()
    root.handlers = [handler(params.log_file or os.path.join(params.state_dir, LOG_FILE),
                             params.log_format)]
    root.setLevel(logging.INFO)
    try:
        if params.driver != "namespace":  # its agent, on the host, grants containers caps
            confine_shim()  # before any thread starts
        server = ShimServer(params)
    except Exception as e:
        os.write(report_fd, p.error(e))
        return 1
    status = server.run(report_fd)
    if server.exit_signal:
        end_by_signal(server.exit_signal)
    return status


# Signals whose default action does not end a process: none of them can have ended one.
NOT_ENDING = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGSTOP,
              signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def end_by_signal(signum: int) -> None:
    """End this process (the shim, or a detached exec's holder) by the signal that ended
    the container process it stands for (a no-op for a signal that cannot have): the pid
    runv-py reports is this one, and whoever waits for it as its subreaper (buildah,
    conmon) must see a process killed by that signal, as runc's reported pid, the
    container process's own, is. No core file is written. Main thread only."""
    if not 0 < signum < signal.NSIG or signum in NOT_ENDING:
        return
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    if signum != signal.SIGKILL:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    signal.raise_signal(signum)  # to this thread: it ends the process before returning
