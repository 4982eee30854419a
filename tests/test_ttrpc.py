"""ttrpc framing and the shim v2 binary's start/delete, without a VM or containerd."""
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from runv_py import ttrpc
from runv_py.shimv2.main import Flags, socket_path
from runv_py.shimv2.events import Publisher
from runv_py.shimv2.pb import shimv2_pb2 as pb
from runv_py.ttrpc import ttrpc_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(tmp_path):
    """A ttrpc server with Echo, Block (waits for a release) and Fail methods."""
    release = threading.Event()

    def block(payload: bytes) -> bytes:
        assert release.wait(10)
        return b"blocked:" + payload

    def fail(payload: bytes) -> bytes:
        raise ttrpc.TtrpcError(ttrpc.NOT_FOUND, "no such thing")

    handlers = {("t.S", "Echo"): lambda p: p, ("t.S", "Block"): block, ("t.S", "Fail"): fail}
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    threading.Thread(target=ttrpc.Server(handlers).serve, args=(listener,), daemon=True).start()
    yield path, release
    release.set()
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def send_request(sock, stream: int, method: str, payload: bytes) -> None:
    req = ttrpc_pb2.Request(service="t.S", method=method, payload=payload).SerializeToString()
    sock.sendall(ttrpc.HEADER.pack(len(req), stream, ttrpc.TYPE_REQUEST, 0) + req)


def read_response(sock):
    stream, kind, _flags, payload = ttrpc.read_frame(sock)
    assert kind == ttrpc.TYPE_RESPONSE
    return stream, ttrpc_pb2.Response.FromString(payload)


def test_calls_are_multiplexed_on_one_connection(server):
    path, release = server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    send_request(sock, 1, "Block", b"a")   # like containerd's Wait: answered last
    send_request(sock, 3, "Echo", b"b")
    stream, response = read_response(sock)
    assert (stream, response.payload, response.status.code) == (3, b"b", 0)
    release.set()
    stream, response = read_response(sock)
    assert (stream, response.payload) == (1, b"blocked:a")
    sock.close()


def test_an_idle_connection_stays_and_a_half_sent_frame_is_cut_off(server, monkeypatch):
    monkeypatch.setattr(ttrpc, "FRAME_TIMEOUT", 0.5)
    path, _release = server
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(10)
    idle.connect(path)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.settimeout(10)
    stalled.connect(path)
    stalled.sendall(ttrpc.HEADER.pack(100, 1, ttrpc.TYPE_REQUEST, 0)[:5])  # and no more
    time.sleep(1.5)
    assert stalled.recv(1) == b""           # the server hung up on it
    send_request(idle, 1, "Echo", b"still here")   # idle for longer, still served
    assert read_response(idle)[1].payload == b"still here"
    idle.close()
    stalled.close()


def test_status_codes_and_size_limit(server):
    path, _ = server
    client = ttrpc.Client(path)
    with pytest.raises(ttrpc.TtrpcError) as e:
        client.call("t.S", "Nope", b"")
    assert e.value.code == ttrpc.UNIMPLEMENTED
    with pytest.raises(ttrpc.TtrpcError) as e:
        client.call("t.S", "Fail", b"")
    assert (e.value.code, e.value.message) == (ttrpc.NOT_FOUND, "no such thing")
    # Over 4 MiB: refused with RESOURCE_EXHAUSTED, and the connection stays usable.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    big = b"x" * (ttrpc.MAX_MESSAGE + 1)
    sock.sendall(ttrpc.HEADER.pack(len(big), 5, ttrpc.TYPE_REQUEST, 0) + big)
    stream, response = read_response(sock)
    assert (stream, response.status.code) == (5, ttrpc.RESOURCE_EXHAUSTED)
    send_request(sock, 7, "Echo", b"still")
    assert read_response(sock)[1].payload == b"still"
    sock.close()
    assert client.call("t.S", "Echo", b"ok") == b"ok"
    client.close()


def test_events_are_forwarded_in_order(tmp_path):
    got = []
    done = threading.Event()

    def forward(payload: bytes) -> bytes:
        envelope = pb.ForwardRequest.FromString(payload).envelope
        got.append((envelope.namespace, envelope.topic, envelope.event.type_url))
        if len(got) == 3:
            done.set()
        return b""

    path = str(tmp_path / "events.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    server = ttrpc.Server({("containerd.services.events.ttrpc.v1.Events", "Forward"): forward})
    threading.Thread(target=server.serve, args=(listener,), daemon=True).start()
    publisher = Publisher("unix://" + path, "ns1")
    publisher.publish("/tasks/create", pb.TaskCreate(container_id="c"))
    publisher.publish("/tasks/start", pb.TaskStart(container_id="c", pid=1))
    publisher.publish("/tasks/exit", pb.TaskExit(container_id="c", exit_status=3))
    assert done.wait(10)
    assert got == [("ns1", "/tasks/create", "containerd.events.TaskCreate"),
                   ("ns1", "/tasks/start", "containerd.events.TaskStart"),
                   ("ns1", "/tasks/exit", "containerd.events.TaskExit")]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def test_flags_as_containerd_passes_them():
    f = Flags(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/c",
               "-id", "abc", "-debug", "-bundle=/b", "delete"])
    assert (f.get("namespace"), f.get("id"), f.get("bundle"), f.debug, f.action) == \
        ("k8s.io", "abc", "/b", True, "delete")
    assert socket_path("/run/c.sock", "ns", "a") != socket_path("/run/c.sock", "ns", "b")
    assert Flags(f.argv() + ["serve"]).values == f.values and Flags(f.argv()).debug


