"""Kubernetes pods in VMs: containerd's CRI plugin with the runvpy handler
(io.containerd.runvpy.v2), driven over CRI v1 as kubelet drives it. One VM per pod: the
sandbox (pause) container boots it in the pod's network namespace, the pod's containers
join it. Traffic goes only to loopback inside the pod and from this process to the pod's
address in the harness's private subnet."""
import os
import subprocess
import time
import uuid

import pytest

from conftest import qemu_pids
from cri import api_pb2 as pb
from cri.harness import ExecSyncTimeout, RUNVPY_HANDLER, cri_log_text
from test_cri import MISSING, _busy_stats, _try_get, wait_for
from test_cri import cri as private_containerd  # noqa: F401  (a fixture)
from test_jail import assert_qemu_jailed, same_file

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300),
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture
def cri(private_containerd):
    """test_cri's private containerd, with time for VMs that boot under TCG."""
    private_containerd.client.rpc_timeout = 120
    return private_containerd


def vm_of(pod: str) -> list:
    return qemu_pids(pod)


def tc_and_taps(cri, pod: str) -> str:
    """What runv-py adds to the pod's network namespace, while it exists."""
    netns = [n["path"] for n in cri.client.pod_info(pod)["runtimeSpec"]["linux"]["namespaces"]
             if n["type"] == "network"][0]
    if not os.path.exists(netns):
        return ""
    links = subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "link"],
                           capture_output=True, text=True, timeout=30).stdout
    qdiscs = subprocess.run(["nsenter", f"--net={netns}", "tc", "qdisc", "show"],
                            capture_output=True, text=True, timeout=30).stdout
    return "".join(line for line in (links + qdiscs).splitlines(True)
                   if "tap0_" in line or "ingress" in line)


def test_a_pod_is_one_vm_with_the_pods_network(cri, tmp_path):
    client = cri.client
    logs = tmp_path / "logs"
    page = f"hello from a VM pod {uuid.uuid4().hex[:8]}"
    pod = client.run_pod("vmweb", hostname="vmweb-host", log_dir=str(logs),
                         handler=RUNVPY_HANDLER)
    ip = client.pod_ip(pod)
    [vm] = vm_of(pod)
    assert "tap0_eth0" in tc_and_taps(cri, pod)
    # The pod's QEMU is jailed like a CLI container's, in the pod's network namespace.
    assert_qemu_jailed(vm)
    netns = [n["path"] for n in client.pod_info(pod)["runtimeSpec"]["linux"]["namespaces"]
             if n["type"] == "network"][0]
    assert same_file(f"/proc/{vm}/ns/net", netns)
    web = client.run_container(pod, "web", cri.BUSYBOX, ["sh", "-c"], [
        f"mkdir -p /www && echo '{page}' > /www/index.html && exec httpd -f -p 80 -h /www"])
    fetch = client.run_container(pod, "fetch", cri.BUSYBOX, ["sh", "-c"], [
        "for i in $(seq 1 100); do wget -qO- http://localhost:80/ && exit 0; sleep 0.2; done;"
        " echo never got it >&2; exit 1"])
    assert vm_of(pod) == [vm], "a pod's containers share its VM"
    status = client.wait_container(fetch, pb.CONTAINER_EXITED, timeout=90)
    log = logs / "fetch" / "0.log"
    assert status.exit_code == 0, log.read_text()
    assert cri_log_text(str(log)) == page + "\n"      # containerd wrote the CRI log
    # The guest's eth0 has the pod's address, and the guest kernel is the VM's own.
    code, out, _ = client.exec_sync(web, ["sh", "-c", "ip -o -4 addr show eth0; uname -r"])
    assert code == 0 and f"inet {ip}/" in out.decode(), out
    assert out.decode().split()[-1] != os.uname().release
    # The pod's containers share its UTS namespace (the pod's hostname), as kubelet asks.
    assert client.exec_sync(web, ["hostname"])[1] == b"vmweb-host\n"
    assert wait_for(lambda: _try_get(f"http://{ip}/"), timeout=60, what="the page") == page + "\n"
    # The shim and QEMU live in the pod's host cgroup.
    cgroup = client.pod_info(pod)["runtimeSpec"]["linux"]["cgroupsPath"]
    with open(f"/proc/{vm}/cgroup") as f:
        assert f":memory:{cgroup}\n" in f.read()
    client.stop_pod(pod)
    assert not vm_of(pod), "stopping the pod ends its VM"
    client.remove_pod(pod)
    assert cri.leaks(pod, web, fetch) == []
    assert not os.path.exists(f"/sys/fs/cgroup/memory{cgroup}")


