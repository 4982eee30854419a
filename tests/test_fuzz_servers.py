"""Garbage on the wire of the long-lived servers: the guest agent's control loop, a
per-sandbox shim's shim.sock and the shim v2's ttrpc socket. Each answers with a typed
error (or closes that connection), stays up and serves the next well-formed request.

Real processes without a VM: the agent runs on the host (the namespace driver, as in
test_agent.py), the shim is `runv-py --driver namespace run -d`'s, the shim v2 daemon is
the one `start` leaves (it boots a VM only on Create)."""
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from hypothesis import assume, given, strategies as st

from fuzzing import fuzz
from runv_py import ttrpc
from runv_py.hyperstart import messages as m, protocol as p
from runv_py.hyperstart.errors import INVALID_ARGUMENT, UNAVAILABLE, InvalidArgument
from runv_py.shim import protocol as shim_protocol
from runv_py.shim.server import MAX_REQUEST, MAX_REQUESTS, REQUEST_TIMEOUT
from runv_py.shimv2.pb import shimv2_pb2 as pb
from runv_py.ttrpc import ttrpc_pb2
from runv_py.vm.agent_client import _Waiter
from test_agent import bundle as agent_bundle, driver, output_pipe, read_all, sandbox  # noqa: F401

pytestmark = pytest.mark.timeout(120)

DEEP = b"[" * 100000


# ---- the agent's control loop -------------------------------------------------------------

def agent_answer(agent, raw: bytes):
    """Send raw bytes on the control channel as one command; the agent's answer (an
    ERROR comes back as its error class)."""
    waiter = _Waiter()
    with agent.send_lock:
        agent.waiters.append(waiter)
        agent.control.sendall(raw)
    assert waiter.done.wait(10), "the agent did not answer"
    return waiter.error


def test_the_agent_answers_garbage_and_goes_on(sandbox, tmp_path):  # noqa: F811
    agent = sandbox.agent
    for raw in (p.encode_control(99, {"x": 1}),                    # no such command
                p.CONTROL_HEADER.pack(p.NEWCONTAINER, 9) + b"{",    # not JSON
                p.CONTROL_HEADER.pack(p.STARTPOD, 8 + len(DEEP)) + DEEP,  # nested too deep
                p.encode_control(p.EXECCMD, {"container": 5}),      # wrong types
                p.CONTROL_HEADER.pack(p.PING, 3) + b"rest"):        # a length that cannot be
        error = agent_answer(agent, raw)
        assert isinstance(error, InvalidArgument), (raw[:16], error)
    with agent.stream_lock:  # a bad stream frame: dropped, the stream channel goes on
        agent.stream.sendall(p.STREAM_HEADER.pack(1, 2) + b"junk")
    assert agent.call(m.GetVersion()).version == p.VERSION
    r, io = output_pipe()
    box = agent_bundle(tmp_path, ["echo", "still serving"])
    container = sandbox.create_container("after-garbage", box, io)
    sandbox.start_container(container.id)
    assert sandbox.wait(container.id, timeout=20).status == 0
    assert read_all(r) == b"still serving\n"


# ---- shim.sock ------------------------------------------------------------------------------

def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)  # blocking: waits while the listener's backlog is full
    sock.settimeout(REQUEST_TIMEOUT + 10)
    return sock


def reply_of(sock: socket.socket):
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        sock.close()
    return json.loads(data) if data else None


def ask(path: str, raw: bytes):
    sock = connect(path)
    try:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the shim may refuse before it has read it all
    return reply_of(sock)


def refused(reply, code: str = INVALID_ARGUMENT) -> bool:
    return reply is not None and reply["ok"] is False and reply["code"] == code


@pytest.fixture
def shim_sock(runv, bundle):
    cid = runv.id()
    runv.detached("--driver", "namespace", "run", "-d", "-b", bundle(["sleep", "600"]), cid)
    yield os.path.join(runv.root, cid, "shim.sock"), cid
    runv("delete", "--force", cid, timeout=60)


def test_shim_sock_refuses_garbage_and_keeps_serving(runv, shim_sock):
    path, cid = shim_sock
    for raw in (b"not json\n", b"\xff\xfe\n", b"[1, 2]\n", b'{"op": "nope"}\n', DEEP + b"\n",
                b'{"op": "kill", "signal": "x"}\n', b'{"op": "exec", "process": "ls"}\n',
                b'{"op": "winsize", "rows": [24]}\n', b""):
        assert refused(ask(path, raw)), raw[:20]
    # Multi-megabyte: refused at the cap, without waiting for the rest or a newline.
    big = connect(path)
    threading.Thread(target=lambda: _try(big.sendall, b"x" * (3 * MAX_REQUEST)), daemon=True).start()
    start = time.monotonic()
    assert refused(reply_of(big)) and time.monotonic() - start < REQUEST_TIMEOUT
    # Half a request, then silence: refused after the timeout, and its thread is free.
    half = connect(path)
    half.sendall(b'{"op": "ps"')
    start = time.monotonic()
    assert refused(reply_of(half))
    assert REQUEST_TIMEOUT - 1 < time.monotonic() - start < REQUEST_TIMEOUT + 5
    fuzz_shim_sock(path)
    assert runv("exec", cid, "echo", "alive", check=True).stdout == b"alive\n"


