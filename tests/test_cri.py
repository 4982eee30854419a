"""Kubernetes CRI through containerd 1.6's CRI plugin, driven as kubelet would over the
CRI v1 gRPC API (tests/cri: a private containerd, a CNI bridge network of its own).

These tests use the default ``runc`` handler: they pin down what CRI, CNI and the
harness do with a reference runtime, so that the same scenarios can later run with the
``runvpy`` handler (io.containerd.runvpy.v2). Network traffic goes only to loopback
inside the pods and from this process to the pods' addresses in the harness's private
subnet.
"""
import ipaddress
import json
import os
import time
import urllib.request
import uuid

import pytest

from conftest import gone
from cri import api_pb2 as pb
from cri.harness import (CriContainerd, ExecSyncTimeout, RUNVPY_HANDLER, checked_containerd,
                         cri_log_text, missing_prerequisites, parse_cri_time, read_cri_log)

MISSING = missing_prerequisites()
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture
def cri():
    """A fresh private containerd with CRI per test (0.5 s to start); on the way out
    every pod goes through CRI, then stop() forces away whatever CRI left (and says
    what it had to force: that fails the test)."""
    with checked_containerd() as containerd:
        yield containerd


def http_get(url: str, timeout: float = 5) -> str:
    """GET ``url`` directly (never through a proxy from the environment)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(predicate, timeout: float = 20, interval: float = 0.2, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


def assert_pod_gone(cri: CriContainerd, pod_id: str, ids=(), netns: str = "") -> None:
    """Nothing of a removed pod is left: not listed, no netns, no veth on the bridge,
    no mount naming its ids, no process in its cgroups, no IP lease, no CNI cache."""
    assert [p.id for p in cri.client.list_pods()] == []
    assert not netns or not os.path.exists(netns), netns
    assert cri.leaks(pod_id, *ids) == []


def test_pod_sandbox_gets_an_address_in_the_private_subnet(cri, tmp_path):
    client = cri.client
    uid = uuid.uuid4().hex
    annotations = {"example.com/note": "kept as is"}
    pod = client.run_pod("net", uid=uid, namespace="cri-test", hostname="net-host",
                         log_dir=str(tmp_path / "logs"), annotations=annotations,
                         labels={"app": "net"})
    status = client.pod_status(pod).status
    assert status.state == pb.SANDBOX_READY
    assert (status.metadata.name, status.metadata.uid, status.metadata.namespace) == \
        ("net", uid, "cri-test")
    assert dict(status.annotations) == annotations and dict(status.labels) == {"app": "net"}
    ip = ipaddress.ip_address(status.network.ip)
    assert ip in cri.subnet and ip != next(cri.subnet.hosts()), status.network
    assert status.linux.namespaces.options.pid == pb.CONTAINER

    info = client.pod_info(pod)
    netns = info["runtimeSpec"]["linux"]["namespaces"]
    netns = next(n["path"] for n in netns if n["type"] == "network")
    assert netns.startswith(cri.state) and os.path.exists(netns), netns
    assert info["runtimeType"] == "io.containerd.runc.v2"
    assert info["runtimeSpec"]["linux"]["cgroupsPath"] == f"{cri.cgroup_parent}/{pod}"
    assert info["pid"] in cri.cgroup_pids()  # the pause process
    assert len(cri.bridge_ports()) == 1
    assert [p.id for p in client.list_pods(labels={"app": "net"})] == [pod]
    assert client.list_pods(labels={"app": "other"}) == []

    # The pod's own view: its hostname, its address, loopback, no route off the subnet.
    cid = client.run_container(pod, "look", cri.BUSYBOX, ["sh", "-c", "sleep 600"])
    code, out, _ = client.exec_sync(cid, ["sh", "-c", "hostname; ip -o -4 addr show eth0; "
                                          "ip route; cat /etc/resolv.conf"])
    assert code == 0 and out.decode().splitlines()[0] == "net-host", out
    assert f"inet {ip}/{cri.subnet.prefixlen}" in out.decode(), out
    assert "default" not in out.decode() and "nameserver 127.0.0.1" in out.decode(), out

    client.stop_pod(pod)
    assert client.pod_status(pod).status.state == pb.SANDBOX_NOTREADY
    assert client.container_status(cid).state == pb.CONTAINER_EXITED
    assert not os.path.exists(netns) and cri.bridge_ports() == []
    client.remove_pod(pod)
    assert client.list_containers() == []
    assert_pod_gone(cri, pod, [cid], netns)


def test_http_between_containers_and_from_the_host(cri, tmp_path):
    """busybox httpd in one container; a second container of the pod fetches the page
    through the pod's loopback and prints it into its CRI log; this process fetches it
    at the pod's address."""
    client = cri.client
    logs = tmp_path / "logs"
    page = f"hello from pod {uuid.uuid4().hex[:8]}"
    pod = client.run_pod("web", log_dir=str(logs))
    ip = client.pod_ip(pod)
    web = client.run_container(pod, "web", cri.BUSYBOX, ["sh", "-c"], [
        f"mkdir -p /www && echo '{page}' > /www/index.html && exec httpd -f -p 80 -h /www"])
    fetch = client.run_container(pod, "fetch", cri.BUSYBOX, ["sh", "-c"], [
        "for i in $(seq 1 50); do wget -qO- http://localhost:80/ && exit 0; sleep 0.2; done;"
        " echo never got it >&2; exit 1"])
    status = client.wait_container(fetch, pb.CONTAINER_EXITED, timeout=60)
    log_path = logs / "fetch" / "0.log"
    assert status.exit_code == 0, log_path.read_text()
    assert status.reason == "Completed" and status.log_path == str(log_path)
    assert 0 < status.created_at <= status.started_at <= status.finished_at
    records = read_cri_log(str(log_path))
    assert [(s, tag, text) for _, s, tag, text in records] == [("stdout", "F", page)], records
    when = parse_cri_time(records[0][0]).timestamp()
    assert abs(when - time.time()) < 120, records[0][0]
    assert cri_log_text(str(log_path)) == page + "\n"

    assert wait_for(lambda: _try_get(f"http://{ip}/"), what="the page") == page + "\n"
    running = client.list_containers(pod_id=pod, state=pb.CONTAINER_RUNNING)
    assert [c.id for c in running] == [web]
    assert {c.metadata.name for c in client.list_containers(pod_id=pod)} == {"web", "fetch"}

    client.stop_pod(pod)
    client.remove_pod(pod)
    assert_pod_gone(cri, pod, [web, fetch])


