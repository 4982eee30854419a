"""Fuzzing the decoders of what a guest or a user controls: random and truncated input may
give the project's typed errors (RunvError; TtrpcError at the ttrpc edge) and nothing else.

Pure decoders here; the servers that run them (the agent's loop, shim.sock, the shim v2)
are fuzzed while they serve in test_fuzz_servers.py."""
import contextlib
import json
import socket
import sys
import threading

import pytest
from hypothesis import given, strategies as st

from fuzzing import fuzz, json_values, mutate, truncations
from runv_py import ttrpc
from runv_py.hyperstart import messages as m, protocol as p
from runv_py.hyperstart.errors import InvalidArgument, RunvError
from runv_py.shim import protocol as shim_protocol
from runv_py.shimv2.pb import shimv2_pb2 as pb
from runv_py.shimv2.service import decode_request
from runv_py.vm.agent_client import AgentClient
from test_protocol import EXAMPLES

pytestmark = pytest.mark.timeout(120)

DEEP = b"[" * 100000  # the C JSON scanner recurses once per level

# ---- hyperstart frames (both ends share FrameReader) -------------------------------------

VALID_STREAM = b"".join(p.encode_stream(seq, data) for seq, data in
                        ((1, b"hello"), (2, b""), (7, b"x" * 300)))
VALID_CONTROL = b"".join(m.encode(msg) for msg in EXAMPLES)


@pytest.mark.parametrize("header,valid", [(p.CONTROL_HEADER, VALID_CONTROL),
                                          (p.STREAM_HEADER, VALID_STREAM)], ids=["control", "stream"])
@fuzz(200)
@given(data=st.data())
def test_frame_readers_take_any_bytes_and_recover(header, valid, data):
    garbage = data.draw(st.binary(max_size=200) | truncations(valid))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(garbage)), max_size=4)))
    reader = p.FrameReader(header)
    failed = False
    for a, b in zip([0] + cuts, cuts + [len(garbage)]):
        try:
            frames, failed = reader.feed(garbage[a:b]), False
        except p.ProtocolError as e:  # what the agent gets, and answers with an ERROR
            frames, failed = e.frames, True
        for _key, payload in frames:
            assert header.size + len(payload) <= p.MAX_FRAME
    if failed:  # the reader dropped what it could not frame: a clean sender is understood
        assert reader.feed(valid) == p.FrameReader(header).feed(valid)


def test_a_bad_length_drops_the_rest_and_keeps_what_came_before():
    reader = p.FrameReader(p.CONTROL_HEADER)
    good = m.encode(m.Ping())
    with pytest.raises(p.ProtocolError) as e:
        reader.feed(good + p.CONTROL_HEADER.pack(p.PING, 3) + good)
    assert e.value.frames == [(p.PING, b"")] and isinstance(e.value, InvalidArgument)
    assert reader.feed(good) == [(p.PING, b"")]


# ---- typed messages (requests in the guest, replies and events on the host) ---------------

WIRE_EXAMPLES = [(type(msg), msg.to_wire()) for msg in EXAMPLES] + [
    (m.PidReply, {"pid": 5}), (m.VersionReply, {"version": 4242}), (m.FileData, {"data": "AA=="}),
    (m.ProcessListReply, {"processes": [{"pid": 1, "ppid": 0, "state": "S", "uid": 0,
                                          "rssKb": 1, "cmd": "sh", "nspid": 1}]}),
    (m.SetupInterface, {"device": "aa", "newDeviceName": "eth0", "mtu": 1500,
                        "ipAddresses": [{"ipAddress": "10.0.0.2", "netMask": "24"}]}),
    (m.SetupRoute, {"routes": [{"dest": "default", "gateway": "10.0.0.1"}]}),
    (m.OnlineCpuMem, {"cpus": 2, "memoryMib": 512}),
]


@contextlib.contextmanager
def as_in_the_guest():
    """The agent never imports json (it imports re): without json.decoder, the C scanner
    it uses cannot raise its own error."""
    saved = {name: sys.modules.pop(name) for name in ("json.decoder", "json") if name in sys.modules}
    try:
        yield
    finally:
        sys.modules.update(saved)


@fuzz(250)
@given(data=st.data())
def test_messages_from_any_json_are_theirs_or_invalid_arguments(data):
    cls, wire = data.draw(st.sampled_from(WIRE_EXAMPLES))
    choice = data.draw(st.integers(0, 3))
    if choice == 0:
        payload = data.draw(st.binary(max_size=64))
    elif choice == 1:
        payload = data.draw(truncations(json.dumps(wire).encode()))
    else:
        payload = json.dumps(mutate(data, wire)).encode()
    try:
        with as_in_the_guest():
            msg = m.decode(cls, payload)
    except InvalidArgument:
        return
    assert type(msg) is cls and m.decode(cls, p.json_dumps(msg.to_wire()).encode()) == msg


def test_json_nested_too_deeply_is_a_protocol_error():
    for cls in (m.NewContainer, m.ProcessExited, m.ErrorReply):
        with pytest.raises(p.ProtocolError):
            m.decode(cls, DEEP)


