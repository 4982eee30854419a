"""Unit tests of what both ends of each protocol share: the typed hyperstart messages,
the error codes that cross the agent channel and shim.sock, and the state machines."""
import itertools
import json

import pytest

from runv_py.hyperstart import errors, messages as m, protocol as p, states
from runv_py.shim import protocol as shim_protocol


def roundtrip(msg):
    """Encode as the sender does, decode as the receiver does."""
    frame = m.encode(msg)
    [(code, payload)] = p.FrameReader(p.CONTROL_HEADER).feed(frame)
    assert code == type(msg).CODE
    return m.decode(type(msg), payload)


EXAMPLES = [
    m.GetVersion(), m.Ping(), m.StartPod(hostname="h", share_tag="runvshare"), m.DestroyPod(),
    m.NewContainer(id="c1", rootfs="c1/rootfs", readonly=True, hostname="box",
                   mounts=[m.Mount(destination="/data", type="bind", source="c1/mounts/0",
                                   options=["rbind", "ro"], shared=True)],
                   limits={"memory.max": "67108864", "pids.max": "max"}, wait=True,
                   process=m.ProcessSpec(
                       id="init", args=["sh", "-c", "echo hi"], env=["A=1"], cwd="/tmp",
                       terminal=True, user=m.User(uid=1000, gid=100, additional_gids=[5, 6]),
                       rlimits=[m.Rlimit(type="RLIMIT_NOFILE", soft=10, hard=20)],
                       no_new_privileges=True,
                       capabilities=m.Capabilities(bounding=["CAP_KILL"], ambient=[]),
                       console_size=m.ConsoleSize(height=40, width=100), stdio=3, stderr=0)),
    m.StartContainer(container="c1"),
    m.ExecCmd(container="c1", process=m.ProcessSpec(id="e1", args=["true"], stdio=4, stderr=5)),
    m.KillContainer(container="c1", signal=9, all=True),
    m.SignalProcess(container="c1", process="e1", signal=2), m.RemoveContainer(container="c1"),
    m.WinSize(seq=3, row=24, column=80), m.WriteFile(container="c1", file="pids.max", data="MTA=",
                                                     cgroup=True),
    m.ReadFile(container="c1", file="/etc/hostname"), m.ProcessList(container="c1"),
    m.Reseed(data="AAAA", hostname="clone"), m.StreamClosed(seq=7),
    m.ProcessExited(container="c1", process="init", status=137, oom=True),
    m.ErrorReply(message="no such container", code=errors.NOT_FOUND),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_message_survives_the_wire(msg):
    assert roundtrip(msg) == msg


def test_replies_and_the_wire_format_are_hyperstarts():
    frame = m.encode(m.StartPod(hostname="h", share_tag="t", share_kind="virtiofs"))
    assert json.loads(frame[8:]) == {"hostname": "h", "shareTag": "t",  # camelCase keys
                                     "shareKind": "virtiofs"}
    assert m.encode(m.Ping()) == p.encode_control(p.PING)                # empty payload
    reply = m.ProcessListReply(processes=[m.ProcessInfo(pid=1, ppid=0, state="S", uid=0,
                                                        rss_kb=12, cmd="sh", nspid=1)])
    assert m.ProcessListReply.from_wire(reply.to_wire()) == reply
    assert m.ProcessList.REPLY is m.ProcessListReply and m.Ping.REPLY is None


@pytest.mark.parametrize("payload,why", [
    ({"id": "c"}, "rootfs is required"),
    ({"id": 5, "rootfs": "r", "process": {"id": "i", "args": ["x"]}}, "expected str"),
    ({"id": "c", "rootfs": "r", "process": {"id": "i", "args": "x"}}, "expected a list"),
    ({"id": "c", "rootfs": "r", "wait": 1, "process": {"id": "i", "args": ["x"]}}, "expected bool"),
    ({"id": "c", "rootfs": "r", "process": {"id": "i", "args": ["x"], "user": {"uid": True}}},
     "expected int"),
])
def test_bad_messages_are_invalid_arguments(payload, why):
    with pytest.raises(errors.InvalidArgument, match=why):
        m.NewContainer.from_wire(payload)


def test_error_codes_cross_as_their_classes():
    for cls in (errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition,
                errors.InvalidArgument, errors.Unavailable, errors.Internal):
        err = errors.from_code(roundtrip(m.ErrorReply(message="x", code=cls.code)).code, "x")
        assert type(err) is cls and err.code in errors.CODES
        with pytest.raises(cls, match="why"):
            shim_protocol.check(json.loads(shim_protocol.error(cls("why"))))
    assert type(errors.from_code("BOGUS", "x")) is errors.Internal
    assert errors.code_of(KeyError("x")) == errors.INTERNAL


def test_shim_requests_roundtrip_and_bad_ones_are_refused():
    req = shim_protocol.Exec(container="c", exec_id="e", process={"args": ["ls"]})
    assert shim_protocol.decode(shim_protocol.encode(req)) == req
    for bad in (b"{", b'{"op": "nope"}', b'{"op": "kill", "signl": 9}', b"[]"):
        with pytest.raises(errors.InvalidArgument):
            shim_protocol.decode(bad)


ALL = (states.CREATING, states.CREATED, states.RUNNING, states.PAUSED, states.STOPPED)

# The oracle, written out from the OCI runtime spec's lifecycle and runc's behaviour
# (not read from states.TRANSITIONS): create ends created, or stopped if it fails; start
# runs a created container; pause and resume go both ways, and resume returns a paused
# created container to created (runc); kill (or the VM's end) stops any but a stopped
# one; nothing leaves stopped, and no status goes to itself or back to creating.
ALLOWED = {
    ("creating", "created"), ("creating", "stopped"),
    ("created", "running"), ("created", "paused"), ("created", "stopped"),
    ("running", "paused"), ("running", "stopped"),
    ("paused", "running"), ("paused", "created"), ("paused", "stopped"),
}


@pytest.mark.parametrize("old,new", list(itertools.product(ALL, ALL)))
def test_every_transition_is_allowed_or_refused_by_name(old, new):
    machine = states.StateMachine("container c", old)
    seen = []
    machine.listeners.append(lambda a, b: seen.append((a, b)))
    if (str(old), str(new)) in ALLOWED:
        assert machine.to(new) == old and machine.status == new and seen == [(old, new)]
    else:
        with pytest.raises(states.StateError) as e:
            machine.to(new, "do")
        assert e.value.code == errors.FAILED_PRECONDITION
        assert e.value.current == old and f"it is {old}" in str(e.value)
        assert machine.status == old and seen == []
        assert set(map(str, e.value.required)) == {a for a, b in ALLOWED if b == new}


def test_pause_resumes_to_where_it_was_and_guards_name_the_states():
    machine = states.StateMachine("container c", states.CREATED)
    machine.pause()
    assert machine.status == states.PAUSED
    machine.resume()
    assert machine.status == states.CREATED          # runc: a paused created container
    machine.to(states.RUNNING)
    machine.pause()
    machine.resume()
    assert machine.status == states.RUNNING
    with pytest.raises(states.StateError, match=r"cannot resume container c: it is running "
                                                r"\(needs paused\)"):
        machine.resume()
    machine.stop()
    assert not machine.stop()                         # stopping twice is no change
    with pytest.raises(states.StateError, match="needs created or running"):
        machine.pause()
    assert states.Status.parse("running") is states.RUNNING
    with pytest.raises(errors.InvalidArgument):
        states.Status.parse("sleeping")