def _try_get(url: str):
    try:
        return http_get(url, timeout=2)
    except OSError:
        return None


def test_exec_sync_output_exit_code_and_timeout(cri):
    client = cri.client
    pod = client.run_pod("exec")
    cid = client.run_container(pod, "c", cri.BUSYBOX, ["sleep", "600"],
                               env={"GREETING": "hi there"}, working_dir="/tmp")
    client.wait_container(cid, pb.CONTAINER_RUNNING)
    assert client.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == \
        (3, b"out\n", b"err\n")
    assert client.exec_sync(cid, ["sh", "-c", 'echo "$GREETING in $(pwd)"']) == \
        (0, b"hi there in /tmp\n", b"")
    code, out, _ = client.exec_sync(cid, ["seq", "1", "100000"])  # 589 KB, all of it
    assert code == 0 and out.splitlines()[-1] == b"100000" and len(out.splitlines()) == 100000

    started = time.monotonic()
    with pytest.raises(ExecSyncTimeout):
        client.exec_sync(cid, ["sleep", "30"], timeout=2)
    elapsed = time.monotonic() - started
    assert 1.9 < elapsed < 10, elapsed
    # containerd killed the command: not in the container, not on the host.
    code, out, _ = client.exec_sync(cid, ["ps", "-o", "args"])
    assert code == 0 and b"sleep 30" not in out, out
    for pid in cri.cgroup_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read() != b"sleep\x0030\x00", pid
    assert client.container_status(cid).state == pb.CONTAINER_RUNNING

    client.stop_pod(pod)
    client.remove_pod(pod)
    assert_pod_gone(cri, pod, [cid])


def test_stop_container_honours_its_timeout(cri, tmp_path):
    client = cri.client
    pod = client.run_pod("stop", log_dir=str(tmp_path / "logs"))
    # Handles SIGTERM: stops at once with its own status.
    polite = client.run_container(pod, "polite", cri.BUSYBOX, ["sh", "-c"], [
        "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 1; done"])
    # PID 1 without a handler: SIGTERM is ignored, SIGKILL comes after the timeout.
    stubborn = client.run_container(pod, "stubborn", cri.BUSYBOX, ["sleep", "600"])
    log = tmp_path / "logs" / "polite" / "0.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), what="polite's ready")

    started = time.monotonic()
    client.stop_container(polite, timeout=20)
    assert time.monotonic() - started < 8
    status = client.container_status(polite)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 0, "Completed")
    assert cri_log_text(str(log)) == "ready\ngot-term\n"

    client.wait_container(stubborn, pb.CONTAINER_RUNNING)
    started = time.monotonic()
    client.stop_container(stubborn, timeout=2)
    elapsed = time.monotonic() - started
    assert 1.9 < elapsed < 10, elapsed
    status = client.container_status(stubborn)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137, "Error")
    assert status.finished_at > status.started_at > 0
    client.stop_container(stubborn, timeout=2)  # idempotent

    client.remove_container(polite)
    assert [c.id for c in client.list_containers(pod_id=pod)] == [stubborn]
    client.stop_pod(pod)
    client.remove_pod(pod)
    assert_pod_gone(cri, pod, [polite, stubborn])


