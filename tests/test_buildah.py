"""buildah 1.28 with runv-py as its runtime: `buildah bud` and `buildah run`, with
`--network none` and with buildah's default network (CNI, which puts a veth into the
container's new network namespace between `create` and `start`: runv_py/net/late.py).
The base image is the busybox rootfs the tests make (no registry); storage, runv-py's
state root and the CNI network (a bridge and a subnet of the test's own, no masquerade)
are the test's. Traffic goes only to a server in a namespace the test made, on that
bridge."""
import glob
import json
import os
import shutil
import signal
import subprocess
import uuid

import pytest

import images
from conftest import INITRD, KERNEL, mounts_under, wait_vms_gone
from runv_py.net.pod import TAP_PREFIX

RUNV = shutil.which("runv-py")
pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]
BASE = "localhost/runvpy/busybox:test"


def sh(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


class Buildah:
    """buildah with private storage, running containers with runv-py (its own --root)."""

    def __init__(self, base: str):
        self.dir = base
        self.state = f"{base}/state"
        self.base = ["buildah", "--root", f"{base}/root", "--runroot", f"{base}/run",
                     "--storage-driver", "vfs"]
        self.runtime = ["--runtime", RUNV, "--runtime-flag", f"root={self.state}",
                        "--runtime-flag", f"kernel={KERNEL}", "--runtime-flag", f"initrd={INITRD}"]
        # CNI whatever else is installed (netavark would ignore --cni-config-dir).
        with open(f"{base}/containers.conf", "w") as f:
            f.write('[network]\nnetwork_backend = "cni"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=f"{base}/containers.conf")

    def __call__(self, *args, timeout=240, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.base + list(args), capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        if check:
            assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
        return r

    def run(self, container: str, *command, network=()) -> str:
        """`buildah run` of ``command`` in ``container`` through runv-py; its stdout."""
        return self("run", *self.runtime, *network, container, "--", *command).stdout

    def no_leaks(self) -> None:
        """No runv-py container of buildah's is left (its ids are buildah-buildahNNN): no
        QEMU, state directory, tap, mount or cgroup."""
        assert not wait_vms_gone("buildah-buildah", timeout=20), "QEMU processes leaked"
        left = os.listdir(self.state) if os.path.isdir(self.state) else []
        assert not left, f"state directories left: {left}"
        assert TAP_PREFIX not in sh("ip", "-o", "link", "show")
        assert not mounts_under(self.dir), mounts_under(self.dir)
        cgroups = glob.glob("/sys/fs/cgroup/*/buildah-buildah*") + \
            glob.glob("/sys/fs/cgroup/*/*/buildah-buildah*")
        assert not cgroups, cgroups


@pytest.fixture(scope="module")
def buildah(tmp_path_factory):
    if not shutil.which("buildah"):
        pytest.skip("buildah is not installed (apt-get install buildah)")
    base = str(tmp_path_factory.mktemp("buildah"))
    client = Buildah(base)
    archive = images.oci_archive(f"{base}/busybox.tar", base, BASE)
    client("pull", f"oci-archive:{archive}")
    try:
        yield client
    finally:
        client("rm", "--all", check=False)
        client("rmi", "--all", "--force", check=False)
        client.no_leaks()
        # vfs layers hold read-only files; buildah's storage is the test's alone.
        subprocess.run(["rm", "-rf", base], timeout=120)


@pytest.fixture
def built(buildah, tmp_path):
    """build(containerfile, *options) -> image name: `buildah bud` through runv-py; every
    working container and image the test made is removed afterwards."""
    made = []

    def build(containerfile: str, *options: str) -> str:
        context = tmp_path / f"context{len(made)}"
        context.mkdir()
        (context / "Containerfile").write_text(containerfile)
        name = f"localhost/runvpy/built-{uuid.uuid4().hex[:8]}"
        buildah("bud", *buildah.runtime, *options, "-t", name, str(context))
        made.append(name)
        return name
    yield build
    buildah("rm", "--all", check=False)
    for name in made:
        buildah("rmi", "--force", name, check=False)
    buildah.no_leaks()


TWO_STEPS = f"""FROM {BASE}
RUN uname -r > /kernel && echo first > /step1
RUN cat /step1 > /step2 && echo second >> /step2
"""


def test_bud_and_run_without_a_network_run_in_vms(buildah, built):
    image = built(TWO_STEPS, "--network", "none")
    container = buildah("from", image).stdout.strip()
    out = buildah.run(container, "sh", "-c", "cat /kernel /step2; uname -r; ip -o -4 addr",
                      network=("--network", "none"))
    kernel, first, second, run_kernel, *addrs = out.splitlines()
    # Both RUN steps and the `buildah run` ran in the guest's kernel, not the host's.
    assert kernel == run_kernel != os.uname().release and kernel.startswith("6.1"), out
    assert (first, second) == ("first", "second"), out
    assert [a.split()[1] for a in addrs] == ["lo"], out   # no network: loopback only
    # The host's network is refused before any VM is made, in words buildah shows.
    r = buildah("run", *buildah.runtime, "--network", "host", container, "--", "true",
                check=False)
    assert r.returncode != 0 and "host networking is not supported" in r.stderr, r.stderr


@pytest.fixture
def cni(tmp_path):
    """buildah's default network from a CNI config of the test's own: a bridge (made by
    the test, so a server can be on it first) with 10.95.N.0/24, containers taking
    .2-.99; a server namespace on the bridge at .200 serving HTTP on :8080."""
    if not os.path.exists("/usr/lib/cni/bridge"):
        pytest.skip("CNI plugins are not installed (apt-get install containernetworking-plugins)")
    tag = uuid.uuid4().hex[:6]
    bridge, server_ns, net = f"rvbb{tag}", f"rvbsrv-{tag}", f"10.95.{int(tag[:2], 16)}"
    conf = tmp_path / "cni"
    conf.mkdir()
    ipam = tmp_path / "ipam"
    (conf / "buildah.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "podman", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(ipam),
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "ranges": [[{"subnet": f"{net}.0/24", "gateway": f"{net}.1",
                                  "rangeStart": f"{net}.2", "rangeEnd": f"{net}.99"}]]}}]}))
    server = None
    sh("ip", "link", "add", bridge, "type", "bridge")
    try:
        sh("ip", "netns", "add", server_ns)
        sh("ip", "link", "add", f"vb{tag}", "type", "veth", "peer", "name", f"vs{tag}")
        sh("ip", "link", "set", f"vb{tag}", "master", bridge, "up")
        sh("ip", "link", "set", bridge, "up")
        sh("ip", "link", "set", f"vs{tag}", "netns", server_ns)
        sh("ip", "-n", server_ns, "addr", "add", f"{net}.200/24", "dev", f"vs{tag}")
        sh("ip", "-n", server_ns, "link", "set", f"vs{tag}", "up")
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from the test's namespace\n")
        server = subprocess.Popen(["ip", "netns", "exec", server_ns, "busybox", "httpd", "-f",
                                   "-p", f"{net}.200:8080", "-h", str(www)])
        yield {"dir": str(conf), "net": net, "url": f"http://{net}.200:8080/",
               "bridge": bridge, "port": f"vb{tag}", "ipam": ipam}
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", server_ns], timeout=30)
        subprocess.run(["ip", "link", "del", bridge], timeout=30)