SHIM = [sys.executable, "-m", "runv_py.shimv2"]


def test_start_prints_the_address_and_leaves_a_daemon(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cid = "u" + uuid.uuid4().hex[:8]
    args = ["-namespace", "t", "-address", str(tmp_path / "none.sock"), "-id", cid]
    env = dict(os.environ, TTRPC_ADDRESS=str(tmp_path / "none.sock.ttrpc"),
               RUNVPY_SHIM_LOG_DIR=str(tmp_path))
    r = subprocess.run(SHIM + args + ["start"], cwd=bundle, env=env, capture_output=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    address = r.stdout.decode()
    assert address.startswith("unix:///run/containerd/s/") and "\n" not in address
    assert (bundle / "address").read_text() == address
    again = subprocess.run(SHIM + args + ["start"], cwd=bundle, env=env, capture_output=True,
                           timeout=30)  # the same task again: the same daemon
    assert (again.returncode, again.stdout.decode()) == (0, address), again.stderr
    client = ttrpc.Client(address[len("unix://"):])
    reply = pb.ConnectResponse.FromString(client.call(
        "containerd.task.v2.Task", "Connect", pb.ConnectRequest(id=cid).SerializeToString()))
    assert reply.shim_pid > 0 and reply.task_pid == 0
    with pytest.raises(ttrpc.TtrpcError) as e:   # no task yet to checkpoint
        client.call("containerd.task.v2.Task", "Checkpoint",
                    pb.CheckpointTaskRequest(id=cid).SerializeToString())
    assert e.value.code == ttrpc.NOT_FOUND
    with pytest.raises(ttrpc.TtrpcError) as e:
        client.call("containerd.task.v2.Task", "NoSuchMethod", b"")
    assert e.value.code == ttrpc.UNIMPLEMENTED
    with pytest.raises(ttrpc.TtrpcError) as e:
        client.call("containerd.task.v2.Task", "Kill",
                    pb.KillRequest(id=cid, exec_id="nope", signal=9).SerializeToString())
    assert e.value.code == ttrpc.NOT_FOUND
    client.call("containerd.task.v2.Task", "Shutdown", pb.ShutdownRequest(id=cid).SerializeToString())
    client.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{reply.shim_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{reply.shim_pid}"), "the daemon did not exit"
    assert not os.path.exists(address[len("unix://"):])
    left = subprocess.run(["pgrep", "-f", f"runv_py.shimv2 .*-id={cid} "], capture_output=True)
    assert left.stdout == b"", "a second daemon was started"


def test_delete_is_idempotent(tmp_path):
    for _ in range(2):
        r = subprocess.run(SHIM + ["-namespace", "t", "-id", "gone", "-bundle", str(tmp_path),
                                   "delete"], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        response = pb.DeleteResponse.FromString(r.stdout)
        assert response.exit_status == 137 and response.exited_at.seconds > 0


def test_guest_cgroup_files_become_containerd_metrics_and_limits():
    from runv_py.oci.resources import MAX_UINT64, cgroup_limits as cgroup_values
    from runv_py.sandbox import ContainerStats
    from runv_py.shimv2.metrics import metrics
    m = metrics(ContainerStats.from_files(
        {"pids.current": "3\n", "pids.max": "max\n", "memory.current": "4096\n",
         "memory.max": "1048576\n", "cpu.stat": "usage_usec 7\nsystem_usec 2\n",
         "memory.stat": "anon 10\nfile 20\npgfault 5\n"}))
    assert (m.pids.current, m.pids.limit) == (3, MAX_UINT64)
    assert (m.cpu.usage_usec, m.cpu.system_usec, m.cpu.user_usec) == (7, 2, 0)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.anon, m.memory.pgfault) == \
        (4096, 1048576, 10, 5)
    assert cgroup_values({"memory": {"limit": 1 << 20}, "cpu": {"quota": 50000, "period": 100000},
                          "pids": {"limit": -1}}) == \
        {"memory.max": "1048576", "cpu.max": "50000 100000", "pids.max": "max"}