@fuzz(100)
@given(control=st.binary(max_size=300) | truncations(VALID_CONTROL),
       frames=st.lists(st.tuples(st.sampled_from([p.ACK, p.ERROR, p.PROCESSASYNCEVENT, p.READY]),
                                 json_values.map(lambda v: json.dumps(v).encode())
                                 | st.binary(max_size=40) | st.just(DEEP)), max_size=4),
       stream=st.binary(max_size=300) | truncations(VALID_STREAM))
def test_the_host_client_survives_any_guest(control, frames, stream):
    """What a guest sends reaches the host client's reader threads: they end the channel
    or go on, but never die of it, and a call under way gets its reply or a typed error."""
    crashes = []
    hook, threading.excepthook = threading.excepthook, crashes.append
    host_ctl, guest_ctl = socket.socketpair()
    host_stream, guest_stream = socket.socketpair()
    try:
        client = AgentClient(host_ctl, host_stream)
        client.attach(1, lambda chunk: None)
        client.event_callbacks.append(lambda event: assert_type(event, m.ProcessExited))
        outcome = []
        caller = threading.Thread(target=call_into, args=(client, outcome))
        caller.start()
        guest_ctl.settimeout(10)
        guest_stream.settimeout(10)
        guest_ctl.recv(65536)  # the call went out: the next ACK or ERROR is its answer
        try:
            guest_ctl.sendall(b"".join(p.CONTROL_HEADER.pack(code, 8 + len(payload)) + payload
                                       for code, payload in frames) + control)
            guest_stream.sendall(stream)
        except OSError:
            pass  # the host ended the channel on garbage and reads no more: allowed
        guest_ctl.close()
        guest_stream.close()  # the VM went away
        caller.join(10)
        assert not caller.is_alive() and client.closed.wait(10)
        assert outcome and (outcome[0] is None or isinstance(outcome[0], (m.ProcessListReply,
                                                                          RunvError))), outcome
        client.close()
    finally:
        threading.excepthook = hook
    assert not crashes, crashes[0].exc_value


def assert_type(value, cls) -> None:
    assert type(value) is cls


def call_into(client: AgentClient, outcome: list) -> None:
    try:
        outcome.append(client.call(m.ProcessList(container="c"), timeout=10))
    except RunvError as e:
        outcome.append(e)


# ---- shim.sock requests -------------------------------------------------------------------

SHIM_EXAMPLES = [dict(json.loads(shim_protocol.encode(req)))
                 for req in (shim_protocol.Exec(container="c", exec_id="e", process={"args": ["ls"]}),
                             shim_protocol.Kill(container="c", signal=9, all=True),
                             shim_protocol.Winsize(exec_id="e", rows=3, cols=4),
                             shim_protocol.Update(resources={"pids": {"limit": 3}}))]


@fuzz(200)
@given(data=st.data())
def test_shim_requests_are_typed_or_invalid_arguments(data):
    example = json.dumps(data.draw(st.sampled_from(SHIM_EXAMPLES))).encode()
    line = data.draw(st.sampled_from(["bytes", "cut", "mutated", "deep"]))
    line = {"bytes": lambda: data.draw(st.binary(max_size=80)),
            "cut": lambda: data.draw(truncations(example)),
            "mutated": lambda: json.dumps(mutate(data, json.loads(example))).encode(),
            "deep": lambda: DEEP}[line]()
    try:
        req = shim_protocol.decode(line)
    except InvalidArgument:
        return
    hints = {f: type(getattr(req, f)) for f in req.__dataclass_fields__}
    assert all(t in (str, int, bool, dict, type(None)) for t in hints.values())
    assert shim_protocol.decode(shim_protocol.encode(req)) == req


# ---- ttrpc frames and the shim v2's requests ----------------------------------------------

VALID_TTRPC = ttrpc.HEADER.pack(5, 1, ttrpc.TYPE_REQUEST, 0) + b"abcde"


@fuzz(150)
@given(wire=st.binary(max_size=200) | truncations(VALID_TTRPC + VALID_TTRPC))
def test_ttrpc_frames_from_any_bytes(wire):
    a, b = socket.socketpair()
    a.settimeout(5)
    with a, b:
        b.sendall(wire)
        b.shutdown(socket.SHUT_WR)
        while (frame := ttrpc.read_frame(a)) is not None:
            stream, kind, flags, payload = frame
            assert payload is None or len(payload) <= ttrpc.MAX_MESSAGE


METHODS = ["State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
           "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown"]


@fuzz(300)
@given(payload=st.binary(max_size=120), method=st.sampled_from(METHODS))
def test_ttrpc_and_task_requests_from_any_bytes(payload, method):
    try:
        request = ttrpc.decode_request(payload)
    except ttrpc.TtrpcError as e:
        assert e.code == ttrpc.INVALID_ARGUMENT
    else:
        assert isinstance(request.service, str)
    kind = getattr(pb, {"Create": "CreateTaskRequest", "Exec": "ExecProcessRequest",
                        "Checkpoint": "CheckpointTaskRequest", "Update": "UpdateTaskRequest"}
                   .get(method, method + "Request"))
    try:
        request = decode_request(method, kind, payload)
    except InvalidArgument:
        return
    assert request.id or method in ("Connect", "Shutdown")
    for name in ("id", "exec_id"):  # what became a path is a plain name
        value = getattr(request, name, "")
        assert "/" not in value and ".." not in value
