"""The node's VM factory (runv_py/factory), with real VMs: a private factory (its own
directory) serves the CLI's shims; containers get its pooled VMs (template clones for
9p, cold-booted VMs for virtio-fs), the factory is restarted and killed while its VMs
run, a shim is killed, and nothing is left behind."""
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import INITRD, KERNEL, Runv
from test_cri import MISSING, http_get, wait_for
from test_network import in_netns, netns  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


class NodeFactory:
    """A factory process of the test's own (RUNV_FACTORY_DIR), and the env that sends a
    runv-py command to it."""

    def __init__(self, directory: str, share: str):
        self.dir = directory
        self.share = share
        self.env = dict(os.environ, RUNV_FACTORY="on", RUNV_FACTORY_DIR=directory,
                        RUNV_SHARE=share, RUNV_FACTORY_POOL="2")
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runv_py.factory", "--kernel", KERNEL, "--initrd", INITRD,
             "--pool", "2", "--share", self.share],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "test-factory.log"), "ab"))
        wait_for(lambda: os.path.exists(os.path.join(self.dir, "factory.sock")), 30,
                 what="the factory's socket")

    def ask(self, op: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "runv_py.cli", "factory", "status", "--json"]
                           if op == "status" else
                           [sys.executable, "-m", "runv_py.cli", "factory", op],
                           env=self.env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if op == "status" else {}

    def ready(self, count: int = 2) -> dict:
        def full():
            pools = self.ask("status")["pools"]
            return pools and all(len(p["ready"]) >= count for p in pools) and pools
        return wait_for(full, 120, what="the pool to fill")

    def warm(self, nics: int) -> None:
        """Have the factory keep VMs with ``nics`` NICs ready too."""
        subprocess.run([sys.executable, "-c",
                        "import sys; from runv_py.factory import client; from runv_py.vm.boot "
                        "import BootConfig; client.warm(BootConfig(kernel=sys.argv[1], "
                        "initrd=sys.argv[2], share=sys.argv[3]), nics=int(sys.argv[4]))",
                        KERNEL, INITRD, self.share, str(nics)],
                       env=self.env, check=True, timeout=30)

    def stop(self) -> None:
        """Stop whichever factory serves the directory (ours, or one a shim started)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        elif os.path.exists(os.path.join(self.dir, "factory.sock")):
            subprocess.run([sys.executable, "-m", "runv_py.cli", "factory", "stop"],
                           env=self.env, capture_output=True, timeout=30)
        wait_for(lambda: not os.path.exists(os.path.join(self.dir, "factory.sock")), 30,
                 what="the factory to stop")

    def vm_dirs(self) -> list:
        vms = os.path.join(self.dir, "vms")
        return sorted(os.listdir(vms)) if os.path.isdir(vms) else []

    def qemus(self) -> list:
        """QEMU processes (their jails' tools, whose command lines carry QEMU's and the VM's
        directory) and share servers this factory's directory serves."""
        out = subprocess.run(["pgrep", "-f", f"(qemu-system|virtiofsd|virtfs-proxy-helper).*{self.dir}"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if alive(int(p))]  # zombies are init's to reap


def new_factory(share: str, env: dict = None) -> NodeFactory:
    node = NodeFactory(f"/run/runv-py-test-factory-{uuid.uuid4().hex[:8]}", share)
    node.env.update(env or {})
    os.makedirs(node.dir, mode=0o700)
    node.start()
    return node


@contextlib.contextmanager
def own_factory(tmp_path, **env):
    """A 9p factory of the test's own with ``env`` (RUNV_* switches), and a CLI that uses
    it; afterwards its containers are deleted and nothing of it may be left."""
    node = new_factory("9p", env)
    r = Runv(str(tmp_path / "state"), uuid.uuid4().hex[:8])
    try:
        yield node, r
    finally:
        for cid in os.listdir(r.root) if os.path.isdir(r.root) else []:
            subprocess.run(r.args("delete", "--force", cid), env=node.env, timeout=60,
                           capture_output=True)
        assert not dispose(node)


def template_memory_files(node: NodeFactory) -> list:
    from runv_py.vm.template import memory_file_for
    templates = os.path.join(node.dir, "templates")
    return [memory_file_for(os.path.join(templates, t)) for t in
            (os.listdir(templates) if os.path.isdir(templates) else []) if not t.startswith(".")]


def dispose(node: NodeFactory) -> list:
    """Stop the factory, kill and remove whatever it left; returns what it left: QEMU
    pids and template memory files (the factory removes its templates when it stops)."""
    memory_files = template_memory_files(node)
    node.stop()
    deadline = time.monotonic() + 5
    while node.qemus() and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = node.qemus()
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-R", "-l", os.path.join(node.dir, "vms")], capture_output=True,
                   timeout=30)
    subprocess.run(["rm", "-rf", node.dir], timeout=30)
    left_files = [f for f in memory_files if os.path.exists(f)]
    for f in left_files:
        os.unlink(f)
    return leftover + left_files


