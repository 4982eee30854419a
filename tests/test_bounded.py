"""Every wait has a deadline: a lock another process holds too long is a clear error,
not a hang (and leaves no fd behind)."""
import os
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