def test_exec_sync_stop_stats_and_growing(cri, tmp_path):
    client = cri.client
    pod = client.run_pod("vmexec", log_dir=str(tmp_path / "logs"), handler=RUNVPY_HANDLER)
    cid = client.run_container(pod, "c", cri.BUSYBOX, ["sleep", "600"], env={"A": "b"},
                               working_dir="/tmp")
    client.wait_container(cid, pb.CONTAINER_RUNNING)
    assert client.exec_sync(cid, ["sh", "-c", 'echo "$A in $(pwd)"; echo err >&2; exit 3']) == \
        (3, b"b in /tmp\n", b"err\n")
    started = time.monotonic()
    with pytest.raises(ExecSyncTimeout):
        client.exec_sync(cid, ["sleep", "30"], timeout=2)
    assert time.monotonic() - started < 15
    code, out, _ = client.exec_sync(cid, ["ps", "-o", "args"])
    assert code == 0 and b"sleep 30" not in out, out     # the timed-out process is gone

    # A second container with limits: the VM grows to hold them (ONLINECPUMEM).
    big = client.run_container(pod, "big", cri.BUSYBOX, ["sleep", "600"],
                               resources={"cpu_period": 100000, "cpu_quota": 200000,
                                          "memory_limit_in_bytes": 512 << 20})
    code, out, _ = client.exec_sync(big, ["sh", "-c", "nproc; cat /sys/fs/cgroup/memory.max;"
                                                      " grep MemTotal /proc/meminfo"])
    nproc, limit, memtotal = out.decode().split("\n")[:3]
    assert code == 0 and int(nproc) == min(2, os.cpu_count()) and limit == str(512 << 20)
    assert int(memtotal.split()[1]) > 512 * 1024, memtotal

    stats = wait_for(lambda: _busy_stats(client, cid), what="stats")
    assert stats.memory.working_set_bytes.value > 0

    started = time.monotonic()
    client.stop_container(cid, timeout=2)           # sleep as PID 1 ignores SIGTERM
    assert time.monotonic() - started < 15
    status = client.container_status(cid)
    assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 137)
    client.stop_pod(pod)
    client.remove_pod(pod)
    assert not vm_of(pod) and cri.leaks(pod, cid, big) == []


def test_a_container_that_exits_is_restarted_in_the_same_vm(cri, tmp_path):
    """kubelet's restart of a pod's container: the exited attempt is removed, the next
    attempt created and started in the same pod; it runs in the same VM, beside the
    pod's other containers, on the pod's network."""
    client = cri.client
    logs = tmp_path / "logs"
    pod = client.run_pod("vmrestart", hostname="restart-host", log_dir=str(logs),
                         handler=RUNVPY_HANDLER)
    [vm] = vm_of(pod)
    keeper = client.run_container(pod, "keeper", cri.BUSYBOX, ["sleep", "600"])
    script = ["sh", "-c", "echo run $(cat /proc/sys/kernel/random/boot_id) $(hostname)"]
    first = client.run_container(pod, "job", cri.BUSYBOX, script)
    assert client.wait_container(first, pb.CONTAINER_EXITED, timeout=90).exit_code == 0
    client.remove_container(first)
    second = client.run_container(pod, "job", cri.BUSYBOX, script, attempt=1)
    assert client.wait_container(second, pb.CONTAINER_EXITED, timeout=90).exit_code == 0
    one = cri_log_text(str(logs / "job" / "0.log"))
    two = cri_log_text(str(logs / "job" / "1.log"))
    assert one.startswith("run ") and one == two, (one, two)   # same guest, same hostname
    assert one.split()[-1] == "restart-host"
    assert vm_of(pod) == [vm], "restarted in the pod's VM"
    status = client.container_status(keeper)
    assert status.state == pb.CONTAINER_RUNNING, "the pod's other container kept running"
    client.stop_pod(pod)
    client.remove_pod(pod)
    assert not vm_of(pod) and cri.leaks(pod, keeper, second) == []


def test_a_privileged_container_and_mounts_propagating_between_the_pods_containers(cri, tmp_path):
    """A privileged container starts (every capability, the guest's devices); a mount it
    makes under a Bidirectional volume reaches the pod's other container, which has the
    volume HostToContainer; a mount the host makes later under the volume reaches both
    (its files: the share carries them); the guest's mount does not reach the host."""
    client = cri.client
    vol = tmp_path / "vol"
    vol.mkdir()
    # CRI asks the volume to be on a shared mount for Bidirectional.
    subprocess.run(["mount", "-t", "tmpfs", "vol", str(vol)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(vol)], check=True)
        pod = client.run_pod("vmpriv", log_dir=str(tmp_path / "logs"), handler=RUNVPY_HANDLER,
                             privileged=True)
        priv = client.run_container(
            pod, "priv", cri.BUSYBOX, ["sleep", "600"],
            mounts=[pb.Mount(container_path="/vol", host_path=str(vol),
                             propagation=pb.PROPAGATION_BIDIRECTIONAL)],
            security_context=pb.LinuxContainerSecurityContext(privileged=True))
        other = client.run_container(
            pod, "other", cri.BUSYBOX, ["sleep", "600"],
            mounts=[pb.Mount(container_path="/vol", host_path=str(vol),
                             propagation=pb.PROPAGATION_HOST_TO_CONTAINER)])
        for cid in (priv, other):
            client.wait_container(cid, pb.CONTAINER_RUNNING)
        code, out, err = client.exec_sync(priv, ["sh", "-c", (
            "grep CapEff /proc/self/status; readlink /dev/ptmx;"
            " mkdir /vol/in && mount -t tmpfs in /vol/in && echo inside > /vol/in/f && echo mounted")])
        # containerd grants a privileged container its own capabilities (all but what
        # this machine's root lacks).
        with open("/proc/self/status") as f:
            own = [line.rstrip("\n") for line in f if line.startswith("CapEff:")]
        assert code == 0 and out.decode().splitlines() == own + ["pts/ptmx", "mounted"], (out, err)
        code, out, err = client.exec_sync(other, ["cat", "/vol/in/f"])
        assert (code, out) == (0, b"inside\n"), err
        assert (vol / "in").is_dir() and not (vol / "in" / "f").exists()
        (vol / "later").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "later", str(vol / "later")], check=True)
        (vol / "later" / "g").write_text("from the host\n")
        for cid in (priv, other):
            code, out, err = client.exec_sync(cid, ["cat", "/vol/later/g"])
            assert (code, out) == (0, b"from the host\n"), err
        client.stop_pod(pod)
        client.remove_pod(pod)
        assert cri.leaks(pod, priv, other) == []
    finally:
        subprocess.run(["umount", "-R", "-l", str(vol)], check=False)