@pytest.fixture(params=["9p", "virtiofs"])
def factory(request):
    node = new_factory(request.param)
    yield node
    leftover = dispose(node)
    assert not leftover, f"factory VMs or memory files leaked: {leftover}"


@pytest.fixture
def frunv(tmp_path, factory):
    """The CLI with the test's factory on."""
    r = Runv(str(tmp_path / "state"), uuid.uuid4().hex[:8])
    yield r
    for cid in os.listdir(r.root) if os.path.isdir(r.root) else []:
        subprocess.run(r.args("delete", "--force", cid), env=factory.env, timeout=60,
                       capture_output=True)


def run(r, factory, *args, timeout=120):
    return subprocess.run(r.args(*args), env=factory.env, capture_output=True, timeout=timeout)


def detached(r, factory, *args):
    """A command whose shim keeps its stdio: output to files, not pipes."""
    with tempfile.TemporaryFile() as err:
        result = subprocess.run(r.args(*args), env=factory.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, timeout=120)
        err.seek(0)
        result.stderr = err.read()
    return result


def served(factory, cid: str) -> dict:
    vms = [v for v in factory.ask("status")["vms"] if v["container"] == cid]
    return vms[0] if vms else {}


def test_containers_get_pooled_vms_that_are_not_twins(frunv, factory, bundle):
    factory.ready()
    b = bundle(["sh", "-c", "cat /proc/sys/kernel/random/boot_id; hostname;"
                            " head -c 16 /dev/urandom | od -An -tx1; cat /proc/mounts"])
    seen = []
    for name in ("a", "b"):
        cid = frunv.id(name)
        r = run(frunv, factory, "run", "-b", b, cid)
        assert r.returncode == 0, r.stderr
        boot_id, hostname, random, *mounts = r.stdout.decode().splitlines()
        assert hostname == "runv-py"  # the spec's, not the template's or a sibling's
        # The rootfs reached the guest over the factory's share kind.
        assert any(f" {'9p' if factory.share == '9p' else 'virtiofs'} " in m for m in mounts)
        seen.append((boot_id, random))
    assert seen[0][0] != seen[1][0], "two pooled VMs share a boot id"
    assert seen[0][1] != seen[1][1], "two pooled VMs gave the same random bytes"
    # A template's ready clones ran the warm-up (hyperstart/warmup.py) without a fault.
    log = open(os.path.join(factory.dir, "test-factory.log")).read()
    assert "warm-up" not in log, log


@pytest.mark.timeout(180)
def test_ready_clones_can_wait_stopped_and_still_have_the_host_s_time(tmp_path, bundle):
    """``factory_pause`` (RUNV_FACTORY_PAUSE=on): a template's clone waits stopped, and
    a stopped VM's clock stands still; the shim that takes it resumes it and gives it
    the host's time."""
    with own_factory(tmp_path, RUNV_FACTORY_PAUSE="on") as (node, r):
        node.ready()
        time.sleep(8)  # longer than the check's slack below
        cid = r.id()
        res = detached(r, node, "run", "-d", "-b", bundle(["sleep", "60"]), cid)
        assert res.returncode == 0, res.stderr
        assert served(node, cid)["paused"] is True  # it waited stopped
        out = run(r, node, "exec", cid, "date", "+%s")
        assert out.returncode == 0, out.stderr
        assert abs(int(out.stdout.decode().split()[0]) - time.time()) < 4, out.stdout


