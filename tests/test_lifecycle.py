"""The OCI lifecycle driven command by command, as containerd's runc shim drives runc."""
import ctypes
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import qemu_pids, share_server_pids, wait_vms_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(params=["9p", "virtiofs"])
def runv(runv, request):
    """Every scenario with the rootfs shared over 9p and over virtio-fs."""
    base = runv.args
    runv.args = lambda *args: base("--share", request.param, *args)
    runv.share = request.param
    return runv


@pytest.fixture
def subreaper():
    """Make this test process a child subreaper, as containerd-shim is: the container's
    host pid is then reparented to us and we can wait for its exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_pid(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise TimeoutError(f"pid {pid} did not exit")


def wait_status(runv, cid, want, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runv.state(cid)["status"] == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{cid} never became {want}: {runv.state(cid)}")


def test_full_cycle(runv, bundle, tmp_path, subreaper):
    cid = runv.id()
    out = tmp_path / "out"
    b = bundle(["sh", "-c", "echo started; exec sleep 600"])
    pid_file = tmp_path / "pid"
    with open(out, "wb") as stdout:
        r = subprocess.run(runv.args("create", "-b", b, "--pid-file", str(pid_file), cid),
                           stdin=subprocess.DEVNULL, stdout=stdout, stderr=stdout, timeout=120)
    assert r.returncode == 0, out.read_text()
    pid = int(pid_file.read_text())
    state = runv.state(cid)
    assert state["status"] == "created" and state["pid"] == pid and state["id"] == cid
    assert state["bundle"] == b and state["ociVersion"] and state["created"]
    assert os.path.exists(f"/proc/{pid}")
    # An operator's `ps` tells which processes belong to which container.
    assert cid.encode() in open(f"/proc/{pid}/cmdline", "rb").read()
    for qemu in qemu_pids(runv.tag):
        assert f"runv-py:{cid}".encode() in open(f"/proc/{qemu}/cmdline", "rb").read()
    assert out.read_text() == ""            # the process waits for start
    runv("start", cid, check=True)
    assert runv.state(cid)["status"] == "running"
    deadline = time.monotonic() + 10
    while "started" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text() == "started\n"   # stdio is create's, as with runc
    r = runv("exec", cid, "sh", "-c", "echo exec-out; echo exec-err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"exec-out\n", b"exec-err\n")
    listing = json.loads(runv("list", "--format", "json", check=True).stdout)
    assert [c["id"] for c in listing] == [cid]
    assert runv("list", "-q", check=True).stdout.decode().split() == [cid]
    # The one process left is the init (sh exec'd sleep): its guest pid, which the guest's
    # own /proc names `sleep 600` (pid 1 there is the agent, not the container).
    procs = json.loads(runv("ps", "--format", "json", cid, check=True).stdout)
    table = runv("ps", cid, check=True).stdout.decode().splitlines()
    rows = [line.split(None, 5) for line in table[1:]]
    assert [int(row[1]) for row in rows] == procs and len(procs) == 1, table
    assert rows[0][5] == "sleep 600" and procs != [1], table
    runv("kill", cid, "KILL", check=True)
    # The host pid ends by the signal, as runc's (the container's own) does: a subreaper
    # waiting for it (buildah, conmon) sees it killed.
    assert wait_pid(pid) == -signal.SIGKILL
    wait_status(runv, cid, "stopped")
    assert runv.state(cid)["pid"] == 0
    runv("delete", cid, check=True)
    r = runv("state", cid)
    assert r.returncode != 0 and b"does not exist" in r.stderr


def test_exec_stdin_env_cwd_user_and_detached_pid(runv, bundle, tmp_path, subreaper):
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    r = runv("exec", "--cwd", "/tmp", "-e", "X=42", "-u", "65534:65534", cid,
             "sh", "-c", "cat; pwd; echo $X; id -u; id -g", input=b"piped\n")
    assert r.stdout.decode().split() == ["piped", "/tmp", "42", "65534", "65534"]
    pid_file = tmp_path / "exec.pid"
    runv.detached("exec", "-d", "--pid-file", str(pid_file), cid, "sh", "-c", "sleep 1; exit 5")
    assert wait_pid(int(pid_file.read_text())) == 5
    runv.detached("exec", "-d", "--pid-file", str(pid_file), cid, "sh", "-c", "kill -SEGV $$")
    assert wait_pid(int(pid_file.read_text())) == -signal.SIGSEGV  # as the process ended
    process = {"args": ["sh", "-c", "exit 9"], "cwd": "/", "env": ["PATH=/bin"]}
    (tmp_path / "process.json").write_text(json.dumps(process))
    assert runv("exec", "-p", str(tmp_path / "process.json"), cid).returncode == 9
    # -u takes numbers, as runc's: a name is a clear error (it once was a traceback),
    # and a uid without a gid keeps the process's gid.
    process = {"args": ["sh", "-c", "id -u; id -g"], "cwd": "/", "env": ["PATH=/bin"],
               "user": {"uid": 0, "gid": 100}}
    (tmp_path / "process.json").write_text(json.dumps(process))
    for bad in ("nobody", "1:users", "-1"):
        r = runv("exec", "-u", bad, "-p", str(tmp_path / "process.json"), cid)
        assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
        assert f"--user {bad!r}".encode() in r.stderr, r.stderr
    r = runv("exec", "-u", "65534", "-p", str(tmp_path / "process.json"), cid)
    assert r.stdout.decode().split() == ["65534", "100"], r.stderr
    runv("delete", "--force", cid, check=True)


def test_pause_resume(runv, bundle):
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    runv("pause", cid, check=True)
    assert runv.state(cid)["status"] == "paused"
    r = runv("delete", cid)
    assert r.returncode != 0 and b"not stopped" in r.stderr
    runv("resume", cid, check=True)
    assert runv.state(cid)["status"] == "running"
    assert runv("exec", cid, "true").returncode == 0
    runv("delete", "-f", cid, check=True)


def test_oom_kill_reports_failure(runv, bundle, subreaper):
    cid = runv.id()
    b = bundle(["sh", "-c", "tail /dev/zero"],
               linux__resources={"memory": {"limit": 64 * 1024 * 1024}})
    pid_file = os.path.join(os.path.dirname(b), "oom.pid")
    runv.detached("run", "-d", "--pid-file", pid_file, "-b", b, cid)
    status = wait_pid(int(open(pid_file).read()))
    assert status == -signal.SIGKILL
    wait_status(runv, cid, "stopped")
    runv("delete", cid, check=True)


def test_pids_limit_stops_a_fork_bomb(runv, bundle):
    cid = runv.id()
    # The init is a shell so that it reaps the orphaned sleeps (sleep would leave zombies).
    b = bundle(["sh", "-c", "while :; do sleep 1; done"], linux__resources={"pids": {"limit": 16}})
    runv.detached("run", "-d", "-b", b, cid)
    r = runv("exec", cid, "sh", "-c", "for i in $(seq 64); do sleep 3 & echo $i; done", timeout=60)
    assert r.returncode != 0 and b"can't fork" in r.stderr
    started = len(r.stdout.split())
    assert 0 < started < 16
    time.sleep(4)  # the sleeps end and free their pids; the container lives on
    assert runv("exec", cid, "true", timeout=60).returncode == 0
    assert runv.state(cid)["status"] == "running"
    runv("delete", "-f", cid, check=True)


def test_bad_input_changes_nothing(runv, bundle):
    cid = runv.id()
    for bad in ("../x", "a/b", "", "y" * 1000):
        r = runv("create", "-b", bundle(["true"]), bad)
        assert r.returncode != 0 and b"container id" in r.stderr
    r = runv("state", "nope-" + runv.tag)
    assert r.returncode != 0 and b"does not exist" in r.stderr
    for cmd in (["start"], ["kill"], ["delete"], ["pause"], ["exec"]):
        r = runv(*cmd, "nope-" + runv.tag, *(["true"] if cmd == ["exec"] else []))
        assert r.returncode != 0 and b"does not exist" in r.stderr, cmd
    runv.detached("create", "-b", bundle(["sleep", "600"]), cid)
    r = runv.detached("create", "-b", bundle(["true"]), cid, check=False)
    assert r.returncode != 0 and b"already exists" in r.stderr
    r = runv("kill", cid, "SIGNOPE")
    assert r.returncode != 0 and b"unknown signal" in r.stderr
    runv("start", cid, check=True)
    r = runv("start", cid)
    assert r.returncode != 0 and b"running" in r.stderr
    r = runv("delete", cid)
    assert r.returncode != 0 and b"not stopped" in r.stderr
    assert runv.state(cid)["status"] == "running"
    runv("delete", "--force", cid, check=True)
    assert not os.path.exists(os.path.join(runv.root, cid))


def test_start_of_stopped_container_fails(runv, bundle, subreaper):
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["true"]), cid)
    wait_status(runv, cid, "stopped")
    r = runv("start", cid)
    assert r.returncode != 0 and b"stopped" in r.stderr
    runv("delete", cid, check=True)


def test_kill_9_of_the_shim_leaves_no_qemu(runv, bundle):
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    assert qemu_pids(runv.tag)
    # virtiofsd, or for 9p the proxy helper that serves the jailed QEMU (host/jail.py)
    assert share_server_pids(cid)
    os.kill(runv.state(cid)["pid"], signal.SIGKILL)
    assert not wait_vms_gone(runv.tag)
    assert runv.state(cid)["status"] == "stopped"
    runv("delete", cid, check=True)


def test_kill_9_of_qemu_stops_the_container(runv, bundle):
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    for pid in qemu_pids(runv.tag):
        os.kill(pid, signal.SIGKILL)
    wait_status(runv, cid, "stopped", timeout=10)
    runv("delete", cid, check=True)


def test_guest_panic_stops_the_container(runv, bundle):
    cid = runv.id()
    # runc's default spec makes /proc/sysrq-trigger read-only: this container may write it.
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"], linux__readonlyPaths=[]), cid)
    runv("exec", cid, "sh", "-c", "echo c > /proc/sysrq-trigger", timeout=30)
    wait_status(runv, cid, "stopped", timeout=20)
    runv("delete", cid, check=True)


def test_hooks_run_with_state_and_failures_fail_create(runv, bundle, tmp_path):
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$1 $(cat)\" >> {log}\n")
    hook.chmod(0o755)
    hooks = {k: [{"path": str(hook), "args": [str(hook), k]}]
             for k in ("prestart", "createRuntime", "poststart", "poststop")}
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"], hooks=hooks), cid)
    runv("delete", "-f", cid, check=True)
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["prestart", "createRuntime", "poststart", "poststop"]
    assert json.loads(lines[0].split(" ", 1)[1])["id"] == cid
    bad = {"prestart": [{"path": "/bin/false"}]}
    r = runv.detached("create", "-b", bundle(["true"], hooks=bad), runv.id("h"), check=False)
    assert r.returncode != 0 and b"prestart hook" in r.stderr
    assert not os.path.exists(os.path.join(runv.root, runv.id("h")))


def test_twenty_containers_in_parallel(runv, bundle):
    b = bundle(["sh", "-c", "echo ok; exec sleep 600"])
    ids = [runv.id(f"p{i}") for i in range(20)]
    errors = []

    def cycle(cid):
        try:
            runv.detached("run", "-d", "-b", b, cid, timeout=200)
            r = runv("exec", cid, "true", timeout=60)
            assert r.returncode == 0, r.stderr
            runv("delete", "--force", cid, check=True, timeout=60)
        except Exception as e:  # collected and asserted below
            errors.append(f"{cid}: {e}")

    threads = [threading.Thread(target=cycle, args=(cid,)) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(230)
    assert not errors
    assert runv("list", "-q", check=True).stdout == b""


def receive_console(listener, timeout=60) -> int:
    import socket as sk
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    with conn:
        _msg, fds, _flags, _addr = sk.recv_fds(conn, 1024, 1)
    return fds[0]


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    import select
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    return buf


def test_terminal_through_console_socket_and_resize(runv, bundle, tmp_path):
    import fcntl
    import socket as sk
    import struct
    import termios
    path = str(tmp_path / "console.sock")
    listener = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    cid = runv.id()
    b = bundle(["sh"], process__terminal=True, process__consoleSize={"height": 30, "width": 100})
    result = {}
    t = threading.Thread(target=lambda: result.update(fd=receive_console(listener)))
    t.start()
    runv.detached("create", "--console-socket", path, "-b", b, cid)
    t.join(60)
    master = result["fd"]
    runv("start", cid, check=True)
    os.write(master, b"stty size; tty\n")
    out = read_until(master, b"/dev/pts/0")
    assert b"30 100" in out and b"/dev/pts/0" in out
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
    time.sleep(1)
    os.write(master, b"stty size\n")
    assert b"50 132" in read_until(master, b"50 132")
    os.write(master, b"exit 4\n")
    wait_status(runv, cid, "stopped")
    os.close(master)
    runv("delete", cid, check=True)
    r = runv.detached("create", "-b", b, runv.id("nosock"), check=False)
    assert r.returncode != 0 and b"console-socket" in r.stderr


def test_resources_size_the_vm_and_rlimits_apply(runv, bundle):
    b = bundle(["sh", "-c", "nproc; grep MemTotal /proc/meminfo; ulimit -n; id -G"],
               linux__resources={"memory": {"limit": 512 * 1024 * 1024},
                                 "cpu": {"quota": 200000, "period": 100000}},
               process__rlimits=[{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}],
               process__user={"uid": 0, "gid": 0, "additionalGids": [7, 8]})
    r = runv("run", "-b", b, runv.id(), check=True)
    nproc, meminfo, nofile, groups = r.stdout.decode().splitlines()
    assert nproc == "2"
    assert int(meminfo.split()[1]) > 512 * 1024
    assert nofile == "123"
    assert set(groups.split()) >= {"7", "8"}


def test_concurrent_calls_on_one_id_are_serialised(runv, bundle):
    """Five `start`s of one created container at once: exactly one starts it, the others
    are told it is running; then concurrent pause/resume pairs leave it consistent."""
    cid = runv.id()
    runv.detached("create", "-b", bundle(["sleep", "600"]), cid)
    results = []
    threads = [threading.Thread(target=lambda: results.append(runv("start", cid)))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r.returncode for r in results) == [0, 1, 1, 1, 1]
    assert all(b"running" in r.stderr for r in results if r.returncode)
    threads = [threading.Thread(target=lambda: (runv("pause", cid), runv("resume", cid)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert runv.state(cid)["status"] in ("running", "paused")
    runv("resume", cid)
    assert runv("exec", cid, "true").returncode == 0
    runv("delete", "--force", cid, check=True)


@pytest.mark.timeout(180)
def test_sigterm_to_a_booting_shim_stops_it(runv, bundle, tmp_path):
    """A shim told to stop while its VM boots (there is no container yet to forward the
    signal to) stops the start-up: create fails with the reason, the VM and the state
    go. It once dropped the signal and created the container anyway."""
    cid = runv.id()
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        create = subprocess.Popen(runv.args("create", "-b", bundle(["sleep", "600"]), cid),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        state = os.path.join(runv.root, cid, "state.json")
        deadline = time.monotonic() + 60
        shim = 0
        while time.monotonic() < deadline and not (shim and qemu_pids(runv.tag)):
            try:
                with open(state) as f:
                    shim = json.load(f).get("shim_pid", 0)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert shim and qemu_pids(runv.tag), "the shim did not start booting"
        with open(state) as f:
            assert json.load(f)["status"] == "creating", "too late: the VM booted already"
        os.kill(shim, signal.SIGTERM)
        assert create.wait(timeout=60) == 1
    finally:
        if create.poll() is None:
            create.kill()
            create.wait()
    assert b"signal 15" in (tmp_path / "err").read_bytes()
    assert not wait_vms_gone(runv.tag), "the VM outlived its shim"
    assert not os.path.exists(os.path.join(runv.root, cid))
    r = runv("state", cid)
    assert r.returncode == 1 and b"does not exist" in r.stderr
