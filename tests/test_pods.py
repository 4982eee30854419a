"""Pods found by namespace paths (runv_py/shim/member.py): podman's pods and `play kube`,
and containers the CLI is given another container's namespace, share one VM.

podman names its members' namespaces /proc/<infra pid>/ns/*; runv-py reports its shim's
pid, which carries them (host/specns.py), and a member's container is made in the
infra's VM. Network traffic goes only to loopback inside the pods."""
import json
import os
import time

import pytest

from conftest import qemu_pids
from test_clients import docker, docker_run, podman  # noqa: F401  (fixtures)
from test_network import in_netns, netns, sh  # noqa: F401  (the netns fixture)
from test_run import driver, out, runv  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

STATE_ROOT = "/run/runv-py"


def record(cid: str, root: str = STATE_ROOT) -> dict:
    with open(os.path.join(root, cid, "state.json")) as f:
        return json.load(f)


def alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def ns_id(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def guest_ns(client, cid: str, kind: str) -> str:
    return client("exec", cid, "readlink", f"/proc/self/ns/{kind}", check=True).stdout.strip()


def test_podman_pod_members_share_one_vm_hostname_localhost_and_ipc(podman):
    pod = f"rvpod{os.getpid()}"
    podman("pod", "create", "--name", pod, check=True)
    try:
        web = podman.started("run", "-d", "--pod", pod, podman.image, "sh", "-c",
                             "trap 'exit 0' TERM; echo from-a-member > /tmp/i;"
                             " httpd -p 8080 -h /tmp; while :; do sleep 0.2; done")
        other = podman.started("run", "-d", "--pod", pod, podman.image, "sleep", "600")
        infra = podman("pod", "inspect", "-f", "{{.InfraContainerID}}", pod,
                       check=True).stdout.decode().strip()
        qemu = record(infra)["qemu_pid"]
        assert alive(qemu)
        for cid in (web, other):  # one QEMU for the pod: its infra's
            assert record(cid)["qemu_pid"] == qemu and record(cid)["sandbox"] == infra
        # The members' pids carry the pod's namespaces. QEMU (jailed) is not in the host's
        # network: a pooled VM's was made before the pod, in an empty one of its own.
        pod_net = ns_id(record(infra)["pid"], "net")
        assert {ns_id(record(c)["pid"], "net") for c in (web, other)} == {pod_net}
        assert ns_id(qemu, "net") not in (ns_id(os.getpid(), "net"),)
        r = podman("exec", other, "sh", "-c", "hostname; wget -qO- http://localhost:8080/i")
        assert r.returncode == 0 and r.stdout.split() == [pod.encode(), b"from-a-member"], r
        for kind in ("ipc", "uts"):
            assert guest_ns(podman, web, kind) == guest_ns(podman, other, kind)
        addresses = {podman("exec", c, "ip", "-o", "-4", "addr", "show", "eth0",
                            check=True).stdout.split()[3] for c in (web, other)}
        assert len(addresses) == 1, addresses  # one IP: the pod's
        assert podman("pod", "ps", "--filter", f"name={pod}", "--format", "{{.Status}}",
                      check=True).stdout.strip() == b"Running"
        assert guest_ns(podman, web, "pid") != guest_ns(podman, other, "pid")  # not shared
        # Stopped and started again: a new VM, the members in it.
        podman("pod", "stop", "-t", "5", pod, check=True)
        assert wait_gone(qemu)
        podman("pod", "start", pod, check=True)
        qemu = record(infra)["qemu_pid"]
        assert record(web)["qemu_pid"] == qemu and alive(qemu)
        r = podman("exec", other, "wget", "-qO-", "http://localhost:8080/i")
        assert r.returncode == 0 and r.stdout == b"from-a-member\n", r
        # A member removed leaves the others running, in the same VM.
        podman("rm", "-f", "-t", "0", web, check=True)
        assert podman("exec", other, "true").returncode == 0 and alive(qemu)
        assert web not in os.listdir(STATE_ROOT)
        # The pod's end: every container, and the VM.
        podman("pod", "rm", "-f", "-t", "0", pod, check=True)
        assert wait_gone(qemu)
        assert not {infra, other} & set(os.listdir(STATE_ROOT))
    finally:
        podman("pod", "rm", "-f", "-t", "0", pod)


PLAY_KUBE = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: writer
    image: {image}
    command: ["sh", "-c", "echo shared-by-volume > /data/x; exec httpd -f -p 8081 -h /data"]
    ports:
    - containerPort: 8081
    volumeMounts:
    - {{name: scratch, mountPath: /data}}
  - name: reader
    image: {image}
    command: ["sleep", "600"]
    volumeMounts:
    - {{name: scratch, mountPath: /data}}
  volumes:
  - name: scratch
    emptyDir: {{}}
"""


def test_podman_play_kube_two_containers_with_an_empty_dir_and_a_port(podman, tmp_path):
    name = f"rvkube{os.getpid()}"
    spec = tmp_path / "pod.yaml"
    spec.write_text(PLAY_KUBE.format(name=name, image=podman.image))
    podman("play", "kube", str(spec), check=True)
    try:
        reader = f"{name}-reader"
        qemus = {record(podman("inspect", "-f", "{{.Id}}", c, check=True).stdout.decode()
                        .strip())["qemu_pid"] for c in (f"{name}-writer", reader)}
        assert len(qemus) == 1 and all(alive(q) for q in qemus), qemus
        deadline = time.monotonic() + 30
        while True:  # the writer may not have written yet
            r = podman("exec", reader, "sh", "-c", "cat /data/x; wget -qO- http://localhost:8081/x")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.stdout.split() == [b"shared-by-volume", b"shared-by-volume"], r
    finally:
        podman("play", "kube", "--down", str(spec), check=True)
    assert all(wait_gone(q) for q in qemus)


def test_a_container_given_another_s_network_namespace_joins_its_vm(runv, bundle, netns):
    if runv.driver == "namespace":
        pytest.skip("the namespace driver has no VM to join")
    first, second = runv.id(), runv.id("b")
    runv.detached("run", "-d", "-b", in_netns(bundle(
        ["sh", "-c", "echo on-the-first > /tmp/f; exec httpd -f -p 127.0.0.1:8081 -h /tmp"]),
        netns["path"]), first)
    runv.detached("run", "-d", "-b", in_netns(bundle(["sleep", "600"]), netns["path"]), second)
    state = runv.state(second)
    assert state["status"] == "running"
    assert len(qemu_pids(first)) == 1 and not qemu_pids(second)  # the first's VM only
    r = runv("exec", second, "wget", "-qO-", "http://127.0.0.1:8081/f")
    assert r.returncode == 0 and "on-the-first" in out(r), r.stderr
    r = runv("exec", second, "wget", "-qO-", f"http://{netns['net']}.1:8080/")
    assert r.returncode == 0 and "hello from the test host" in out(r), r.stderr
    r = runv("pause", second)
    assert r.returncode != 0 and b"pause or resume the pod" in r.stderr
    runv("delete", "-f", second, check=True)
    assert runv("exec", first, "true").returncode == 0  # the first runs on
    runv("delete", "-f", first, check=True)
    assert not qemu_pids(first)


def test_docker_container_modes_join_the_vm_of_the_container_they_name(docker):
    """--network, --ipc and --pid container:X put the container into X's VM."""
    root = os.path.join(docker.base[2].replace("unix://", "").rsplit("/", 1)[0], "exec",
                        "runtime-runc", "moby")
    x = docker.started(*docker_run("-d", "--ipc", "shareable"), docker.image, "sh", "-c",
                       "echo from-x > /tmp/x; exec httpd -f -p 127.0.0.1:8081 -h /tmp")
    qemu = record(x, root)["qemu_pid"]
    r = docker("run", "--runtime", "runvpy", "--rm", "--network", f"container:{x}", "--ipc",
               f"container:{x}", "--pid", f"container:{x}", docker.image, "sh", "-c",
               "wget -qO- http://127.0.0.1:8081/x; ps -o comm | grep -c httpd")
    assert r.returncode == 0 and r.stdout.split() == [b"from-x", b"1"], r
    assert [d for d in os.listdir(root) if d != x] == []  # the member is gone, x runs on
    assert alive(qemu) and docker("exec", x, "true").returncode == 0
    docker("rm", "-f", x, check=True)
    assert wait_gone(qemu)