def test_a_container_from_the_factory_and_its_cleanup(frunv, factory, bundle):
    factory.ready()
    cid = frunv.id()
    r = detached(frunv, factory, "run", "-d", "-b", bundle(["sleep", "300"]), cid)
    assert r.returncode == 0, r.stderr
    vm = served(factory, cid)
    assert vm, "the factory does not list the container"
    state = json.loads(run(frunv, factory, "state", cid).stdout)
    assert state["status"] == "running"
    record = json.load(open(os.path.join(frunv.root, cid, "state.json")))
    assert record["qemu_pid"] == vm["qemu_pid"]
    r = run(frunv, factory, "exec", cid, "echo", "exec ok")
    assert r.returncode == 0 and b"exec ok" in r.stdout, r.stderr
    assert run(frunv, factory, "delete", "-f", cid).returncode == 0
    wait_for(lambda: not alive(vm["qemu_pid"]), 10, what="the VM to stop")
    wait_for(lambda: vm["name"] not in factory.vm_dirs(), 10, what="the VM's directory to go")
    with open("/proc/self/mountinfo") as f:
        assert vm["name"] not in f.read()


def test_the_factory_restarts_while_its_vms_run(frunv, factory, bundle):
    factory.ready()
    cid = frunv.id()
    assert detached(frunv, factory, "run", "-d", "-b", bundle(["sleep", "300"]), cid).returncode == 0
    vm = served(factory, cid)
    pooled = [n for p in factory.ask("status")["pools"] for n in p["ready"]]
    factory.stop()
    assert alive(vm["qemu_pid"]), "a handed-out VM died with the factory"
    r = run(frunv, factory, "exec", cid, "echo", "still here")
    assert r.returncode == 0 and b"still here" in r.stdout, r.stderr
    # The pooled VMs went with the factory; the new one watches the handed-out VM again.
    assert not set(pooled) & set(factory.vm_dirs())
    factory.start()
    assert served(factory, cid)["qemu_pid"] == vm["qemu_pid"]
    assert run(frunv, factory, "delete", "-f", cid).returncode == 0
    wait_for(lambda: not alive(vm["qemu_pid"]), 10, what="the VM to stop")
    wait_for(lambda: vm["name"] not in factory.vm_dirs(), 10, what="the VM's directory to go")


def test_a_killed_factory_means_a_cold_boot_and_no_leak(frunv, factory, bundle, tmp_path):
    pooled = factory.ready()
    pooled_pids = set(factory.qemus())
    factory.proc.kill()
    factory.proc.wait(10)
    os.unlink(os.path.join(factory.dir, "factory.sock"))  # what a killed process leaves
    log = tmp_path / "shim.log"
    r = run(frunv, factory, "--log", str(log), "run", "-b", bundle(["true"]), frunv.id())
    assert r.returncode == 0, r.stderr
    assert "booting cold, and starting one" in log.read_text()
    # The shim started a new factory, which stopped the pool its predecessor left.
    wait_for(lambda: os.path.exists(os.path.join(factory.dir, "factory.sock")), 30,
             what="a new factory")
    wait_for(lambda: not pooled_pids & set(factory.qemus()), 30, what="the orphaned pool to go")
    assert not {n for p in pooled for n in p["ready"]} & set(factory.vm_dirs())
    factory.stop()
    wait_for(lambda: not factory.qemus(), 30, what="the new factory's pool to go")


def test_a_killed_shim_leaves_nothing(frunv, factory, bundle):
    factory.ready()
    cid = frunv.id()
    assert detached(frunv, factory, "run", "-d", "-b", bundle(["sleep", "300"]), cid).returncode == 0
    vm = served(factory, cid)
    shim = json.load(open(os.path.join(frunv.root, cid, "state.json")))["shim_pid"]
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: not alive(vm["qemu_pid"]), 15, what="the factory to stop the VM")
    wait_for(lambda: vm["name"] not in factory.vm_dirs(), 10, what="the VM's directory to go")
    with open("/proc/self/mountinfo") as f:
        assert vm["name"] not in f.read(), "the dead shim's mounts are still there"
    assert run(frunv, factory, "delete", "-f", cid).returncode == 0


