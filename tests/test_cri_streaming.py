"""CRI streaming: Exec with a tty and stdin, Attach, PortForward, through containerd's
streaming server over WebSocket (cri/streaming.py), as kubelet's clients drive it
(`kubectl exec -it`, `kubectl attach`, `kubectl port-forward`).

Each handler gets one pod (module-scoped, shared by the checks): ``runc`` pins down
what containerd's streaming server does; ``runvpy`` is what we ship. The pod runs a
busybox httpd ("web", the target of execs and of the port-forward) and an interactive
``sh`` on a terminal ("term", the target of attaches). Traffic goes only to loopback
(containerd's streaming server) and, through containerd, inside the pod."""
import hashlib
import os
import time
import uuid
from types import SimpleNamespace

import pytest

from conftest import qemu_pids
from cri import api_pb2 as pb
from cri.harness import (BUSYBOX_IMAGE, RUNC_HANDLER, RUNVPY_HANDLER, checked_containerd,
                         missing_prerequisites)
from cri.streaming import CHANNEL_PROTOCOL, RemoteCommand, http_get
from test_cri import wait_for

MISSING = missing_prerequisites()
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

RUNVPY = pytest.param(RUNVPY_HANDLER, marks=pytest.mark.vm, id="runvpy")
HANDLERS = [pytest.param(RUNC_HANDLER, id="runc"), RUNVPY]


@pytest.fixture(scope="module")
def containerd():
    """One private containerd for the module (both handlers' pods); on the way out it
    must not have had to force anything away (as test_cri's fixture)."""
    with checked_containerd(rpc_timeout=120) as c:  # VMs boot under TCG
        yield c


@pytest.fixture(scope="module")
def pod(request, containerd, tmp_path_factory):
    """The handler's pod with "web" (httpd serving ``page`` on port 80), "term" (``sh``
    on a terminal with stdin open) and "pipe" (a shell loop on stdin, without a
    terminal), all running; removed, and checked for leaks, after the handler's last
    test."""
    handler = request.param
    client = containerd.client
    logs = tmp_path_factory.mktemp(f"streaming-{handler}")
    page = f"streamed from a {handler} pod {uuid.uuid4().hex[:8]}\n"
    pod_id = client.run_pod(f"stream-{handler}", log_dir=str(logs), handler=handler)
    cids = []
    try:
        cids.append(client.run_container(pod_id, "web", BUSYBOX_IMAGE, ["sh", "-c"], [
            f"mkdir -p /www && printf '{page}' > /www/index.html"
            " && exec httpd -f -p 80 -h /www"]))
        cids.append(client.run_container(pod_id, "term", BUSYBOX_IMAGE, ["sh"],
                                         tty=True, stdin=True))
        cids.append(client.run_container(pod_id, "pipe", BUSYBOX_IMAGE, ["sh", "-c", (
            "while read line; do echo out-$line; echo err-$line >&2; done")], stdin=True))
        for cid in cids:
            client.wait_container(cid, pb.CONTAINER_RUNNING, timeout=90)
        # httpd answers inside the pod before any test forwards to it.
        code, out, err = client.exec_sync(cids[0], ["sh", "-c", (
            "for i in $(seq 1 100); do wget -qO- http://localhost:80/ && exit 0;"
            " sleep 0.1; done; exit 1")], timeout=60)
        assert (code, out.decode()) == (0, page), err
        yield SimpleNamespace(handler=handler, client=client, id=pod_id, web=cids[0],
                              term=cids[1], pipe=cids[2], page=page, logs=logs)
    finally:
        client.stop_pod(pod_id)
        client.remove_pod(pod_id)
        assert not qemu_pids(pod_id), "the pod's VM outlived it"
        assert containerd.leaks(pod_id, *cids) == []


def _args(client, cid: str) -> list:
    """The command lines of the container's processes (ps's own last)."""
    code, out, _ = client.exec_sync(cid, ["ps", "-o", "args"])
    assert code == 0, out
    return [line.split()[0] for line in out.decode().split("\n")[1:-1]]


