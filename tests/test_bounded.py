"""Every wait has a deadline, every error path closes its fds: a lock another process
holds too long is a clear error, not a hang; a stdio sink whose reader went away and a
console set-up that fails leave no fd behind."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from runv_py.hyperstart.errors import Unavailable
from runv_py.shim import records
from runv_py.vm import template


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def held(path: str) -> int:
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def bounded(fn, seconds: float = 10):
    """``fn()``'s exception (or None); fails if it is still waiting after ``seconds``."""
    result = []

    def run():
        try:
            fn()
            result.append(None)
        except Exception as e:
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "still waiting"
    return result[0]


def test_template_lock_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(template, "LOCK_TIMEOUT", 0.5, raising=False)
    tdir = str(tmp_path / "template")
    holder = held(str(tmp_path / ".template.lock"))  # a make-template that hangs
    try:
        before = open_fds()
        error = bounded(lambda: template.remove(tdir))
        assert isinstance(error, Unavailable) and "template" in str(error)
        assert open_fds() == before
    finally:
        os.close(holder)
    assert template.remove(tdir) is False  # free again: no template there


def test_container_lock_times_out_and_closes_its_fd(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "LOCK_TIMEOUT", 0.5)
    holder = held(str(tmp_path / records.LOCK_FILE))
    try:
        before = open_fds()

        def take():
            with records.Lock(str(tmp_path)):
                pass
        error = bounded(take)
        assert isinstance(error, Unavailable)
        assert open_fds() == before, "the lock's fd leaked"
    finally:
        os.close(holder)


def test_a_sink_whose_reader_went_away_closes_its_fd():
    from runv_py.vm.stdio import fd_sink
    r, w = os.pipe()
    os.close(r)
    sink = fd_sink(w, close_at_eof=True)
    with pytest.raises(BrokenPipeError):
        sink(b"output nobody reads")  # the agent client then drops the stream
    with pytest.raises(OSError):
        os.fstat(w)
    sink(b"")  # the end-of-file that may still come closes nothing else


def test_a_console_set_up_that_fails_closes_both_ends(tmp_path):
    """TIOCSCTTY fails in a process that is not a session leader (as a shim whose
    set-up went wrong would): the pty's ends must not stay open."""
    script = """if True:
        import json, os
        from runv_py.hyperstart.errors import Unavailable
        from runv_py.shim.terminal import host_pty
        assert os.getsid(0) != os.getpid()
        before = sorted(os.listdir("/proc/self/fd"))
        try:
            host_pty(%r, controlling=True)
            error = ""
        except Exception as e:
            error = type(e).__name__
        print(json.dumps([error, before, sorted(os.listdir("/proc/self/fd"))]))
    """ % str(tmp_path / "console.sock")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    error, before, after = json.loads(r.stdout)
    assert error == "Unavailable"
    assert after == before, "the pty leaked"


class Launched:
    """What a late launch returns: something the launcher must stop."""
    stopped = False

    def stop(self):
        self.stopped = True


def test_a_launch_that_does_not_return_is_given_up_and_its_vm_stopped(monkeypatch):
    from runv_py.vm import launcher
    monkeypatch.setattr(launcher, "LAUNCH_TIMEOUT", 0.5, raising=False)
    release = threading.Event()
    late = Launched()

    def slow_launch():
        release.wait(30)
        return late
    # A launcher of the test's own: the process's one must first start after a test
    # module's private mount namespace (test_factories), whose binds QEMU must see.
    own = launcher.Launcher()
    error = bounded(lambda: own.call(slow_launch))
    assert isinstance(error, Unavailable) and "launcher" in str(error)
    release.set()
    assert own.call(lambda: 42) == 42  # the launcher goes on
    assert late.stopped, "a VM nobody waits for any more was left running"


@pytest.mark.vm
@pytest.mark.timeout(150)
def test_a_frozen_qemu_fails_a_pause_instead_of_hanging_it(runv, bundle):
    """QEMU stopped (SIGSTOP): its QMP greeting, or its answer, never comes; `pause`
    fails with QMP's error in bounded time and the container can still be deleted."""
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    with open(os.path.join(runv.root, cid, "state.json")) as f:
        qemu = json.load(f)["qemu_pid"]
    os.kill(qemu, signal.SIGSTOP)
    try:
        r = runv("pause", cid, timeout=90)  # TimeoutExpired: it hung
        assert r.returncode != 0 and b"QMP" in r.stderr, r.stderr
    finally:
        os.kill(qemu, signal.SIGCONT)
        runv("delete", "-f", cid, check=True)
