"""The hyperstart agent and the sandbox API without a VM: the agent runs on the host (the
namespace driver's host agent, PID 1 of its own pid namespace) and is reached over two
socketpairs, with the same typed messages a guest gets."""
import json
import os
import threading
import time
import uuid

import pytest

from runv_py.drivers import probe
from runv_py.hyperstart import errors, messages as m, states
from runv_py.oci import bundle as oci
from runv_py.oci.busybox import make_bundle
from runv_py.sandbox import ProcessIO, Sandbox, private_mount_namespace
from runv_py.vm.boot import BootConfig, DirectFactory

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def driver():
    private_mount_namespace()  # the sandboxes' bind mounts stay in this process
    return probe("namespace")


@pytest.fixture
def sandbox(driver, tmp_path):
    before = set(threading.enumerate())
    box = Sandbox.boot(f"agent-{uuid.uuid4().hex[:8]}", DirectFactory(driver), BootConfig(),
                       str(tmp_path / "sandbox"))
    own = [t for t in set(threading.enumerate()) - before if t.name in ("exits", "vm-watch")]
    assert len(own) == 2
    yield box
    box.destroy()
    assert not box.vm.alive()
    assert [t.name for t in own if t.is_alive()] == [], "destroy() left its threads running"


def bundle(tmp_path, args, name="b", **spec_changes):
    path = make_bundle(str(tmp_path / name), args)
    if spec_changes:
        spec = json.load(open(os.path.join(path, "config.json")))
        spec.update(spec_changes)
        json.dump(spec, open(os.path.join(path, "config.json"), "w"))
    return oci.load(path)


def output_pipe():
    """(read end, ProcessIO writing stdout and stderr into its write end)."""
    r, w = os.pipe()
    return r, ProcessIO(stdout=w, stderr=os.dup(w))


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    os.close(fd)
    return out


def test_messages_both_ways(sandbox, tmp_path):
    agent = sandbox.agent
    assert agent.call(m.GetVersion()).version == 4242
    assert agent.call(m.Ping()) is None
    b = bundle(tmp_path, ["sh", "-c", "echo out; echo err >&2; exit 5"])
    r, io = output_pipe()
    container = sandbox.create_container("c1", b, io)
    assert container.init.pid > 0 and container.state.status == states.CREATED
    sandbox.start_container("c1")
    exit = sandbox.wait("c1", timeout=20)
    assert exit.status == 5 and not exit.oom
    assert sorted(read_all(r).split()) == [b"err", b"out"]   # drained before the exit
    assert container.state.status == states.STOPPED


def test_refusals_carry_their_codes(sandbox, tmp_path):
    agent = sandbox.agent
    cases = [
        (m.StartContainer(container="nope"), errors.NotFound, "no such container"),
        (m.ExecCmd(container="nope", process=m.ProcessSpec(id="e", args=["true"])),
         errors.NotFound, "no such container"),
        (m.NewContainer(id="x", rootfs="missing", process=m.ProcessSpec(id="init", args=["t"])),
         errors.NotFound, "not a directory"),
        (m.NewContainer(id="a/b", rootfs="r", process=m.ProcessSpec(id="init", args=["t"])),
         errors.InvalidArgument, "bad container id"),
        (m.WinSize(seq=999, row=1, column=1), errors.NotFound, "no terminal"),
    ]
    for request, cls, why in cases:
        with pytest.raises(cls, match=why):
            agent.call(request)
    # A payload the agent cannot read: refused as invalid, and the channel goes on.
    agent.control.sendall(m.p.encode_control(m.p.NEWCONTAINER, {"id": 3}))
    with pytest.raises(errors.InvalidArgument):
        agent.call(m.Ping())  # the ERROR above is the oldest answer: it lands here
    assert agent.call(m.Ping()) is None

    b = bundle(tmp_path, ["sleep", "60"])
    sandbox.create_container("c2", b, ProcessIO())
    with pytest.raises(errors.AlreadyExists):
        agent.call(m.NewContainer(id="c2", rootfs="c2/rootfs",
                                  process=m.ProcessSpec(id="init", args=["true"])))
    with pytest.raises(states.StateError, match="cannot exec in container c2: it is created"):
        sandbox.exec("c2", "e1", {"args": ["true"]}, ProcessIO())
    sandbox.start_container("c2")
    with pytest.raises(states.StateError, match="it is running"):
        sandbox.start_container("c2")           # the host's machine refuses it first
    with pytest.raises(errors.FailedPrecondition,
                       match="cannot start container c2: it is running"):
        agent.call(m.StartContainer(container="c2"))  # and so does the agent's
    with pytest.raises(errors.NotFound, match="no process 'e9'"):
        agent.call(m.SignalProcess(container="c2", process="e9", signal=1))
    with pytest.raises(errors.AlreadyExists):
        agent.call(m.ExecCmd(container="c2", process=m.ProcessSpec(id="init", args=["true"])))


