"""Host processes as the runtime tracks them: a pid plus its start time identifies a
process even after the pid is reused."""
import os
import time


def start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2:].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, started: str = "") -> bool:
    """``pid`` runs (a zombie does not), and is the process that started at ``started``."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    if started and (len(fields) < 20 or fields[19] != started):
        return False
    return fields[0] not in "ZX"


def kill_and_wait(pid: int, started: str = "", timeout: float = 5.0) -> None:
    """SIGKILL ``pid`` (if it is still the process that started at ``started``) and
    wait until it is gone, reaping it if it is our child. A pid of 0 or less (a record
    written before its process started) names no process: waitpid would take it for a
    process group and reap any child of ours, stealing the status its waiter expects."""
    if pid <= 0:
        return
    if not alive(pid, started):
        if not started or start_time(pid) in ("", started):
            _reap(pid)  # our zombie, not a new child that got the pid since
        return
    import signal  # imports enum: not for the commands that only read records
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, timeout)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie has); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def _reap(pid: int) -> None:
    if pid <= 0:
        return  # waitpid(0 or -N) would reap any child of a process group
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
