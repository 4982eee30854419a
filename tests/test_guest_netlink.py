"""The guest agent's rtnetlink requests (hyperstart/netlink.py and network.py), run on
the host's kernel in a network namespace of their own, and read back with iproute2."""
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
