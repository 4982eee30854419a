"""The rtnetlink requests of the guest agent (hyperstart/netlink.py, network.py) and of the
shim reading a pod's namespace (runv_py/net), run on the host's kernel in network
namespaces of their own, and read back with iproute2."""
import json
import subprocess
import sys
import textwrap

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]


def in_new_netns(script: str) -> subprocess.CompletedProcess:
    """``script`` (Python, hyperstart importable) in fresh network and mount namespaces, followed
    by iproute2's JSON view of its links, addresses and routes."""
    code = (f"import sys, json, subprocess; sys.path.insert(0, {REPO!r})\n"
            + textwrap.dedent(script) + "\n"
            "show = lambda *a: json.loads(subprocess.run(['ip', '-j', *a], check=True, "
            "capture_output=True, text=True).stdout or '[]')\n"
            "print(json.dumps({'links': show('link'), 'addrs': show('addr'), "
            "'routes': show('route')}))\n")
    # sysfs mounted again in the namespace: /sys/class/net shows its own links then.
    return subprocess.run(["unshare", "--net", "--mount", "sh", "-c",
                           'mount -t sysfs sysfs /sys && exec "$0" -c "$1"', sys.executable,
                           code], capture_output=True, text=True, timeout=60)


def test_interface_renamed_readdressed_and_routed():
    r = in_new_netns("""
        subprocess.run(['ip', 'link', 'add', 'v0', 'address', '02:00:00:00:00:01', 'type',
                        'veth', 'peer', 'name', 'v1'], check=True)
        from hyperstart import network
        from hyperstart import messages as m
        network.setup_interface(m.SetupInterface(
            device='02:00:00:00:00:01', new_device_name='eth0', mtu=1400,
            mac='0a:58:0a:5b:00:07',
            ip_addresses=[m.IpAddress(ip_address='10.91.0.7', net_mask='24'),
                          m.IpAddress(ip_address='fd00::7', net_mask='64')]))
        network.setup_routes(m.SetupRoute(routes=[
            m.Route(dest='default', gateway='10.91.0.1', device='eth0'),
            m.Route(dest='10.92.0.0/16', gateway='', device='eth0')]))
    """)
    if r.returncode != 0 and "Operation not supported" in r.stderr:
        pytest.skip(f"no veth on this kernel: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    eth0 = next(link for link in seen["links"] if link["ifname"] == "eth0")
    assert eth0["address"] == "0a:58:0a:5b:00:07" and eth0["mtu"] == 1400
    assert "UP" in eth0["flags"]
    addrs = {(a["local"], a["prefixlen"]) for link in seen["addrs"] if link["ifname"] == "eth0"
             for a in link["addr_info"]}
    assert {("10.91.0.7", 24), ("fd00::7", 64)} <= addrs
    routes = {(r.get("dst"), r.get("gateway"), r.get("dev"), r.get("scope")) for r in seen["routes"]}
    assert ("default", "10.91.0.1", "eth0", None) in routes
    assert ("10.92.0.0/16", None, "eth0", "link") in routes


def test_refusal_is_an_error_with_the_kernels_words():
    r = in_new_netns("""
        from hyperstart import network
        from hyperstart import messages as m
        from hyperstart.errors import Internal
        network.loopback_up()
        try:
            network.setup_routes(m.SetupRoute(routes=[
                m.Route(dest='default', gateway='10.1.2.3', device='lo')]))
        except Internal as e:
            print('REFUSED', e)
        else:
            raise SystemExit('a gateway nobody reaches was accepted')
    """)
    assert r.returncode == 0, r.stderr
    assert "REFUSED route default via 10.1.2.3: [Errno 101] Network is unreachable" in r.stdout


def test_a_pods_namespace_read_over_netlink_as_iproute2_shows_it():
    """PodNetwork.discover (the shim's reading of a pod's namespace) against `ip -j`."""
    import uuid
    from runv_py.hyperstart import messages as m
    from runv_py.net.pod import PodNetwork
    name = f"rvnl-{uuid.uuid4().hex[:8]}"

    def ip(*args, check=True):
        return subprocess.run(["ip", "-n", name, *args], check=check, capture_output=True,
                              text=True, timeout=30)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        for line in ("link add v0 type veth peer name v1", "link set v0 mtu 1400 up",
                     "link set v1 up", "addr add 10.77.0.5/24 dev v0",
                     "addr add 10.78.0.5/16 dev v0", "addr add fd00::5/64 dev v0",
                     "route add default via 10.77.0.1 dev v0",
                     "route add 10.99.0.0/24 dev v0", "route add 10.98.0.7 via 10.77.0.9 dev v0"):
            r = ip(*line.split(), check=False)
            if r.returncode != 0 and "Operation not supported" in r.stderr:
                pytest.skip(f"no veth on this kernel: {r.stderr.strip()}")
            assert r.returncode == 0, (line, r.stderr)
        pod = PodNetwork(f"/run/netns/{name}")
        pod.discover()
        links = json.loads(ip("-j", "addr", "show").stdout)
        expected = [(link["ifname"], link["address"], link["mtu"],
                     [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                      if a["family"] == "inet"])
                    for link in links if link["link_type"] == "ether"]
        assert sorted((i.name, i.mac, i.mtu, i.addresses) for i in pod.interfaces) == sorted(expected)
        routes = [m.Route(dest=r["dst"], gateway=r.get("gateway", ""), device=r["dev"])
                  for r in json.loads(ip("-j", "-4", "route", "show").stdout)
                  if r.get("protocol") != "kernel"]
        assert sorted(pod.routes, key=repr) == sorted(routes, key=repr) and len(routes) == 3
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30)