def test_a_killed_qemu_ends_its_container_and_nothing_stays(frunv, factory, bundle):
    factory.ready()
    cid = frunv.id()
    assert detached(frunv, factory, "run", "-d", "-b", bundle(["sleep", "300"]), cid).returncode == 0
    vm = served(factory, cid)
    os.kill(vm["qemu_pid"], signal.SIGKILL)
    wait_for(lambda: json.loads(run(frunv, factory, "state", cid).stdout or b"{}").get("status")
             == "stopped", 30, what="the container to stop")
    wait_for(lambda: vm["name"] not in factory.vm_dirs(), 10, what="the VM's directory to go")
    assert not served(factory, cid)
    assert run(frunv, factory, "delete", cid).returncode == 0


def test_memory_files_are_private(factory):
    if factory.share != "9p":
        pytest.skip("virtio-fs VMs have anonymous memory (memfd)")
    factory.ready()
    from runv_py.vm.template import SHM_DIR
    import pwd
    assert stat.S_IMODE(os.stat(SHM_DIR).st_mode) == 0o700 and os.stat(SHM_DIR).st_uid == 0
    files = [os.path.join(SHM_DIR, n) for n in os.listdir(SHM_DIR)]
    assert files
    # Owned by the user jailed QEMUs run as (every clone opens its template's file), in a
    # directory only root can enter.
    vm_uid = pwd.getpwnam("runv-py-vm").pw_uid
    for path in files:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == vm_uid, path
    assert stat.S_IMODE(os.stat(os.path.join(factory.dir, "vms")).st_mode) == 0o700


def test_a_pooled_vm_takes_the_pods_network(frunv, factory, bundle, netns):
    factory.warm(nics=1)
    factory.ready()
    cid = frunv.id()
    b = in_netns(bundle(["sh", "-c", "ip link show eth0; ip -4 addr show eth0;"
                                     f" wget -qO- http://{netns['net']}.1:8080/"]), netns["path"])
    veth_mac = subprocess.run(["ip", "-n", netns["pod"], "-j", "link", "show", "eth0"],
                              capture_output=True, text=True, timeout=30).stdout
    veth_mac = json.loads(veth_mac)[0]["address"]
    log = os.path.join(frunv.root, "..", "shim.log")
    r = run(frunv, factory, "--log", log, "run", "-b", b, cid)
    assert r.returncode == 0, r.stderr
    assert "from the factory" in open(log).read()
    assert veth_mac in r.stdout.decode()  # the guest NIC took the veth's MAC
    assert f"inet {netns['net']}.2/24" in r.stdout.decode()
    assert "hello from the test host" in r.stdout.decode()
    # Nothing stays in the pod's namespace: no tap, no redirection.
    links = subprocess.run(["ip", "-n", netns["pod"], "-o", "link"], capture_output=True,
                           text=True, timeout=30).stdout
    assert "tap0_" not in links and "rvf" not in links


@pytest.mark.parametrize("share", ["9p", "virtiofs"])
def test_a_cri_pod_comes_from_the_factory(share):
    """Kubernetes' path: the shim v2's pod VM is a pooled VM with a NIC and room to grow
    (a template's clone for 9p), reached from the host at the pod's address; a container
    with a memory limit grows it; it goes with the pod."""
    from cri.harness import RUNVPY_HANDLER, CriContainerd
    if MISSING:
        pytest.skip(MISSING)
    node = new_factory(share)
    cri = CriContainerd(env={k: node.env[k] for k in ("RUNV_FACTORY", "RUNV_FACTORY_DIR",
                                                      "RUNV_SHARE", "RUNV_FACTORY_POOL")})
    cri.start()
    try:
        cri.client.rpc_timeout = 120
        first = cri.client.run_pod("cold", handler=RUNVPY_HANDLER)  # makes the pod shape's pool
        cri.client.stop_pod(first)
        cri.client.remove_pod(first)
        node.ready(1)
        pod = cri.client.run_pod("pooled", handler=RUNVPY_HANDLER)
        vm = served(node, pod)
        assert vm and vm["nic"], "the pod's VM is not the factory's"
        page = f"pooled pod {uuid.uuid4().hex[:6]}"
        cri.client.run_container(pod, "web", cri.BUSYBOX, ["sh", "-c"], [
            f"mkdir -p /www && echo '{page}' > /www/index.html && exec httpd -f -p 80 -h /www"])
        grown = cri.client.run_container(pod, "grown", cri.BUSYBOX, ["sleep", "300"],
                                         resources={"cpu_period": 100000, "cpu_quota": 200000,
                                                    "memory_limit_in_bytes": 512 << 20})
        code, out, _ = cri.client.exec_sync(grown, ["sh", "-c", "nproc; grep MemTotal "
                                                                "/proc/meminfo"], 30)
        nproc, memtotal = out.decode().splitlines()[:2]
        assert code == 0 and int(nproc) == min(2, os.cpu_count()), out  # the VM grew
        assert int(memtotal.split()[1]) > 512 * 1024, out
        ip = cri.client.pod_ip(pod)
        text = wait_for(lambda: _try(lambda: http_get(f"http://{ip}:80/")), 60, what="the pod's web")
        assert text.strip() == page
        cri.client.stop_pod(pod)
        cri.client.remove_pod(pod)
        wait_for(lambda: not alive(vm["qemu_pid"]), 15, what="the pod's VM to stop")
        wait_for(lambda: vm["name"] not in node.vm_dirs(), 10, what="its directory to go")
    finally:
        forced = cri.stop()
        leftover = dispose(node)
    assert not forced, f"clean-up had to force: {forced}"
    assert not leftover, f"factory VMs or memory files leaked: {leftover}"