# busybox timeout, not wget -T: Debian's busybox wget crashes when given -T.
def fetch(url: str) -> str:
    return f"for i in 1 2 3 4 5; do timeout 5 wget -qO- {url} && break; sleep 1; done"


def test_bud_and_run_on_buildah_s_default_network_reach_the_test_s_server(buildah, built, cni):
    image = built(f"""FROM {BASE}
RUN ip -4 -o addr show eth0 > /addr && ip route > /route
RUN {fetch(cni['url'])} > /page && test -s /page
""", "--cni-config-dir", cni["dir"])
    container = buildah("from", "--cni-config-dir", cni["dir"], image).stdout.strip()
    out = buildah.run(container, "sh", "-c", f"cat /addr /route /page; echo run:; uname -r;"
                      f" ip -4 -o addr show eth0; {fetch(cni['url'])}")
    built_part, run_part = out.split("run:\n")
    assert f"inet {cni['net']}." in built_part and f"default via {cni['net']}.1" in built_part
    assert "hello from the test's namespace" in built_part, out
    run_kernel, addr, page = run_part.splitlines()
    assert run_kernel != os.uname().release and f"inet {cni['net']}." in addr, out
    assert page == "hello from the test's namespace", out
    buildah("rm", container)
    # Every container's veth and address went with it: the bridge keeps the server's
    # port alone, host-local has no lease left, no redirection is on the bridge.
    ports = sh("ip", "-o", "link", "show", "master", cni["bridge"])
    assert [line.split(":")[1].strip().split("@")[0] for line in ports.splitlines()] == [cni["port"]]
    leases = [n for n in os.listdir(cni["ipam"] / "podman") if n.startswith(cni["net"])]
    assert not leases, leases
    assert "ingress" not in sh("tc", "qdisc", "show", "dev", cni["bridge"])


def test_a_killed_container_ends_as_with_runc(buildah, built, tmp_path):
    """buildah waits for the pid the runtime reported (runv-py's is the shim's) as its
    subreaper: a container killed by a signal reaches buildah as with runc, which says
    "container exited on killed" and exits 1 (not "exit status 137")."""
    image = built(f"FROM {BASE}\n", "--network", "none")
    container = buildah("from", image).stdout.strip()
    runc_root = str(tmp_path / "runc")
    ends = {}
    for name, runtime, root, command in (
            ("runc", ["--runtime", shutil.which("runc"), "--runtime-flag", f"root={runc_root}"],
             runc_root, [shutil.which("runc")]),
            ("runv-py", buildah.runtime, buildah.state, [RUNV])):
        run = subprocess.Popen(buildah.base + ["run", *runtime, "--network", "none", container,
                                               "--", "sh", "-c", "echo up; sleep 120"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=buildah.env)
        try:
            assert run.stdout.readline() == "up\n"
            (cid,) = os.listdir(root)
            sh(*command, "--root", root, "kill", cid, "KILL")
            _, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(30)
            for cid in os.listdir(root) if os.path.isdir(root) else []:
                subprocess.run([*command, "--root", root, "delete", "-f", cid], timeout=60)
        ends[name] = (run.returncode, err.strip().splitlines()[0])
    assert ends["runv-py"] == ends["runc"] == (1, "container exited on killed"), ends
