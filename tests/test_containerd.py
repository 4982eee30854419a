"""containerd-shim-runvpy-v2 under a real containerd 1.6: `ctr run --runtime
io.containerd.runvpy.v2` boots a real QEMU VM per task.

A private containerd (own root, state, sockets, config; CRI disabled) runs with the shim
on its PATH; the busybox OCI image is built here and imported with `ctr images import`.
"""
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
import uuid

import pytest

import images
from conftest import qemu_pids, wait_vms_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("containerd") or not shutil.which("ctr"),
                                 reason="containerd is not installed (apt-get install containerd)")]

RUNTIME = "io.containerd.runvpy.v2"
IMAGE = "docker.io/runvpy/busybox:test"
NAMESPACE = "runvtest"


class Containerd:
    """A private containerd; ctr() talks to it."""

    def __init__(self, base: str):
        self.base = base
        self.sock = os.path.join(base, "c.sock")
        self.logs = os.path.join(base, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.config = os.path.join(base, "config.toml")
        with open(self.config, "w") as f:
            f.write(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
        self.proc = None

    def start(self) -> None:
        env = dict(os.environ, RUNVPY_SHIM_LOG_DIR=self.logs,
                   PATH=sysconfig.get_path("scripts") + ":" + os.environ.get("PATH", ""))
        log = open(os.path.join(self.logs, "containerd.log"), "ab")
        self.proc = subprocess.Popen(["containerd", "--config", self.config], env=env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.exists(self.sock) and self.ctr("version", timeout=10).returncode == 0:
                return
            assert self.proc.poll() is None, self.log_tail()
            time.sleep(0.2)
        raise AssertionError("containerd did not come up: " + self.log_tail())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def ctr(self, *args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(["ctr", "-a", self.sock, "-n", NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout, **kw)

    def check(self, *args, **kw) -> str:
        r = self.ctr(*args, **kw)
        assert r.returncode == 0, f"ctr {' '.join(args)}: {r.returncode} {r.stdout} {r.stderr}"
        return r.stdout

    def task_status(self, cid: str) -> str:
        for line in self.check("task", "ls").splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid:
                return parts[-1]
        return ""

    def wait_status(self, cid: str, want: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.task_status(cid) == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"{cid} never became {want}: {self.check('task', 'ls')}")

    def mounts(self) -> list:
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if self.base in line]

    def log_tail(self) -> str:
        out = []
        for name in sorted(os.listdir(self.logs)):
            with open(os.path.join(self.logs, name), errors="replace") as f:
                out.append(f"--- {name}\n" + f.read()[-3000:])
        return "\n".join(out)


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("image"))
    path = os.path.join(work, "busybox.tar")
    images.oci_archive(path, work, IMAGE)
    return path


@pytest.fixture
def containerd(image_tar):
    """A fresh containerd per test (its state is tiny), torn down with every task it
    ran; the test fails if a QEMU or a mount outlives it."""
    base = tempfile.mkdtemp(prefix="rvctd-", dir="/tmp")
    c = Containerd(base)
    c.tag = uuid.uuid4().hex[:8]
    c.start()
    try:
        c.check("images", "import", image_tar)
        yield c
    finally:
        if c.proc.poll() is None:
            for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
                cid = line.split()[0]
                c.ctr("task", "kill", "-s", "KILL", cid, timeout=30)
                c.ctr("task", "rm", "-f", cid, timeout=60)
            for cid in c.ctr("containers", "ls", "-q").stdout.split():
                c.ctr("containers", "rm", cid, timeout=30)
        c.stop()
        # Shim daemons of tasks the clean-up above could not reach (their VMs go with
        # them: parent-death signal).
        out = subprocess.run(["pgrep", "-f", f"runv_py.shimv2 .*-address={c.sock} "],
                             capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leaked = wait_vms_gone(c.tag, timeout=10)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10  # a shim's `delete` may still be under way
        while c.mounts() and time.monotonic() < deadline:
            time.sleep(0.2)
        mounts = c.mounts()
        for line in mounts:
            subprocess.run(["umount", "-l", line.split()[4]], capture_output=True)
        logs = c.log_tail()
        shutil.rmtree(base, ignore_errors=True)
        assert not leaked, f"QEMU processes leaked: {leaked}\n{logs}"
        assert not mounts, f"mounts leaked: {mounts}\n{logs}"


def test_run_rm_prints_guest_kernel_and_exit_status(containerd):
    cid = f"rm-{containerd.tag}"
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid,
                       "sh", "-c", "uname -r; exit 3")
    assert r.returncode == 3, f"{r.stdout} {r.stderr}\n{containerd.log_tail()}"
    release = r.stdout.strip()
    assert release.startswith("6.1") and release != os.uname().release, r.stdout
    print(release)
    assert containerd.check("containers", "ls", "-q").split() == []
    assert not qemu_pids(containerd.tag)


def test_detached_exec_ps_pause_resume_kill_rm_and_events(containerd, tmp_path):
    cid = f"d-{containerd.tag}"
    events_out = open(tmp_path / "events", "w")
    events = subprocess.Popen(["ctr", "-a", containerd.sock, "events"], stdout=events_out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # let the subscription settle before the first event
        containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
        containerd.wait_status(cid, "RUNNING")
        r = containerd.ctr("task", "exec", "--exec-id", "e1", cid,
                           "sh", "-c", "echo exec-out; echo exec-err >&2; exit 5")
        assert (r.returncode, r.stdout, r.stderr) == (5, "exec-out\n", "exec-err\n"), r
        containerd.check("task", "exec", "--detach", "--exec-id", "bg", cid, "sleep", "300")
        ps = containerd.check("task", "ps", cid)
        assert len(ps.splitlines()) >= 3 and "bg" in ps, ps  # header, init, the exec
        containerd.check("task", "kill", "--exec-id", "bg", "-s", "KILL", cid)
        deadline = time.monotonic() + 10
        while "bg" in containerd.check("task", "ps", cid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "bg" not in containerd.check("task", "ps", cid)
        containerd.check("task", "pause", cid)
        assert containerd.task_status(cid) == "PAUSED"
        r = containerd.ctr("task", "exec", "--exec-id", "e2", cid, "true", timeout=60)
        assert r.returncode != 0 and "paused" in r.stderr, r  # an error, not a hang
        containerd.check("task", "resume", cid)
        assert containerd.task_status(cid) == "RUNNING"
        metrics = containerd.check("task", "metrics", cid)  # the guest cgroup's figures
        assert "pids.current" in metrics and "memory.usage" in metrics, metrics
        containerd.check("task", "kill", "--all", "-s", "KILL", cid)
        containerd.wait_status(cid, "STOPPED")
        containerd.check("task", "rm", cid)
        containerd.check("containers", "rm", cid)
        deadline = time.monotonic() + 10
        want = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]
        while time.monotonic() < deadline:
            text = (tmp_path / "events").read_text()
            if all(topic in text for topic in want):
                break
            time.sleep(0.2)
        lines = [line for line in text.splitlines() if cid in line and "/tasks/" in line]
        topics = [next(w for w in line.split() if w.startswith("/tasks/")) for line in lines]
        assert [t for t in topics if t in want] and all(t in topics for t in want), text
        # In order: create before start, the container's exit before its delete.
        assert topics.index("/tasks/create") < topics.index("/tasks/start")
        assert len([t for t in topics if t == "/tasks/exit"]) == 3  # e1, bg and init
        assert max(i for i, t in enumerate(topics) if t == "/tasks/exit") < topics.index("/tasks/delete")
    finally:
        events.kill()
        events.wait(5)
        events_out.close()
    assert not qemu_pids(containerd.tag)


def test_task_survives_containerd_restart(containerd):
    cid = f"rs-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    containerd.stop()
    containerd.start()  # it reconnects to the shim through the bundle's address file
    assert containerd.task_status(cid) == "RUNNING"
    r = containerd.ctr("task", "exec", "--exec-id", "after", cid, "echo", "still-here")
    assert (r.returncode, r.stdout) == (0, "still-here\n"), r
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)


def shim_daemon_pids(cid: str) -> list:
    """The shim v2 daemon (its child, the runv-py shim, was forked and shares its
    command line: keep the parent only)."""
    out = subprocess.run(["pgrep", "-f", f"runv_py.shimv2 .*-id={cid} .*serve"],
                         capture_output=True, text=True).stdout
    pids = [int(x) for x in out.split()]
    return [p for p in pids if os.getppid() != p and parent(p) not in pids]


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def test_shim_killed_task_stopped_and_no_qemu_left(containerd):
    cid = f"sk-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    assert qemu_pids(containerd.tag)
    daemons = shim_daemon_pids(cid)
    assert len(daemons) == 1, daemons
    os.kill(daemons[0], signal.SIGKILL)
    # containerd notices the dead connection, runs `shim delete` and marks the task
    # stopped; the delete ends the VM container the daemon left behind.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = containerd.task_status(cid)
        if status in ("STOPPED", "") and not qemu_pids(containerd.tag) \
                and not containerd.mounts():
            break
        time.sleep(0.3)
    assert containerd.task_status(cid) in ("STOPPED", ""), containerd.check("task", "ls")
    assert not qemu_pids(containerd.tag), containerd.log_tail()
    assert not containerd.mounts(), containerd.mounts()
    containerd.ctr("task", "rm", "-f", cid)
    containerd.check("containers", "rm", cid)


def test_missing_command_is_an_error_and_leaks_nothing(containerd):
    cid = f"bad-{containerd.tag}"
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid, "/no/such/command")
    # The guest agent cannot exec it: status 127 and its error on the task's stderr.
    assert r.returncode == 127 and "/no/such/command" in r.stderr, r
    containerd.ctr("containers", "rm", cid)
    assert not qemu_pids(containerd.tag)


def test_kill_unknown_exec_is_not_found(containerd):
    cid = f"ke-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    r = containerd.ctr("task", "kill", "--exec-id", "nope", cid)
    assert r.returncode != 0 and "not found" in r.stderr, r
    assert containerd.task_status(cid) == "RUNNING"
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)


def run_in_pty(args: list, timeout: float = 120, typed: bytes = b"", after: str = "") -> tuple:
    """Run ``args`` with a pty as its stdio (ctr -t wants a console), type ``typed``
    once ``after`` was printed; returns (exit status, everything it printed)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave is closed
                    break
                if not data:
                    break
                out += data
                if typed and after.encode() in out:
                    os.write(master, typed)
                    typed = b""
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_terminal_run_and_exec(containerd):
    cid = f"tty-{containerd.tag}"
    base = ["ctr", "-a", containerd.sock, "-n", NAMESPACE]
    # ctr sends its terminal's size (40x100) with ResizePty just after Start.
    wait_size = ('for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do s=$(stty size); '
                 '[ "$s" = "40 100" ] && break; sleep 0.2; done; echo size-$s')
    status, out = run_in_pty(base + ["run", "--rm", "-t", "--runtime", RUNTIME, IMAGE, cid,
                                     "sh", "-c", f"tty; {wait_size}; exit 2"])
    assert status == 2 and "/dev/pts/" in out and "size-40 100" in out, out
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    status, out = run_in_pty(base + ["task", "exec", "-t", "--exec-id", "t1", cid,
                                     "sh", "-c", "tty; echo ready; read x; echo got-$x; exit 4"],
                             typed=b"abc\r", after="ready")
    assert status == 4 and "/dev/pts/" in out and "got-abc" in out, out
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)


def test_shim_killed_while_containerd_is_down(containerd):
    """Nobody runs `shim delete` then: the VM must still go, with the daemon (its owner
    carries a parent-death signal); the restarted containerd finds the task dead."""
    cid = f"kd-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    daemons = shim_daemon_pids(cid)
    assert len(daemons) == 1, daemons
    containerd.stop()
    os.kill(daemons[0], signal.SIGKILL)
    assert not wait_vms_gone(containerd.tag, timeout=15)
    containerd.start()
    deadline = time.monotonic() + 30
    while containerd.task_status(cid) not in ("STOPPED", "") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert containerd.task_status(cid) in ("STOPPED", ""), containerd.check("task", "ls")
    containerd.ctr("task", "rm", "-f", cid)
    containerd.check("containers", "rm", cid)


def test_update_reaches_the_guest_cgroup(containerd):
    """ctr 1.6 has no `task update`: call the shim's Update over ttrpc as containerd
    would, then read the limits back through `ctr task metrics`."""
    from runv_py import ttrpc
    from runv_py.shimv2.pb import shimv2_pb2 as pb
    cid = f"up-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    bundle = os.path.join(containerd.base, "state", "io.containerd.runtime.v2.task", NAMESPACE, cid)
    with open(os.path.join(bundle, "address")) as f:
        client = ttrpc.Client(f.read().removeprefix("unix://"))
    request = pb.UpdateTaskRequest(id=cid)
    request.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    request.resources.value = json.dumps({"memory": {"limit": 50 << 20},
                                          "pids": {"limit": 20}}).encode()
    client.call("containerd.task.v2.Task", "Update", request.SerializeToString())
    client.close()
    metrics = dict(line.split()[:2] for line in containerd.check("task", "metrics", cid).splitlines()
                   if line.startswith(("pids.", "memory.")))
    assert metrics["pids.limit"] == "20" and metrics["memory.usage_limit"] == str(50 << 20), metrics
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)


def test_stdin_reaches_the_task_and_its_end_is_end_of_file(containerd):
    cid = f"in-{containerd.tag}"
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid,
                       "sh", "-c", "cat; echo done", stdin=None, input="hello\n", timeout=60)
    assert (r.returncode, r.stdout) == (0, "hello\ndone\n"), r
    # 1.3 MB of output: all of it reaches the FIFO before the exit does.
    r = containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid,
                       "sh", "-c", "seq 1 200000; echo err >&2", timeout=90)
    lines = r.stdout.splitlines()
    assert (r.returncode, len(lines), lines[-1], r.stderr) == (0, 200000, "200000", "err\n")
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    containerd.wait_status(cid, "RUNNING")
    r = containerd.ctr("task", "exec", "--exec-id", "in", cid, "sh", "-c", "wc -l",
                       stdin=None, input="a\nb\nc\n", timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "3"), r
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)


def test_oom_kill_is_reported(containerd, tmp_path):
    """--memory-limit sizes the VM and limits the guest cgroup; the guest's OOM kill
    comes back as /tasks/oom before /tasks/exit (137)."""
    cid = f"oom-{containerd.tag}"
    events_file = tmp_path / "events"
    with open(events_file, "w") as out:
        events = subprocess.Popen(["ctr", "-a", containerd.sock, "events"], stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = containerd.ctr("run", "--rm", "--memory-limit", str(32 << 20), "--runtime", RUNTIME,
                           IMAGE, cid, "sh", "-c",
                           "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived")
        assert r.returncode == 137 and "survived" not in r.stdout, r
        deadline = time.monotonic() + 10
        while "/tasks/delete" not in events_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        topics = [w for line in events_file.read_text().splitlines() if cid in line
                  for w in line.split() if w.startswith("/tasks/")]
        assert "/tasks/oom" in topics and topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    finally:
        events.kill()
        events.wait(5)


def test_task_exiting_while_containerd_is_down(containerd):
    """The exit happens with containerd away: the restarted containerd sees the task
    stopped with its status, and can delete it."""
    cid = f"ex-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sh", "-c", "sleep 4; exit 7")
    containerd.wait_status(cid, "RUNNING")
    started = time.monotonic()
    containerd.stop()
    time.sleep(max(0.0, started + 6 - time.monotonic()))  # the task ends meanwhile
    containerd.start()
    containerd.wait_status(cid, "STOPPED")
    r = containerd.ctr("task", "rm", cid)
    assert r.returncode == 0 and "exit code 7" in r.stderr, r  # ctr warns about the status
    containerd.check("containers", "rm", cid)


def test_a_climbing_cgroups_path_stays_in_the_hierarchy(containerd):
    """ctr passes --cgroup verbatim as the spec's cgroupsPath: the shim v2 cleans it as
    runc does (rooted at "/", so ".." cannot leave the hierarchy), its VM lives there
    with the spec's cpu shares, and the cgroup goes with the task."""
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("reads cgroup v1 files: this host runs cgroup v2")
    cid = f"cg-{containerd.tag}"
    escape = f"/tmp/cgescape-{cid}"
    try:
        containerd.check("run", "-d", "--runtime", RUNTIME, "--cgroup", "/../../../../.." + escape,
                         "--cpu-shares", "512", IMAGE, cid, "sleep", "600")
        containerd.wait_status(cid, "RUNNING")
        assert not os.path.exists(escape), "the cgroup path climbed out of the hierarchy"
        [qemu] = qemu_pids(containerd.tag)
        groups = dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{qemu}/cgroup"))
        assert groups["memory"] == escape and groups["cpu"] == escape, groups
        with open(f"/sys/fs/cgroup/cpu{escape}/cpu.shares") as f:
            assert f.read().strip() == "512"
        containerd.check("task", "kill", "-s", "KILL", cid)
        containerd.wait_status(cid, "STOPPED")
        containerd.check("task", "rm", cid)
        containerd.check("containers", "rm", cid)
        assert not [d for d in os.listdir("/sys/fs/cgroup")
                    if os.path.isdir(f"/sys/fs/cgroup/{d}{escape}")], "the cgroup outlived its task"
    finally:
        leftover = os.path.exists(escape)
        subprocess.run(["rm", "-rf", escape])
        for d in os.listdir("/sys/fs/cgroup"):   # the parent made for it, if now empty
            subprocess.run(["rmdir", f"/sys/fs/cgroup/{d}/tmp"], capture_output=True)
    assert not leftover, "the cgroup path climbed out of the hierarchy"