@pytest.mark.parametrize("pod", HANDLERS, indirect=True)
def test_exec_with_a_tty_runs_an_interactive_shell(pod):
    """`kubectl exec -it web -- sh`: a shell on a terminal runs what is typed, the
    terminal takes the client's size, and the status channel carries the exit code."""
    client = pod.client
    with RemoteCommand(client.exec_url(pod.web, ["sh"], tty=True, stdin=True)) as sh:
        assert sh.protocol == CHANNEL_PROTOCOL
        sh.resize(100, 30)  # kubectl sends the terminal's size first
        sh.write("echo hi-$((6*7)) $(tty)\n")
        sh.read_until("hi-42 /dev/pts/")  # (the command line's echo has "$((6*7))")
        # The resize reaches the terminal (asynchronously: containerd relays it).
        sh.write('for i in $(seq 1 50); do [ "$(stty size)" = "30 100" ] && break;'
                 ' sleep 0.1; done; echo size-$(stty size | tr " " x)\n')
        sh.read_until("size-30x100")
        sh.write("exit 3\n")
        status = sh.status()
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
        assert sh.exit_code() == 3

    with RemoteCommand(client.exec_url(pod.web, ["sh"], tty=True, stdin=True)) as sh:
        sh.write("exit 0\n")
        assert sh.status()["status"] == "Success"
        assert sh.exit_code() == 0

    # A shell killed by a signal: 128 + the signal, as runc's shim reports it.
    with RemoteCommand(client.exec_url(pod.web, ["sh"], tty=True, stdin=True)) as sh:
        sh.write("kill -9 $$\n")
        assert sh.exit_code() == 137

    # Without a terminal: stdout and stderr come on their own channels.
    with RemoteCommand(client.exec_url(pod.web, ["sh", "-c", "echo out; echo err >&2; exit 7"],
                                       tty=False, stdin=False)) as cmd:
        assert cmd.exit_code() == 7
        assert cmd.received().get(1) == b"out\n" and cmd.received().get(2) == b"err\n", \
            cmd.received()
    # No process of these execs is left in the container.
    wait_for(lambda: _args(client, pod.web) == ["httpd", "ps"], timeout=20,
             what="the execs' processes to end")


@pytest.mark.parametrize("pod", HANDLERS, indirect=True)
def test_exec_stdin_is_delivered_to_its_end(pod):
    """`tar cf - . | kubectl exec -i web -- tar xf -` (what `kubectl cp` does): all of
    stdin reaches the process, then end-of-file when the client's stream ends
    (containerd closes its FIFO and calls CloseIO), and the process ends."""
    client = pod.client
    data = os.urandom(1 << 20)
    path = f"/tmp/got-{uuid.uuid4().hex[:8]}"
    # The process is slow to read (the input waits in the pipes), and keeps its stdout
    # open (containerd ends the session's stdin when the process's output ends).
    script = f"sleep 1; cat > {path}; echo done"
    with RemoteCommand(client.exec_url(pod.web, ["sh", "-c", script],
                                       tty=False, stdin=True)) as cat:
        cat.wait_ready()  # (sent before containerd starts the process)
        for at in range(0, len(data), 32 << 10):
            cat.write(data[at:at + (32 << 10)])
    # The stream is closed: cat gets end-of-file and ends. (Its file exists once the
    # exec has started; then only httpd is left, beside the ps looking.)
    wait_for(lambda: client.exec_sync(pod.web, ["test", "-e", path])[0] == 0, timeout=60,
             what="the exec to start")
    wait_for(lambda: _args(client, pod.web) == ["httpd", "ps"], timeout=60, what="cat to end")
    code, out, _ = client.exec_sync(pod.web, ["sh", "-c", f"wc -c < {path}; md5sum {path}"])
    assert code == 0
    assert out.decode().split()[:2] == [str(len(data)), hashlib.md5(data).hexdigest()]


@pytest.mark.parametrize("pod", HANDLERS, indirect=True)
def test_attach_to_a_containers_terminal(pod):
    """`kubectl attach -it term`: what is typed reaches the container's own shell, its
    output comes back, the client's size reaches its terminal; detaching leaves the
    container running, and it can be attached again. Then `kubectl attach -i` to a
    container without a terminal."""
    client = pod.client
    for n, (cols, rows) in ((6, (90, 20)), (7, (120, 40))):
        with RemoteCommand(client.attach_url(pod.term, tty=True, stdin=True)) as term:
            assert term.protocol == CHANNEL_PROTOCOL
            term.resize(cols, rows)
            term.write(f"echo at-$(({n}*7))\n")
            term.read_until(f"at-{n * 7}")
            term.write(f'for i in $(seq 1 50); do [ "$(stty size)" = "{rows} {cols}" ] && break;'
                       ' sleep 0.1; done; echo size-$(stty size | tr " " x)\n')
            term.read_until(f"size-{rows}x{cols}")
        time.sleep(0.5)
        assert client.container_status(pod.term).state == pb.CONTAINER_RUNNING

    # `kubectl attach -i pipe`: no terminal; stdout and stderr on their own channels.
    with RemoteCommand(client.attach_url(pod.pipe, tty=False, stdin=True)) as pipe:
        pipe.wait_ready()
        pipe.write("x\n")
        assert pipe.read_until("out-x\n") == b"out-x\n"
        assert pipe.read_until("err-x\n", channel=2) == b"err-x\n"
    time.sleep(0.5)
    assert client.container_status(pod.pipe).state == pb.CONTAINER_RUNNING


@pytest.mark.parametrize("pod", HANDLERS, indirect=True)
def test_port_forward_reaches_the_pods_httpd(pod):
    """`kubectl port-forward`: a connection through the stream reaches port 80 in the
    pod, where busybox httpd serves the page."""
    url = pod.client.port_forward_url(pod.id, [80])
    assert http_get(url, 80, timeout=30) == (200, pod.page.encode())
