"""The shim v2's fork server (runv_py/shimv2/zygote.py): pods' daemons forked from one
process that has loaded runv-py, started as containerd starts them (``start`` in the
bundle) and serving real VMs; a stale or killed fork server costs one slow start, not
a pod."""
import os
import signal
import stat
import subprocess
import sys
import time
import uuid

import pytest

from conftest import gone, qemu_pids
from runv_py.oci.busybox import make_bundle
from runv_py.shimv2 import zygote
from runv_py.shimv2.pb import shimv2_pb2 as pb
from test_shimv2 import ShimV2

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def fresh_server() -> int:
    """Whatever fork server ran is stopped; one start later a new one serves: its pid."""
    zygote.stop_server()
    wait_for(lambda: not zygote.running(), 10)
    zygote.start_server()
    return wait_for(zygote.pid_of_server, 30)


def run_echo(tmp_path, name: str, word: str) -> tuple:
    """A task echoing ``word`` through a fresh daemon: (daemon pid, its log, its output)."""
    tag = uuid.uuid4().hex[:8]
    cid = f"{name}-{tag}"
    work = tmp_path / cid
    work.mkdir()
    bundle = make_bundle(str(work / "bundle"), ["echo", word])
    out = str(work / "stdout")
    open(out, "w").close()
    shim = ShimV2(work, cid, bundle)
    try:
        shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle, stdout=out),
                  pb.CreateTaskResponse)
        shim.call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        assert shim.call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse).exit_status == 0
        shim.call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        return shim.pid, (work / f"shimv2-{cid}.log").read_text(), open(out).read()
    finally:
        shim.close()
        assert not qemu_pids(tag)


def test_daemons_are_forked_and_share_its_pages(tmp_path):
    server = fresh_server()
    assert server
    assert stat.S_IMODE(os.stat(zygote.SOCKET).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(zygote.ZYGOTE_DIR).st_mode) == 0o700
    tag = uuid.uuid4().hex[:8]
    cid = f"zy-{tag}"
    bundle = make_bundle(str(tmp_path / "bundle"), ["sleep", "30"])
    shim = ShimV2(tmp_path, cid, bundle)
    try:
        shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle), pb.CreateTaskResponse)
        log = (tmp_path / f"shimv2-{cid}.log").read_text()
        assert f"forked by the shim fork server (pid {server})" in log
        # ps and pgrep see the daemon's own command line, as if it had been started.
        with open(f"/proc/{shim.pid}/cmdline", "rb") as f:
            args = [a.decode() for a in f.read().split(b"\0") if a]
        assert args[1:3] == ["-m", "runv_py.shimv2"] and f"-id={cid}" in args
        assert args[-1] == "serve"
        # Copy-on-write: pages the daemon has not written are still the server's.
        with open(f"/proc/{shim.pid}/smaps_rollup") as f:
            rollup = {line.split(":")[0]: int(line.split()[1]) for line in f
                      if line.split(":")[0] in ("Shared_Clean", "Shared_Dirty")}
        assert rollup["Shared_Dirty"] > 2048, rollup
    finally:
        shim.close()
    assert not qemu_pids(tag)
    assert zygote.pid_of_server() == server  # a daemon's end is not the server's


def test_a_stale_or_killed_server_costs_a_slow_start_not_a_pod(tmp_path):
    server = fresh_server()
    pid, log, out = run_echo(tmp_path, "warm", "one")
    assert out == "one\n" and f"fork server (pid {server})" in log
    # runv-py's code changes on disk (an upgrade): the server refuses and exits. (Only
    # the file's time changes; the new server started next loads it as it is.)
    st = os.stat(zygote.__file__)
    os.utime(zygote.__file__, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    pid, log, out = run_echo(tmp_path, "stale", "two")
    assert out == "two\n"
    assert "the shim fork server refused: runv-py's code changed" in log, log
    assert wait_for(lambda: gone(server), 10)
    # The slow start started a new server, which serves the next pod.
    server = wait_for(lambda: zygote.pid_of_server(), 30)
    pid, log, out = run_echo(tmp_path, "again", "three")
    assert out == "three\n" and f"fork server (pid {server})" in log
    # Killed, it leaves a socket nobody answers: one slow start, then a new server.
    os.kill(server, signal.SIGKILL)
    assert wait_for(lambda: gone(server), 10)
    pid, log, out = run_echo(tmp_path, "killed", "four")
    assert out == "four\n" and "started on its own, not forked: no shim fork server" in log
    assert wait_for(lambda: zygote.pid_of_server() not in (None, server), 30)


def test_the_switch_turns_it_off(tmp_path, monkeypatch):
    server = fresh_server()
    monkeypatch.setenv("RUNV_SHIM_ZYGOTE", "off")
    pid, log, out = run_echo(tmp_path, "off", "plain")
    assert out == "plain\n"
    assert "forked" not in log and "not forked" not in log
    assert zygote.pid_of_server() == server
    # The operator's way to stop it; a second time there is none to stop.
    stop = [sys.executable, "-m", "runv_py.shimv2", "stop-zygote"]
    assert subprocess.run(stop, capture_output=True, timeout=30).returncode == 0
    assert wait_for(lambda: gone(server), 10)
    assert subprocess.run(stop, capture_output=True, timeout=30).returncode == 1


def test_a_caller_with_other_import_time_settings_gets_a_daemon_of_its_own(tmp_path,
                                                                           monkeypatch):
    """A forked daemon has the values the server read at import (RUNV_TB_SIZE, ...)."""
    server = fresh_server()
    monkeypatch.setenv("RUNV_BOOT_TIMEOUT", "61")
    pid, log, out = run_echo(tmp_path, "env", "own")
    assert out == "own\n"
    assert "not forked: the shim fork server refused: the caller's RUNV_BOOT_TIMEOUT" in log
    assert zygote.pid_of_server() == server  # it serves on for the others
