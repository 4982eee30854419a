"""Privileged containers in the guest, network administration with the guest kernel's
bridge, veth and netfilter, and bind mounts with propagation from the host into the
container and between mounts in the guest (runc's semantics, as far as a VM carries them).

The host's /usr is bound into the busybox container for iproute2's ip and iptables
(legacy: x_tables; nft: nf_tables), which busybox lacks."""
import json
import os
import subprocess

import pytest

from test_spec import RUNC_DEFAULT_CAPS, caps
from runv_py.hyperstart.security import CAPABILITIES

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

ALL_CAPS = ["CAP_" + c for c in CAPABILITIES]


def host_devices(dev: str = "/dev") -> list:
    """The host's devices as containerd's CRI lists them for a privileged container
    (its HostDevices: every device node, but pts/, shm/, fd/, mqueue/ and console)."""
    found = []
    for entry in sorted(os.scandir(dev), key=lambda e: e.name):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            if entry.name not in ("pts", "shm", "fd", "mqueue"):
                found += host_devices(entry.path)
            continue
        st = entry.stat(follow_symlinks=False)
        kind = {0o020000: "c", 0o060000: "b"}.get(st.st_mode & 0o170000)
        if kind and entry.name != "console":
            found.append({"path": entry.path, "type": kind, "major": os.major(st.st_rdev),
                          "minor": os.minor(st.st_rdev), "fileMode": st.st_mode & 0o777,
                          "uid": st.st_uid, "gid": st.st_gid})
    return found


def make_privileged(spec: dict) -> dict:
    """What CRI (and podman/docker --privileged) ask: every capability, the host's
    devices and all devices allowed, /sys and cgroups writable, no seccomp, nothing
    masked or read-only."""
    spec["process"]["capabilities"] = caps(ALL_CAPS)
    linux = spec["linux"]
    linux.pop("seccomp", None)
    linux["maskedPaths"], linux["readonlyPaths"] = [], []
    linux["devices"] = host_devices()
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    for mount in spec["mounts"]:
        if mount["type"] in ("sysfs", "cgroup"):
            mount["options"] = [o for o in mount["options"] if o != "ro"]
    return spec


def with_host_usr(rootfs: str, spec: dict) -> None:
    """The host's /usr (read-only) over the container's, with Debian's merged-/usr links."""
    for name in ("lib", "lib64"):
        if not os.path.lexists(os.path.join(rootfs, name)):
            os.symlink(f"usr/{name}", os.path.join(rootfs, name))
    spec["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr",
                           "options": ["rbind", "ro"]})


@pytest.fixture
def shared_dir(tmp_path):
    """A tmpfs of the test's own, a shared mount (CRI's Bidirectional asks for that)."""
    path = tmp_path / "vol"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "vol", str(path)], check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)
    yield str(path)
    subprocess.run(["umount", "-R", "-l", str(path)], check=False)


NETWORK_SCRIPT = (
    "ip link add br0 type bridge && ip link add v0 type veth peer name v1"
    " && ip link set v0 master br0 && ip link set br0 up && echo bridge-ok;"
    " cat /sys/class/net/v0/master/uevent | grep INTERFACE;"
    " iptables-legacy -t nat -A POSTROUTING -s 10.99.0.0/24 ! -o br0 -j MASQUERADE"
    " && iptables-legacy -A FORWARD -i br0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    " && iptables-legacy-save | grep -E '^-A (POSTROUTING|FORWARD)';"
    " iptables-nft -t nat -A POSTROUTING -o br0 -j MASQUERADE"
    " && iptables-nft -A FORWARD -o br0 -m comment --comment runvpy -j ACCEPT"
    " && iptables-nft-save | grep -E '^-A (POSTROUTING|FORWARD)'")


