"""containerd-shim-runvpy-v2 driven directly over ttrpc, as containerd drives it, with a
stand-in for containerd's event service: calls ctr never makes (CloseIO) and the exact
event sequence. Boots a real VM."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import INITRD, KERNEL, mounts_under, qemu_pids, wait_vms_gone
from runv_py import ttrpc
from runv_py.oci.busybox import make_bundle
from runv_py.shimv2.pb import shimv2_pb2 as pb

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]

TASK = "containerd.task.v2.Task"


class EventSink:
    """containerd's Events/Forward, recording topics."""

    def __init__(self, path: str):
        self.topics = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        server = ttrpc.Server({("containerd.services.events.ttrpc.v1.Events", "Forward"):
                               self.forward})
        threading.Thread(target=server.serve, args=(self.listener,), daemon=True).start()

    def forward(self, payload: bytes) -> bytes:
        self.topics.append(pb.ForwardRequest.FromString(payload).envelope.topic)
        return b""

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


class ShimV2:
    """containerd-shim-runvpy-v2 started as containerd starts it, called over ttrpc."""

    def __init__(self, tmp_path, cid: str, bundle: str, env: dict = None):
        self.cid = cid
        self.sink = EventSink(str(tmp_path / "events.sock"))
        env = dict(os.environ, TTRPC_ADDRESS=str(tmp_path / "events.sock"),
                   RUNVPY_SHIM_LOG_DIR=str(tmp_path), **(env or {}))
        r = subprocess.run([sys.executable, "-m", "runv_py.shimv2", "-namespace", "t", "-address",
                            str(tmp_path / "c.sock"), "-id", cid, "start"],
                           cwd=bundle, env=env, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        self.client = ttrpc.Client(r.stdout.decode().removeprefix("unix://"), timeout=60)
        self.pid = self.call("Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid

    def call(self, method: str, request, reply=None):
        data = self.client.call(TASK, method, request.SerializeToString(), timeout=60)
        return reply.FromString(data) if reply else None

    def code(self, method: str, request) -> int:
        with pytest.raises(ttrpc.TtrpcError) as e:
            self.call(method, request)
        return e.value.code

    def close(self) -> None:
        """Shut the daemon down (it must exit); the sink goes too."""
        try:
            self.call("Shutdown", pb.ShutdownRequest(id=self.cid, now=True))
        except (ttrpc.TtrpcError, OSError):
            pass
        self.client.close()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{self.pid}"):
            os.kill(self.pid, 9)
        self.sink.close()


def test_close_io_ends_stdin_and_events_come_in_order(tmp_path):
    tag = uuid.uuid4().hex[:8]
    cid = f"io-{tag}"
    bundle = make_bundle(str(tmp_path / "bundle"), ["sh", "-c", "cat; echo eof-seen"])
    fifos = {}
    for name in ("stdin", "stdout", "stderr"):
        fifos[name] = str(tmp_path / name)
        os.mkfifo(fifos[name])
    out_fd = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
    sink = EventSink(str(tmp_path / "events.sock"))
    env = dict(os.environ, TTRPC_ADDRESS=str(tmp_path / "events.sock"),
               RUNVPY_SHIM_LOG_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "runv_py.shimv2", "-namespace", "t", "-address",
                        str(tmp_path / "c.sock"), "-id", cid, "start"],
                       cwd=bundle, env=env, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    client = ttrpc.Client(r.stdout.decode().removeprefix("unix://"), timeout=60)
    shim_pid = 0

    def call(method: str, request, reply=None):
        data = client.call(TASK, method, request.SerializeToString(), timeout=60)
        return reply.FromString(data) if reply else None

    try:
        shim_pid = call("Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid
        created = call("Create", pb.CreateTaskRequest(
            id=cid, bundle=bundle, stdin=fifos["stdin"], stdout=fifos["stdout"],
            stderr=fifos["stderr"]), pb.CreateTaskResponse)
        assert created.pid > 0
        state = call("State", pb.StateRequest(id=cid), pb.StateResponse)
        assert (state.status, state.pid) == (pb.CREATED, created.pid)
        call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        writer = os.open(fifos["stdin"], os.O_WRONLY)  # stays open: EOF must come from CloseIO
        os.write(writer, b"abc\n")
        out = b""
        deadline = time.monotonic() + 20
        while b"abc" not in out and time.monotonic() < deadline:
            out += read_some(out_fd)
        assert b"abc" in out
        call("CloseIO", pb.CloseIORequest(id=cid, stdin=True))
        waited = call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
        assert waited.exit_status == 0 and waited.exited_at.seconds > 0
        deadline = time.monotonic() + 5
        while b"eof-seen" not in out and time.monotonic() < deadline:
            out += read_some(out_fd)
        assert out == b"abc\neof-seen\n"
        os.close(writer)
        assert call("State", pb.StateRequest(id=cid), pb.StateResponse).status == pb.STOPPED
        deleted = call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        assert (deleted.pid, deleted.exit_status) == (created.pid, 0)
        call("Shutdown", pb.ShutdownRequest(id=cid))
        deadline = time.monotonic() + 10
        while len(sink.topics) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    finally:
        client.close()
        if shim_pid and os.path.exists(f"/proc/{shim_pid}"):
            deadline = time.monotonic() + 10  # Shutdown ends it; if not, end it here
            while os.path.exists(f"/proc/{shim_pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{shim_pid}"):
                os.kill(shim_pid, 9)
        os.close(out_fd)
        sink.close()
        assert not wait_vms_gone(tag, timeout=10)
        assert not os.path.exists(os.path.join(bundle, "runv", cid))


def read_some(fd: int) -> bytes:
    time.sleep(0.05)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def test_a_task_runs_every_hook_and_unknown_ids_are_not_found(tmp_path):
    """The hooks of a containerd task run at the points the CLI runs them; an unknown
    container or exec id is NotFound, as containerd's errdefs expects."""
    tag = uuid.uuid4().hex[:8]
    cid = f"hk-{tag}"
    log = tmp_path / "hooks.log"
    kinds = ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
             "poststop"]
    bundle = make_bundle(str(tmp_path / "bundle"), ["sleep", "1"])
    spec = json.load(open(os.path.join(bundle, "config.json")))
    spec["hooks"] = {k: [{"path": "/bin/busybox", "args": ["sh", "-c", f"echo {k} >> {log}"]}]
                     for k in kinds}
    json.dump(spec, open(os.path.join(bundle, "config.json"), "w"))
    shim = ShimV2(tmp_path, cid, bundle)
    try:
        assert shim.code("State", pb.StateRequest(id="nope")) == ttrpc.NOT_FOUND
        shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle), pb.CreateTaskResponse)
        assert log.read_text().split() == kinds[:3]
        assert mounts_under(os.path.join(bundle, "runv")), "the check does not see the binds"
        assert shim.code("Start", pb.StartRequest(id=cid, exec_id="nope")) == ttrpc.NOT_FOUND
        assert shim.code("Kill", pb.KillRequest(id="nope", signal=9)) == ttrpc.NOT_FOUND
        shim.call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        assert log.read_text().split() == kinds[:5]
        assert shim.code("Start", pb.StartRequest(id=cid)) == ttrpc.FAILED_PRECONDITION
        assert shim.call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse).exit_status == 0
        shim.call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        assert log.read_text().split() == kinds
        # Sampled while the daemon lives: its mount namespace holds the share's binds.
        assert os.path.exists(f"/proc/{shim.pid}")
        assert mounts_under(os.path.join(bundle, "runv")) == []
        assert mounts_under(os.path.join(bundle, "rootfs")) == []
        assert shim.code("Delete", pb.DeleteRequest(id=cid)) == ttrpc.NOT_FOUND
    finally:
        shim.close()
    assert not qemu_pids(tag)