def _try(fn):
    try:
        return fn()
    except OSError:
        return None


def ksm_stat(pid: int) -> dict:
    with open(f"/proc/{pid}/ksm_stat") as f:
        pairs = (line.split(None, 1) for line in f.read().splitlines())
        return {key.rstrip(":"): value for key, value in pairs}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("asked", [True, False], ids=["ksm", "no-ksm"])
def test_ksm_merges_clones_memory_only_when_the_node_asks(tmp_path, bundle, asked):
    """``RUNV_KSM=on`` (``ksm = true``): the factory's QEMUs have all their memory
    mergeable, and ksmd merges pages of two running clones. Off by default: then only
    the guest RAM QEMU itself offers is."""
    if not os.path.exists("/sys/kernel/mm/ksm/run"):
        pytest.skip("this kernel has no KSM")
    with open("/sys/kernel/mm/ksm/run") as f:
        was = f.read().strip()
    with own_factory(tmp_path, **({"RUNV_KSM": "on"} if asked else {})) as (node, r):
        try:
            node.ready()
            cids = [r.id(n) for n in ("a", "b")]
            for cid in cids:
                res = detached(r, node, "run", "-d", "-b", bundle(["sleep", "300"]), cid)
                assert res.returncode == 0, res.stderr
            qemus = [served(node, cid)["qemu_pid"] for cid in cids]
            assert all(ksm_stat(q)["ksm_merge_any"] == ("yes" if asked else "no") for q in qemus)
            if not asked:
                return
            with open("/sys/kernel/mm/ksm/run", "w") as f:
                f.write("1")
            with open("/sys/kernel/mm/ksm/full_scans") as f:
                scans = int(f.read())
            wait_for(lambda: int(open("/sys/kernel/mm/ksm/full_scans").read()) >= scans + 2,
                     180, what="two full KSM scans")
            merged = [int(ksm_stat(q)["ksm_merging_pages"]) for q in qemus]
            assert all(n > 256 for n in merged), merged  # more than 1 MiB each
        finally:
            with open("/sys/kernel/mm/ksm/run", "w") as f:
                f.write("2" if was == "0" else was)  # 2: stop, and unmerge what was merged


@pytest.mark.timeout(240)
def test_a_shape_nobody_asks_for_is_not_kept_warm(tmp_path, bundle):
    """Bounded memory: a pool unused for RUNV_FACTORY_POOL_IDLE seconds is closed, its
    ready VMs stopped and its template (and memory file) removed; asked for again, the
    shape is served (cold at first) and warm again."""
    with own_factory(tmp_path, RUNV_FACTORY_POOL_IDLE="6") as (node, r):
        node.ready()
        files = template_memory_files(node)
        assert files and all(os.path.exists(f) for f in files)
        wait_for(lambda: not node.ask("status")["pools"], 60, what="the idle pool to close")
        wait_for(lambda: not node.qemus(), 30, what="its ready VMs to stop")
        assert not any(os.path.exists(f) for f in files)
        assert not os.listdir(os.path.join(node.dir, "vms"))
        b = bundle(["echo", "served"])
        res = run(r, node, "run", "-b", b, r.id("again"))
        assert res.returncode == 0 and b"served" in res.stdout, res.stderr
        node.ready()