def _try(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def test_shim_sock_serves_a_bounded_number_of_requests(runv, shim_sock):
    path, cid = shim_sock
    stalled = [connect(path) for _ in range(MAX_REQUESTS)]
    try:
        start = time.monotonic()
        reply = ask(path, shim_protocol.encode(shim_protocol.Ps()))
        assert refused(reply, UNAVAILABLE) and time.monotonic() - start < 2, reply
    finally:
        for sock in stalled:  # their threads end at once (end of file), slots freed
            sock.close()
    deadline = time.monotonic() + 10
    while not (reply := ask(path, shim_protocol.encode(shim_protocol.Ps())))["ok"]:
        assert refused(reply, UNAVAILABLE) and time.monotonic() < deadline
        time.sleep(0.1)
    assert "sleep" in json.dumps(reply["processes"])


def fuzz_shim_sock(path: str) -> None:
    @fuzz(25)
    @given(line=st.binary(min_size=1, max_size=60))
    def one(line):
        try:
            shim_protocol.decode(line)
            assume(False)  # a real request, not garbage
        except InvalidArgument:
            pass
        assert refused(ask(path, line + b"\n")), line
    one()


# ---- the shim v2 ----------------------------------------------------------------------------

SHIMV2 = [sys.executable, "-m", "runv_py.shimv2"]
TASK = "containerd.task.v2.Task"
METHODS = {"State": pb.StateRequest, "Start": pb.StartRequest, "Delete": pb.DeleteRequest,
           "Pids": pb.PidsRequest, "Pause": pb.PauseRequest, "Resume": pb.ResumeRequest,
           "Kill": pb.KillRequest, "Exec": pb.ExecProcessRequest, "ResizePty": pb.ResizePtyRequest,
           "CloseIO": pb.CloseIORequest, "Update": pb.UpdateTaskRequest, "Wait": pb.WaitRequest,
           "Stats": pb.StatsRequest, "Checkpoint": pb.CheckpointTaskRequest,
           "Create": pb.CreateTaskRequest}


def shimv2(tmp_path, *args, cid: str):
    env = dict(os.environ, TTRPC_ADDRESS=str(tmp_path / "none.sock.ttrpc"),
               RUNVPY_SHIM_LOG_DIR=str(tmp_path))
    return subprocess.run(SHIMV2 + ["-namespace", "t", "-address", str(tmp_path / "none.sock"),
                                    "-id", cid, *args], cwd=tmp_path / "bundle", env=env,
                          capture_output=True, timeout=30)


def call(sock: socket.socket, stream: int, method: str, payload: bytes):
    request = ttrpc_pb2.Request(service=TASK, method=method, payload=payload).SerializeToString()
    sock.sendall(ttrpc.HEADER.pack(len(request), stream, ttrpc.TYPE_REQUEST, 0) + request)
    got, kind, _flags, data = ttrpc.read_frame(sock)
    assert (got, kind) == (stream, ttrpc.TYPE_RESPONSE)
    return ttrpc_pb2.Response.FromString(data)


def test_shimv2_checks_ids_refuses_garbage_and_keeps_serving(tmp_path):
    (tmp_path / "bundle").mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    for action in ("delete", "start"):  # the id names directories: checked first
        r = shimv2(tmp_path, action, cid="../../victim")
        assert r.returncode == 1 and b"invalid task id" in r.stderr, r.stderr
    assert (victim / "keep").read_text() == "mine"
    cid = "f" + uuid.uuid4().hex[:8]
    r = shimv2(tmp_path, "start", cid=cid)
    assert r.returncode == 0, r.stderr
    path = r.stdout.decode()[len("unix://"):]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    stream = 1
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600  # only root may call the shim
        for method, kind in METHODS.items():  # every method that takes ids checks them
            for bad in ({"id": "../" + cid}, {"id": cid, "exec_id": "../../e"}, {"id": ""}):
                if "exec_id" in bad and "exec_id" not in kind.DESCRIPTOR.fields_by_name:
                    continue
                response = call(sock, stream, method, kind(**bad).SerializeToString())
                assert response.status.code == ttrpc.INVALID_ARGUMENT, (method, bad)
                stream += 2
        for payload in (b"\xff\xff\xff", b"\x0a\x05ab"):  # a Request, and a State, that do not decode
            raw = ttrpc.HEADER.pack(len(payload), stream, ttrpc.TYPE_REQUEST, 0) + payload
            sock.sendall(raw)
            got, _kind, _flags, data = ttrpc.read_frame(sock)
            assert ttrpc_pb2.Response.FromString(data).status.code == ttrpc.INVALID_ARGUMENT
            assert call(sock, stream + 2, "State", payload).status.code == ttrpc.INVALID_ARGUMENT
            stream += 4
        fuzz_shimv2(sock, stream)
        reply = call(sock, 100001, "Connect", pb.ConnectRequest(id=cid).SerializeToString())
        assert reply.status.code == 0 and pb.ConnectResponse.FromString(reply.payload).shim_pid > 0
    finally:
        call(sock, 100003, "Shutdown", pb.ShutdownRequest(id=cid).SerializeToString())
        sock.close()


def fuzz_shimv2(sock: socket.socket, first_stream: int) -> None:
    streams = itertools.count(first_stream, 2)

    @fuzz(40)
    @given(method=st.sampled_from(sorted(set(METHODS) - {"Create"})), payload=st.binary(max_size=40))
    def one(method, payload):
        code = call(sock, next(streams), method, payload).status.code
        # No task exists: a request that decodes finds nothing; nothing is UNKNOWN (a bug).
        assert code in (ttrpc.INVALID_ARGUMENT, ttrpc.NOT_FOUND, ttrpc.UNIMPLEMENTED), (method, code)
    one()
