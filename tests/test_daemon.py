"""`runv-py containerd`: the real daemon on a private socket, driven by its gRPC client."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from conftest import INITRD, KERNEL, qemu_pids
from runv_py.oci.busybox import make_bundle
from runv_py.containerd02 import api_pb2 as pb
from runv_py.containerd02 import api_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


class Daemon:
    def __init__(self, base: str):
        self.base = base
        self.dir = os.path.join(base, "d")
        self.state = os.path.join(base, "state")
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.tag = uuid.uuid4().hex[:6]
        self.proc = None

    def start(self, *extra, wait=True, global_flags=()):
        self.log = open(os.path.join(self.base, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runv_py.cli", "--kernel", KERNEL, "--initrd", INITRD,
             *global_flags, "containerd", "--state-dir", self.state, "--containerd-dir",
             self.dir, *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        if wait:
            # A killed daemon leaves its socket file: wait for an answer, not for the file.
            deadline = time.monotonic() + 30
            while True:
                assert self.proc.poll() is None, open(os.path.join(self.base, "daemon.log")).read()
                self.channel = grpc.insecure_channel(f"unix:{self.sock}")
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    self.channel.close()
                    assert time.monotonic() < deadline, "the daemon did not come up"
            self.api = pb_grpc.APIStub(self.channel)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def fifos(self, name: str):
        paths = [os.path.join(self.base, f"{name}.{s}") for s in ("in", "out", "err")]
        for p in paths:
            os.mkfifo(p)
        return paths


class FifoReader:
    """Collects what a container writes to a FIFO."""

    def __init__(self, path: str):
        self.data = b""
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        import select
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    return
                if chunk:
                    self.data += chunk
                else:
                    time.sleep(0.05)

    def wait_for(self, needle: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.data and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.data


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    d.start()
    yield d
    # Clean up as an operator would: kill what runs, stop the daemon, check for leaks.
    try:
        for c in d.api.State(pb.StateRequest(), timeout=30).containers:
            d.api.Signal(pb.SignalRequest(id=c.id, pid="init", signal=9), timeout=30)
    except grpc.RpcError:
        pass
    deadline = time.monotonic() + 20
    while os.path.isdir(d.state) and os.listdir(d.state) and time.monotonic() < deadline:
        time.sleep(0.1)
    d.stop()
    leftovers = os.listdir(d.state) if os.path.isdir(d.state) else []
    for cid in leftovers:
        subprocess.run([sys.executable, "-m", "runv_py.cli", "--root", d.state, "delete",
                        "--force", cid], capture_output=True, timeout=60)
    assert not leftovers, f"containers left behind: {leftovers}"


def bundle(tmp_path, name, args):
    return make_bundle(str(tmp_path / name), args)


def events_since(d, ts: float, cid: str = ""):
    request = pb.EventsRequest(storedOnly=True, id=cid)
    request.timestamp.FromNanoseconds(int(ts * 1e9))
    return [(e.type, e.id, e.pid, e.status) for e in d.api.Events(request, timeout=30)]


def wait_events(d, ts, want, cid="", timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = events_since(d, ts, cid)
        if all(w in got for w in want):
            return got
        time.sleep(0.1)
    raise AssertionError(f"events {want} not all seen in {events_since(d, ts, cid)}")


def test_container_with_fifos_exec_signal_update_and_events(daemon, tmp_path):
    d = daemon
    t0 = time.time()
    cid = f"d-{d.tag}"
    stdin, stdout, stderr = d.fifos("init")
    out = FifoReader(stdout)
    b = bundle(tmp_path, "b", ["sh", "-c", "echo hello-daemon; echo to-err >&2; read line; "
                                          "echo got:$line; exec sleep 600"])
    reply = d.api.CreateContainer(pb.CreateContainerRequest(
        id=cid, bundlePath=b, stdin=stdin, stdout=stdout, stderr=stderr, labels=["a=b"]), timeout=120)
    assert reply.container.status == "running" and reply.container.id == cid
    assert b"hello-daemon" in out.wait_for(b"hello-daemon")
    with open(stdin, "w") as f:   # a writer comes and goes; the stream stays open
        f.write("ping\n")
    assert b"got:ping" in out.wait_for(b"got:ping")
    state = d.api.State(pb.StateRequest(id=cid), timeout=30)
    assert state.machine.cpus == os.cpu_count() and state.machine.memory > 0
    assert list(state.containers[0].labels) == ["a=b"]
    p_in, p_out, p_err = d.fifos("p1")
    p_reader = FifoReader(p_out)
    d.api.AddProcess(pb.AddProcessRequest(id=cid, pid="p1", args=["sh", "-c", "echo exec-out; exit 4"],
                                          cwd="/", env=["PATH=/bin"], stdin=p_in, stdout=p_out,
                                          stderr=p_err), timeout=60)
    assert b"exec-out" in p_reader.wait_for(b"exec-out")
    d.api.UpdateContainer(pb.UpdateContainerRequest(
        id=cid, resources=pb.UpdateResource(memoryLimit=96 * 1024 * 1024)), timeout=30)
    check_in, check_out, check_err = d.fifos("check")
    check = FifoReader(check_out)
    d.api.AddProcess(pb.AddProcessRequest(
        id=cid, pid="check", args=["sh", "-c", "cat /sys/fs/cgroup/memory.max"],
        cwd="/", stdin=check_in, stdout=check_out, stderr=check_err), timeout=60)
    assert str(96 * 1024 * 1024).encode() in check.wait_for(b"\n")
    stats = d.api.Stats(pb.StatsRequest(id=cid), timeout=30)
    assert stats.cgroup_stats.memory_stats.usage.usage > 0
    assert stats.cgroup_stats.memory_stats.usage.limit == 96 * 1024 * 1024
    d.api.Signal(pb.SignalRequest(id=cid, pid="init", signal=9), timeout=30)
    got = wait_events(d, t0, [("exit", cid, "init", 137)])
    kinds = [(k, pid) for k, c, pid, _s in got if c == cid]
    assert kinds.index(("start-container", "init")) < kinds.index(("start-process", "p1")) \
        < kinds.index(("exit", "p1")) < kinds.index(("exit", "init"))
    assert ("exit", cid, "p1", 4) in got
    deadline = time.monotonic() + 10
    while d.api.State(pb.StateRequest(), timeout=30).containers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not d.api.State(pb.StateRequest(), timeout=30).containers   # reaped
    assert not qemu_pids(cid)


def test_daemon_killed_and_restarted_loses_nothing(daemon, tmp_path):
    d = daemon
    t0 = time.time()
    b = bundle(tmp_path, "b", ["sleep", "600"])
    quick = bundle(tmp_path, "q", ["sh", "-c", "sleep 3; exit 5"])
    ids = [f"r1-{d.tag}", f"r2-{d.tag}"]
    d.api.CreateContainer(pb.CreateContainerRequest(id=ids[0], bundlePath=b), timeout=120)
    d.api.CreateContainer(pb.CreateContainerRequest(id=ids[1], bundlePath=quick), timeout=120)
    d.stop(signal.SIGKILL)
    time.sleep(4)  # r2 exits while no daemon runs
    d.start()
    listed = [c.id for c in d.api.State(pb.StateRequest(), timeout=30).containers]
    assert ids[0] in listed
    got = wait_events(d, t0, [("start-container", ids[0], "init", 0), ("exit", ids[1], "init", 5)])
    assert ("start-container", ids[1], "init", 0) in got
    d.api.Signal(pb.SignalRequest(id=ids[0], pid="init", signal=9), timeout=30)
    wait_events(d, t0, [("exit", ids[0], "init", 137)])


def test_concurrent_state_calls_and_a_client_leaving_events(daemon, tmp_path):
    d = daemon
    b = bundle(tmp_path, "b", ["sh", "-c", "sleep 2"])
    stream = d.api.Events(pb.EventsRequest(), timeout=120)
    first = []
    leaver = threading.Thread(target=lambda: first.append(next(stream)))
    leaver.start()
    errors = []
    stop = threading.Event()

    def poll_state():
        while not stop.is_set():
            try:
                reply = d.api.State(pb.StateRequest(), timeout=60)
                for c in reply.containers:
                    assert c.id and c.status in ("created", "running", "paused", "stopped")
                    assert c.processes[0].pid == "init"
            except Exception as e:  # collected below
                errors.append(e)
                return

    pollers = [threading.Thread(target=poll_state) for _ in range(50)]
    for t in pollers:
        t.start()
    starters = [threading.Thread(target=d.api.CreateContainer, args=(
        pb.CreateContainerRequest(id=f"c{i}-{d.tag}", bundlePath=b),), kwargs={"timeout": 200})
        for i in range(5)]
    for t in starters:
        t.start()
    leaver.join(60)
    stream.cancel()   # this client walks away in the middle of the stream
    for t in starters:
        t.join(200)
    deadline = time.monotonic() + 60
    while d.api.State(pb.StateRequest(), timeout=30).containers and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in pollers:
        t.join(60)
    assert not errors, errors[:3]
    assert first and first[0].type == "start-container"
    exits = [e for e in events_since(d, 0) if e[0] == "exit"]
    assert len(exits) == 5


def test_bad_input_gets_status_codes_and_the_daemon_keeps_serving(daemon, tmp_path):
    d = daemon

    def code(fn, request):
        with pytest.raises(grpc.RpcError) as e:
            fn(request, timeout=120)
        return e.value.code()

    b = bundle(tmp_path, "b", ["sleep", "600"])
    cid = f"bad-{d.tag}"
    assert code(d.api.CreateContainer, pb.CreateContainerRequest(
        id=cid, bundlePath=str(tmp_path / "missing"))) == grpc.StatusCode.NOT_FOUND
    assert code(d.api.CreateContainer, pb.CreateContainerRequest(
        id="../x", bundlePath=b)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(d.api.CreateContainer, pb.CreateContainerRequest(
        id=cid, bundlePath=b, stdout=str(tmp_path / "no-fifo"))) == grpc.StatusCode.INVALID_ARGUMENT
    d.api.CreateContainer(pb.CreateContainerRequest(id=cid, bundlePath=b), timeout=120)
    assert code(d.api.CreateContainer, pb.CreateContainerRequest(
        id=cid, bundlePath=b)) == grpc.StatusCode.ALREADY_EXISTS
    assert code(d.api.Signal, pb.SignalRequest(id="nope", pid="init", signal=9)) == grpc.StatusCode.NOT_FOUND
    assert code(d.api.Signal, pb.SignalRequest(id=cid, pid="nope", signal=9)) == grpc.StatusCode.NOT_FOUND
    assert code(d.api.Stats, pb.StatsRequest(id="nope")) == grpc.StatusCode.NOT_FOUND
    assert d.api.GetServerVersion(pb.GetServerVersionRequest(), timeout=10).revision == "runv-py"
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(d.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert oct(os.stat(d.sock).st_mode & 0o777) == "0o600"


def test_pid_file_refuses_a_second_daemon_but_not_a_stale_file(tmp_path):
    d = Daemon(str(tmp_path)).start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "runv_py.cli", "containerd", "--state-dir", d.state,
             "--containerd-dir", d.dir, "--listen", str(tmp_path / "other.sock")],
            capture_output=True, timeout=30)
        assert second.returncode != 0 and b"already runs" in second.stderr
    finally:
        d.stop(signal.SIGKILL)
    with open(os.path.join(d.dir, "containerd.pid"), "w") as f:
        f.write("999999")   # stale: no such process
    d2 = Daemon(str(tmp_path)).start()
    try:
        assert d2.api.GetServerVersion(pb.GetServerVersionRequest(), timeout=10).major == 0
    finally:
        d2.stop()
    assert d2.proc.returncode == 0


def test_solo_namespaced_stops_after_the_last_container(tmp_path):
    d = Daemon(str(tmp_path)).start("--solo-namespaced")
    try:
        b = bundle(tmp_path, "b", ["true"])
        d.api.CreateContainer(pb.CreateContainerRequest(id=f"s-{d.tag}", bundlePath=b), timeout=120)
        d.proc.wait(30)
        assert d.proc.returncode == 0
        assert not os.path.exists(d.dir)
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.timeout(240)
def test_a_template_given_to_the_daemon_makes_every_vm_a_clone(tmp_path, cli_template):
    tdir = cli_template
    d = Daemon(str(tmp_path)).start(global_flags=["--template", tdir])
    try:
        for i in range(2):
            cid = f"tpl{i}-{d.tag}"
            d.api.CreateContainer(pb.CreateContainerRequest(
                id=cid, bundlePath=bundle(tmp_path, f"b{i}", ["sleep", "600"])), timeout=120)
            [qemu] = qemu_pids(cid)
            assert b"-incoming" in open(f"/proc/{qemu}/cmdline", "rb").read()  # a clone
            d.api.Signal(pb.SignalRequest(id=cid, pid="init", signal=9), timeout=30)
        deadline = time.monotonic() + 30
        while os.listdir(d.state) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.listdir(d.state)
    finally:
        d.stop()