def test_a_privileged_container_administers_its_network_and_mounts_propagate(
        runv, bundle, tmp_path, shared_dir):
    cid = runv.id("priv")
    b = bundle(["sleep", "600"])
    config = os.path.join(b, "config.json")
    with open(config) as f:
        spec = make_privileged(json.load(f))
    with_host_usr(os.path.join(b, "rootfs"), spec)
    spec["linux"]["rootfsPropagation"] = "rshared"   # as CRI sets it for Bidirectional
    for where, option in (("/vol", "rshared"), ("/slave", "rslave"), ("/priv", "rprivate")):
        spec["mounts"].append({"destination": where, "type": "bind", "source": shared_dir,
                               "options": ["rbind", option]})
    with open(config, "w") as f:
        json.dump(spec, f)
    runv.detached("run", "-d", "-b", b, cid)

    # Privileged: every capability, no seccomp, /sys writable, the guest's devices (not
    # the host's list, nor the agent's channels), /dev/ptmx the link into its devpts.
    r = runv("exec", cid, "sh", "-c",
             "grep -E '^(CapEff|CapBnd|Seccomp):' /proc/self/status; readlink /dev/ptmx;"
             " grep -E '^sysfs /sys ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1;"
             " test -c /dev/vsock && echo guest-vsock; ls /dev | grep -c vport || true", check=True)
    everything = format((1 << len(CAPABILITIES)) - 1, "016x")
    assert r.stdout.decode().split("\n")[:7] == [
        f"CapEff:\t{everything}", f"CapBnd:\t{everything}", "Seccomp:\t0", "pts/ptmx", "rw",
        "guest-vsock", "0"], r.stdout

    # Network administration with the guest kernel: a bridge, a veth pair on it, and
    # NAT/filter rules through x_tables (iptables-legacy) and nf_tables (iptables-nft).
    r = runv("exec", cid, "sh", "-c", NETWORK_SCRIPT, check=True)
    lines = r.stdout.decode().splitlines()
    assert lines[:2] == ["bridge-ok", "INTERFACE=br0"], (r.stdout, r.stderr)
    assert "-A POSTROUTING -s 10.99.0.0/24 ! -o br0 -j MASQUERADE" in lines, lines
    assert any(x.startswith("-A FORWARD -i br0 -m conntrack --ctstate RELATED,ESTABLISHED")
               for x in lines), lines
    assert "-A POSTROUTING -o br0 -j MASQUERADE" in lines, lines
    assert any("--comment runvpy" in x for x in lines), lines

    # A process given CAP_NET_ADMIN (and runc's defaults) can too; without it, not.
    process = dict(spec["process"], args=["sh", "-c", "ip link add br1 type bridge"
                                          " && ip link add v2 type veth peer name v3"
                                          " && iptables-nft -A FORWARD -i br1 -j DROP && echo ok"])
    for name, granted in (("netadmin", RUNC_DEFAULT_CAPS + ["CAP_NET_ADMIN"]),
                          ("plain", RUNC_DEFAULT_CAPS)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(process, capabilities=caps(granted))))
        r = runv("exec", "-p", str(path), cid)
        if name == "netadmin":
            assert r.returncode == 0 and r.stdout == b"ok\n", (r.stdout, r.stderr)
        else:
            assert r.returncode != 0 and b"Operation not permitted" in r.stderr, r.stderr

    # Into the container: a mount the host makes later under the source reaches the
    # rshared and rslave binds (the share carries its files), not the rprivate one.
    os.mkdir(os.path.join(shared_dir, "later"))
    subprocess.run(["mount", "-t", "tmpfs", "later", os.path.join(shared_dir, "later")], check=True)
    with open(os.path.join(shared_dir, "later", "g"), "w") as f:
        f.write("from the host\n")
    r = runv("exec", cid, "sh", "-c", "cat /vol/later/g /slave/later/g; ls /priv/later | wc -l",
             check=True)
    assert r.stdout.decode().splitlines() == ["from the host", "from the host", "0"], r.stdout
    # In the guest: a mount made under the rshared bind reaches the rslave one, not the
    # rprivate one; it does not cross to the host (the directory does: it is a file).
    r = runv("exec", cid, "sh", "-c", "mkdir /vol/in && mount -t tmpfs in /vol/in"
             " && echo inside > /vol/in/f && cat /slave/in/f; ls /priv/in | wc -l", check=True)
    assert r.stdout.decode().splitlines() == ["inside", "0"], r.stdout
    assert os.path.isdir(os.path.join(shared_dir, "in"))
    assert not os.path.exists(os.path.join(shared_dir, "in", "f"))
    runv("delete", "-f", cid, check=True)
