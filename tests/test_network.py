"""Pod networking through the OCI CLI: a network namespace the test makes (a "pod" with a
veth whose other end is in a "test host" namespace, also the test's), named in
config.json; and podman's default network (CNI). Traffic goes only between the pod and
the test's own namespaces and containers."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import qemu_pids
from test_lifecycle import wait_status
from test_clients import podman  # noqa: F401  (the podman fixture)
from test_run import driver, out, runv  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]


def sh(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


@pytest.fixture
def netns(tmp_path):
    """A pod namespace (eth0 10.92.N.2/24, default route via .1) wired to a test-host
    namespace (10.92.N.1/24) serving HTTP on :8080; removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    pod, host = f"rvpod-{tag}", f"rvhost-{tag}"
    net = f"10.92.{int(tag[:2], 16)}"
    sh("ip", "netns", "add", pod)
    sh("ip", "netns", "add", host)
    server = None
    try:
        sh("ip", "link", "add", f"vp{tag}", "type", "veth", "peer", "name", f"vh{tag}")
        sh("ip", "link", "set", f"vp{tag}", "netns", pod)
        sh("ip", "link", "set", f"vh{tag}", "netns", host)
        sh("ip", "-n", pod, "link", "set", f"vp{tag}", "name", "eth0")
        for ns, dev, addr in ((pod, "eth0", f"{net}.2/24"), (host, f"vh{tag}", f"{net}.1/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", pod, "route", "add", "default", "via", f"{net}.1")
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from the test host\n")
        server = subprocess.Popen(["ip", "netns", "exec", host, "busybox", "httpd", "-f", "-p",
                                   f"{net}.1:8080", "-h", str(www)])
        yield {"pod": pod, "host": host, "path": f"/var/run/netns/{pod}", "net": net,
               "veth": "eth0"}
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", pod], timeout=30)
        subprocess.run(["ip", "netns", "del", host], timeout=30)


def in_netns(bundle_path: str, path: str) -> str:
    config = os.path.join(bundle_path, "config.json")
    spec = json.load(open(config))
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = path
    json.dump(spec, open(config, "w"))
    return bundle_path


def test_a_netns_path_is_the_containers_network(runv, bundle, netns):
    b = in_netns(bundle(["sh", "-c", "ip -4 addr show eth0; ip route;"
                                     f" wget -qO- http://{netns['net']}.1:8080/"]), netns["path"])
    r = runv("run", "-b", b, runv.id())
    assert r.returncode == 0, r.stderr
    assert f"inet {netns['net']}.2/24" in out(r) and f"default via {netns['net']}.1" in out(r)
    assert "hello from the test host" in out(r)
    # Nothing of it stays in the namespace: no tap, no redirection on the veth.
    links = sh("ip", "-n", netns["pod"], "-o", "link")
    assert "tap0_" not in links
    assert "ingress" not in sh("ip", "netns", "exec", netns["pod"], "tc", "qdisc", "show")


def test_the_test_host_reaches_a_server_in_the_container(runv, bundle, netns):
    cid = runv.id()
    b = in_netns(bundle(["sh", "-c", "mkdir -p /tmp/www; echo from-the-container >"
                                     " /tmp/www/index.html; exec httpd -f -p 80 -h /tmp/www"]),
                 netns["path"])
    runv.detached("run", "-d", "-b", b, cid)
    deadline = time.monotonic() + 30
    got = ""
    while "from-the-container" not in got and time.monotonic() < deadline:
        # Python's client: Debian's busybox wget crashes when given -T.
        got = subprocess.run(["ip", "netns", "exec", netns["host"], sys.executable, "-c",
                              "import urllib.request as u; print(u.urlopen("
                              f"'http://{netns['net']}.2/', timeout=2).read().decode())"],
                             capture_output=True, text=True, timeout=30).stdout
        time.sleep(0.2)
    assert "from-the-container" in got
    runv("delete", "-f", cid, check=True)
    assert "ingress" not in sh("ip", "netns", "exec", netns["pod"], "tc", "qdisc", "show")


def test_localhost_in_the_pod_namespace_reaches_the_container_s_loopback(runv, bundle, netns):
    """As containerd's CRI port-forward dials (localhost:PORT inside the pod's network
    namespace on the host): a server listening only on the container's loopback answers;
    a port nothing listens on closes the connection; no rule is left after delete."""
    cid = runv.id()
    b = in_netns(bundle(["sh", "-c", "mkdir -p /tmp/www; echo on-loopback >"
                                     " /tmp/www/index.html; exec httpd -f -p 127.0.0.1:8081"
                                     " -h /tmp/www"]), netns["path"])
    runv.detached("run", "-d", "-b", b, cid)

    def get(port: int) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", netns["pod"], sys.executable, "-c",
                               "import urllib.request as u; print(u.urlopen("
                               f"'http://localhost:{port}/', timeout=10).read().decode())"],
                              capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + 30
    got = get(8081)
    while "on-loopback" not in got.stdout and time.monotonic() < deadline:
        time.sleep(0.2)
        got = get(8081)
    assert "on-loopback" in got.stdout, got.stderr
    assert get(8082).returncode != 0
    runv("delete", "-f", cid, check=True)
    assert "port-forward" not in sh("ip", "netns", "exec", netns["pod"], "iptables", "-t",
                                    "nat", "-S")