@pytest.mark.timeout(180)
def test_a_template_in_the_config_makes_every_vm_a_clone(tmp_path, cli_template):
    tag = uuid.uuid4().hex[:8]
    cid = f"tp-{tag}"
    tdir = cli_template
    config = tmp_path / "runv-py.toml"
    config.write_text(f'template = "{tdir}"\nkernel = "{KERNEL}"\ninitrd = "{INITRD}"\n')
    bundle = make_bundle(str(tmp_path / "bundle"), ["sh", "-c", "echo from-a-clone"])
    out = str(tmp_path / "out")
    os.mkfifo(out)
    out_fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    shim = ShimV2(tmp_path, cid, bundle, env={"RUNVPY_CONFIG": str(config)})
    try:
        shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle, stdout=out),
                  pb.CreateTaskResponse)
        [qemu] = qemu_pids(tag)
        assert b"-incoming" in open(f"/proc/{qemu}/cmdline", "rb").read()  # a clone
        shim.call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        assert shim.call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse).exit_status == 0
        assert read_some(out_fd) == b"from-a-clone\n"
        shim.call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
    finally:
        shim.close()
        os.close(out_fd)
    assert not qemu_pids(tag)


def fds_on(pid: int, *paths: str) -> list:
    """The fds of ``pid`` open on any of ``paths``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in paths:
                found.append(fd)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("failure", ["boot", "hook"])
def test_a_failed_create_closes_the_task_stdio(tmp_path, failure):
    """A create that fails after the task's FIFOs were opened closes them (the daemon
    lives on, serving other tasks): before the container exists (its VM cannot boot)
    and after its output was attached (a createRuntime hook fails in the VM's pod)."""
    tag = uuid.uuid4().hex[:8]
    cid = f"fd-{tag}"
    bundle = make_bundle(str(tmp_path / "bundle"), ["true"])
    env = {}
    if failure == "boot":
        config = tmp_path / "runv-py.toml"
        config.write_text(f'kernel = "{tmp_path}/no-kernel"\ninitrd = "{INITRD}"\n')
        env = {"RUNVPY_CONFIG": str(config)}
    else:
        spec = json.load(open(os.path.join(bundle, "config.json")))
        spec["hooks"] = {"createRuntime": [{"path": "/bin/busybox", "args": ["false"]}]}
        json.dump(spec, open(os.path.join(bundle, "config.json"), "w"))
    fifos = [str(tmp_path / name) for name in ("stdin", "stdout", "stderr")]
    for path in fifos:
        os.mkfifo(path)
    shim = ShimV2(tmp_path, cid, bundle, env=env)
    try:
        with pytest.raises(ttrpc.TtrpcError):
            shim.call("Create", pb.CreateTaskRequest(
                id=cid, bundle=bundle, stdin=fifos[0], stdout=fifos[1], stderr=fifos[2]))
        deadline = time.monotonic() + 5
        while fds_on(shim.pid, *fifos) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds_on(shim.pid, *fifos) == [], "the task's FIFOs are still open"
        assert shim.code("State", pb.StateRequest(id=cid)) == ttrpc.NOT_FOUND
    finally:
        shim.close()
    assert not wait_vms_gone(tag, timeout=10)


def test_close_io_loses_none_of_the_stdin_written_before(tmp_path):
    """ctr (`ctr run -i`, `ctr task exec -i` < file) writes all of its input into the
    stdin FIFO, calls CloseIO when it reads the input's end, and only then closes its
    end: what it wrote is still in the FIFO and the pipes behind it (the process is
    slow to read), and must all reach the process before its end-of-file, as with
    runc's shim."""
    tag = uuid.uuid4().hex[:8]
    cid = f"ci-{tag}"
    data = os.urandom(4 << 20)
    bundle = make_bundle(str(tmp_path / "bundle"), ["sh", "-c", "sleep 1; md5sum"])
    fifos = {}
    for name in ("stdin", "stdout"):
        fifos[name] = str(tmp_path / name)
        os.mkfifo(fifos[name])
    out_fd = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
    shim = ShimV2(tmp_path, cid, bundle)
    try:
        shim.call("Create", pb.CreateTaskRequest(id=cid, bundle=bundle, stdin=fifos["stdin"],
                                                 stdout=fifos["stdout"]), pb.CreateTaskResponse)
        shim.call("Start", pb.StartRequest(id=cid), pb.StartResponse)
        writer = os.open(fifos["stdin"], os.O_WRONLY)
        try:
            os.write(writer, data)  # returns once the last of it is in the FIFO
            shim.call("CloseIO", pb.CloseIORequest(id=cid, stdin=True))
        finally:
            os.close(writer)
        assert shim.call("Wait", pb.WaitRequest(id=cid), pb.WaitResponse).exit_status == 0
        out = b""
        deadline = time.monotonic() + 10
        while b"\n" not in out and time.monotonic() < deadline:
            out += read_some(out_fd)
        assert out.split()[:1] == [hashlib.md5(data).hexdigest().encode()], out
        shim.call("Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
    finally:
        shim.close()
        os.close(out_fd)
    assert not wait_vms_gone(tag, timeout=10)