def test_container_stats_and_resources(cri):
    """ContainerStats has figures; the container's limits reach its cgroup on the
    host (under the harness's cgroup parent) and UpdateContainerResources changes them."""
    client = cri.client
    pod = client.run_pod("stats")
    limits = {"cpu_period": 100000, "cpu_quota": 50000, "cpu_shares": 512,
              "memory_limit_in_bytes": 64 << 20}
    cid = client.run_container(pod, "busy", cri.BUSYBOX, ["sh", "-c"], [
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; x=$(seq 1 20000); sleep 600"],
        resources=limits)
    client.wait_container(cid, pb.CONTAINER_RUNNING)
    stats = wait_for(lambda: _busy_stats(client, cid), what="CPU time in the stats")
    assert stats.attributes.id == cid and stats.attributes.metadata.name == "busy"
    assert stats.memory.working_set_bytes.value > 0 and stats.memory.timestamp > 0
    assert stats.writable_layer.fs_id.mountpoint.startswith(cri.root)
    assert [s.attributes.id for s in client.list_container_stats(pod)] == [cid]

    path = client.container_info(cid)["runtimeSpec"]["linux"]["cgroupsPath"]
    assert path == f"{cri.cgroup_parent}/{cid}"

    def cgroup(controller: str, name: str) -> int:
        with open(f"/sys/fs/cgroup/{controller}{path}/{name}") as f:
            return int(f.read())
    assert cgroup("memory", "memory.limit_in_bytes") == 64 << 20
    assert (cgroup("cpu", "cpu.cfs_quota_us"), cgroup("cpu", "cpu.cfs_period_us"),
            cgroup("cpu", "cpu.shares")) == (50000, 100000, 512)
    client.update_container_resources(cid, dict(limits, memory_limit_in_bytes=96 << 20,
                                                cpu_quota=80000))
    assert cgroup("memory", "memory.limit_in_bytes") == 96 << 20
    assert cgroup("cpu", "cpu.cfs_quota_us") == 80000

    client.stop_pod(pod)
    client.remove_pod(pod)
    assert_pod_gone(cri, pod, [cid])


def _busy_stats(client, cid):
    stats = client.container_stats(cid)
    return stats if stats.cpu.usage_core_nano_seconds.value > 0 else None


def test_runvpy_handler_is_configured(cri):
    """The runvpy handler is in CRI's configuration (io.containerd.runvpy.v2), next to
    the default runc one; nothing runs with it here."""
    config = json.loads(cri.client.status(verbose=True).info["config"])
    runtimes = config["containerd"]["runtimes"]
    assert runtimes[RUNVPY_HANDLER]["runtimeType"] == "io.containerd.runvpy.v2"
    assert runtimes["runc"]["runtimeType"] == "io.containerd.runc.v2"
    assert config["containerd"]["defaultRuntimeName"] == "runc"
    assert config["sandboxImage"] == cri.PAUSE and config["restrictOOMScoreAdj"] is True
    assert config["cni"]["confDir"] == cri.cni_conf_dir and config["netnsMountsUnderStateDir"]
    networks = json.loads(cri.client.status(verbose=True).info["cniconfig"])["Networks"]
    assert [n["Config"]["Name"] for n in networks] == ["cni-loopback", cri.network]
    images = {tag for image in cri.client.list_images() for tag in image.repo_tags}
    assert {cri.PAUSE, cri.BUSYBOX} <= images


def test_harness_cleans_up_after_containerd_dies():
    """When containerd itself is gone (crashed, or killed by a test), stop() still
    removes what its pods left: shims, their processes, mounts, netns, the bridge,
    shim sockets and CNI cache entries."""
    containerd = CriContainerd()
    try:
        containerd.start()
        client = containerd.client
        pod = client.run_pod("orphan")
        cid = client.run_container(pod, "c", containerd.BUSYBOX, ["sleep", "600"])
        pids = containerd.cgroup_pids()
        assert len(pids) == 2 and containerd.shim_pids() and containerd.leaks(pod, cid)
        containerd.proc.kill()
        containerd.proc.wait(10)
    finally:
        forced = containerd.stop()
    assert any(f.startswith("mount ") for f in forced) and any(f.startswith("shim ") for f in forced)
    assert not os.path.exists(containerd.base)
    assert not os.path.exists(f"/sys/class/net/{containerd.bridge}")
    assert containerd.cgroup_dirs() == [] and containerd.mounts(pod, cid) == []
    assert containerd.shim_sockets(pod, cid) == [] and containerd.cni_cache_files(pod, cid) == []
    for pid in pids:
        assert gone(pid), pid


@pytest.mark.vm
@pytest.mark.timeout(240)
def test_runvpy_pod_serves_http(cri, tmp_path):
    client = cri.client
    client.rpc_timeout = 90
    pod = client.run_pod("vm", log_dir=str(tmp_path / "logs"), handler=RUNVPY_HANDLER)
    ip = client.pod_ip(pod)
    cid = client.run_container(pod, "web", cri.BUSYBOX, ["sh", "-c"], [
        "mkdir -p /www && echo vm-page > /www/index.html && exec httpd -f -p 80 -h /www"])
    assert client.exec_sync(cid, ["uname", "-r"])[1].strip() != os.uname().release.encode()
    assert wait_for(lambda: _try_get(f"http://{ip}/"), timeout=60) == "vm-page\n"
    client.stop_pod(pod)
    client.remove_pod(pod)
    assert_pod_gone(cri, pod, [cid])
