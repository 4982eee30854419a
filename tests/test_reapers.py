"""Reapers take only their own children: a status another waiter expects (a hook's, run
by subprocess in the same process) must reach that waiter."""
import os
import subprocess
import threading
import time

from runv_py.containerd02.server import reap_children
from runv_py.host import proc as hostproc


def zombie(code: int) -> subprocess.Popen:
    """A child of ours that has exited with ``code`` and is not reaped yet."""
    child = subprocess.Popen(["sh", "-c", f"exit {code}"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


def test_kill_and_wait_of_pid_0_reaps_nothing():
    """A record written before its shim started has shim_pid 0: waitpid(0) would reap
    any child of our process group."""
    child = zombie(7)
    hostproc.kill_and_wait(0)
    hostproc.kill_and_wait(0, "12345")
    assert child.wait(timeout=5) == 7


def test_kill_and_wait_of_a_reused_pid_reaps_nothing():
    """The pid a record names is now another child of ours (its start time differs)."""
    child = zombie(5)
    hostproc.kill_and_wait(child.pid, "1")
    assert child.wait(timeout=5) == 5


def test_daemon_reaper_takes_only_its_shims():
    other = zombie(7)      # a hook's process, say: subprocess waits for it
    shim = zombie(3)       # a shim the daemon started
    shims = {shim.pid}
    stop = threading.Event()
    reaper = threading.Thread(target=reap_children, args=(stop, shims))
    reaper.start()
    try:
        deadline = time.monotonic() + 10
        while shims and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # one more round of the reaper
    finally:
        stop.set()
        reaper.join(5)
    assert not shims, "the shim was not reaped"
    assert not os.path.exists(f"/proc/{shim.pid}/stat") or \
        open(f"/proc/{shim.pid}/stat").read().rsplit(")", 1)[1].split()[1] != str(os.getpid())
    assert other.wait(timeout=5) == 7, "the reaper took another waiter's child"