def test_sandbox_transitions_and_refusals(sandbox, tmp_path):
    b = bundle(tmp_path, ["sleep", "60"])
    c = sandbox.create_container("c", b, ProcessIO())
    seen = []
    c.state.listeners.append(lambda old, new: seen.append(str(new)))
    sandbox.pause()
    assert c.state.status == states.PAUSED
    with pytest.raises(states.StateError, match="needs created"):
        sandbox.start_container("c")
    sandbox.resume()
    assert c.state.status == states.CREATED
    sandbox.start_container("c")
    r, io = output_pipe()
    proc = sandbox.exec("c", "e1", {"args": ["echo", "hi"]}, io)
    exit = proc.wait(20)
    assert (exit.status, exit.signal) == (0, 0) and read_all(r) == b"hi\n"
    with pytest.raises(errors.AlreadyExists):
        sandbox.exec("c", "e1", {"args": ["true"]}, ProcessIO())
    with pytest.raises(errors.InvalidArgument):
        sandbox.exec("c", "init", {"args": ["true"]}, ProcessIO())
    with pytest.raises(states.StateError, match="cannot signal process e1 of c: it is stopped"):
        sandbox.signal("c", "e1", 15)
    sandbox.pause()
    with pytest.raises(states.StateError, match="cannot exec in container c: it is paused"):
        sandbox.exec("c", "e2", {"args": ["true"]}, ProcessIO())
    with pytest.raises(states.StateError, match="cannot kill container c: it is paused"):
        sandbox.kill("c", 15)
    sandbox.resume()
    sandbox.kill("c", 9)
    exit = sandbox.wait("c", timeout=20)
    assert (exit.status, exit.signal) == (137, 9)     # the signal, not only 128+9
    with pytest.raises(states.StateError, match="it is stopped"):
        sandbox.kill("c", 9)
    with pytest.raises(errors.NotFound):
        sandbox.wait("nope")
    assert seen == ["paused", "created", "running", "paused", "running", "stopped"]


def test_two_containers_share_one_sandbox_but_not_their_namespaces(sandbox, tmp_path):
    boxes = {}
    for name in ("one", "two"):
        b = bundle(tmp_path, ["sleep", "60"], name=name, hostname=f"{name}-host")
        boxes[name] = sandbox.create_container(name, b, ProcessIO())
        sandbox.start_container(name)
    time.sleep(0.3)
    outputs = {}
    for name in boxes:
        r, io = output_pipe()
        proc = sandbox.exec(name, "look", {"args": ["sh", "-c", "hostname; ps -o pid,comm"]}, io)
        assert proc.wait(20).status == 0
        outputs[name] = read_all(r).decode()
    for name, out in outputs.items():
        other = "two" if name == "one" else "one"
        assert out.splitlines()[0] == f"{name}-host"      # its own UTS namespace
        assert "sleep" in out and f"{other}-host" not in out
        assert len([line for line in out.splitlines() if "sleep" in line]) == 1  # own pids
    sandbox.remove_container("one")
    assert "one" not in sandbox.containers and boxes["one"].state.status == states.STOPPED
    assert sandbox.processes("two")
    with pytest.raises(errors.NotFound):
        sandbox.processes("one")


def test_hooks_run_at_the_same_points_as_everywhere(sandbox, tmp_path):
    log = tmp_path / "hooks.log"
    kinds = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
             "poststop")
    # busybox runs the applet its argv[0] names, as docker's libnetwork-setkey hook
    # dispatches on its own: args[0] must reach the hook as argv[0].
    hooks = {k: [{"path": "/bin/busybox", "args": ["sh", "-c", f"echo {k} $(cat) >> {log}"]}]
             for k in kinds}
    b = bundle(tmp_path, ["sleep", "1"], hooks=hooks)
    sandbox.create_container("h", b, ProcessIO(), host_pid=4242)
    sandbox.start_container("h")
    sandbox.wait("h", timeout=20)
    sandbox.remove_container("h")
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(kinds)
    states_seen = [json.loads(line.split(" ", 1)[1]) for line in lines]
    assert [s["status"] for s in states_seen] == ["created"] * 4 + ["running", "stopped"]
    assert all(s["id"] == "h" and s["pid"] in (4242, 0) for s in states_seen)
    bad = bundle(tmp_path, ["true"], name="bad", hooks={"createContainer": [{"path": "/bin/false"}]})
    with pytest.raises(errors.Internal, match="createContainer hook /bin/false failed"):
        sandbox.create_container("bad", bad, ProcessIO())
    assert "bad" not in sandbox.containers