def test_a_network_made_between_create_and_start_reaches_the_guest(runv, bundle, netns,
                                                                     tmp_path):
    """runc's contract, which docker's libnetwork hook, buildah and other CNI users rely
    on: a container given a new network namespace has it after create, at its pid; what
    the caller puts there before start is the container's network."""
    if runv.driver == "namespace":
        pytest.skip("the namespace driver's containers share the shim's namespace as it is")
    cid = runv.id()
    output = tmp_path / "out"
    with open(output, "wb") as f:  # the container's stdout: the file create was given
        r = subprocess.run(runv.args("create", "-b", bundle([
            "sh", "-c", f"ip -4 addr show eth0; ip route; wget -qO- http://{netns['net']}.1:8080/"]),
            cid), stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=120)
    assert r.returncode == 0, output.read_text()
    pid = runv.state(cid)["pid"]
    ns = f"/proc/{pid}/ns/net"
    # The test's veth end moves from its pod namespace into the container's.
    sh("ip", "-n", netns["pod"], "link", "set", "eth0", "netns", ns)
    for args in (("addr", "add", f"{netns['net']}.2/24", "dev", "eth0"),
                 ("link", "set", "eth0", "up"),
                 ("route", "add", "default", "via", f"{netns['net']}.1")):
        sh("nsenter", f"--net={ns}", "ip", *args)
    runv("start", cid, check=True)
    wait_status(runv, cid, "stopped")
    text = output.read_text()
    assert f"inet {netns['net']}.2/24" in text and f"default via {netns['net']}.1" in text, text
    assert "hello from the test host" in text, text
    runv("delete", cid, check=True)


def test_a_killed_sandbox_s_redirections_go_even_while_its_tap_lives(netns):
    """A QEMU that has not quite ended after its shim was killed still holds its tap:
    delete removes the redirections to the taps the record names, and no others."""
    from runv_py.net import release
    from runv_py.net.pod import PodNetwork
    network = PodNetwork(netns["path"])
    nics = network.attach()         # our fds stand for a QEMU still holding the taps
    try:
        tap = network.attached[0].tap
        release(netns["path"])      # a live tap the record does not name: another VM's
        assert "ingress" in sh("ip", "netns", "exec", netns["pod"], "tc", "qdisc", "show",
                               "dev", "eth0")
        release(netns["path"], [tap])
        assert "ingress" not in sh("ip", "netns", "exec", netns["pod"], "tc", "qdisc", "show")
        assert tap not in sh("ip", "-n", netns["pod"], "link", "show")
    finally:
        for nic in nics:
            os.close(nic.fd)


def test_a_killed_sandbox_s_port_forward_rule_goes_and_a_live_one_stays(netns):
    from runv_py.net import portforward
    forwarder = portforward.LoopbackForwarder(netns["path"], lambda port, conn: conn.close())
    forwarder.start()

    def rules() -> str:
        return sh("ip", "netns", "exec", netns["pod"], "iptables", "-t", "nat", "-S", "OUTPUT")
    try:
        assert f"--to-ports {forwarder.port}" in rules()
        portforward.release(netns["path"])      # its listener lives: another sandbox's
        assert f"--to-ports {forwarder.port}" in rules()
    finally:  # the listener goes, the rule stays: as if its shim were killed
        forwarder.listener.shutdown(socket.SHUT_RDWR)  # (close() leaves accept() holding it)
        forwarder.listener.close()
    portforward.release(netns["path"])
    assert "port-forward" not in rules()


def test_host_networking_is_refused_and_changes_nothing(runv, bundle):
    b = bundle(["true"])
    config = os.path.join(b, "config.json")
    spec = json.load(open(config))
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    json.dump(spec, open(config, "w"))
    r = runv("run", "-b", b, runv.id())
    assert r.returncode != 0 and b"host networking is not supported" in r.stderr
    r = runv("run", "-b", in_netns(bundle(["true"]), "/proc/self/ns/net"), runv.id("h"))
    assert r.returncode != 0 and b"is the host's" in r.stderr


@pytest.fixture
def podman_network(podman, tmp_path):
    """podman's default network (named "podman") from a private CNI config: a bridge and
    a subnet of the test's own, no masquerade, no firewall rules."""
    if not os.path.exists("/usr/lib/cni/bridge"):
        pytest.skip("CNI plugins are not installed (apt-get install containernetworking-plugins)")
    tag = uuid.uuid4().hex[:5]
    bridge = f"rvpod{tag}"
    conf = tmp_path / "net"
    conf.mkdir()
    (conf / "podman.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "podman", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "ranges": [[{"subnet": "10.93.0.0/24", "gateway": "10.93.0.1"}]]}}]}))
    base = podman.base
    podman.base = base[:1] + ["--network-config-dir", str(conf)] + base[1:]
    yield podman
    podman.base = base
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def test_podman_default_network_reaches_another_container(podman_network):
    p = podman_network
    web = p.started("run", "-d", p.image, "sh", "-c", "mkdir /www; echo served-by-web >"
                                                      " /www/index.html; exec httpd -f -p 80 -h /www")
    ip = p("inspect", "-f", "{{.NetworkSettings.IPAddress}}", web, check=True).stdout.decode().strip()
    assert ip.startswith("10.93.0.")
    # busybox timeout, not wget -T: Debian's busybox wget crashes when given -T.
    r = p("run", "--rm", p.image, "sh", "-c",
          f"ip -4 addr show eth0; for i in 1 2 3 4 5; do timeout 3 wget -qO- http://{ip}/ && break;"
          " sleep 1; done", check=True)
    assert "inet 10.93.0." in r.stdout.decode() and "served-by-web" in r.stdout.decode()
    p("rm", "-f", "-t", "0", web, check=True)
    assert not qemu_pids(web)

