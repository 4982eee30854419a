"""The VMM jail, read from /proc as an operator would: QEMU runs as an unprivileged user
with no capabilities, no_new_privs and a seccomp filter, in no namespace of the host's
(the pod's network namespace when the spec names one), chrooted into a directory of what
it needs; the share's server keeps root with only the file capabilities; the pid runv-py
reports (the shim's) lives in the namespaces the spec names. Expected values are the
README's table, written here by hand."""
import os
import subprocess

import pytest

from conftest import qemu_pids, share_server_pids
from test_network import in_netns, netns  # noqa: F401  (a fixture)
from test_run import driver, runv  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

NAMESPACES = ("net", "ipc", "uts", "pid", "mnt")
# CAP_CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, SETGID 6, SETUID 7, MKNOD 27, SETFCAP 31
SHARE_SERVER_CAPS = {0, 1, 3, 4, 6, 7, 27, 31}
NET_ADMIN, SYS_MODULE, SYS_RAWIO, SYS_ADMIN, SYS_BOOT, SYS_TIME, BPF = 12, 16, 17, 21, 22, 25, 39
# What QEMU's chroot holds: /usr read-only, /dev's null, zero and urandom, the boot files,
# its VM directory.
JAIL_ENTRIES = {"usr", "bin", "lib", "lib64", "dev", "boot", "vm"}


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def host_namespaces(pid: int, kinds=NAMESPACES) -> list:
    """The kinds of namespace ``pid`` shares with this test (which runs in the host's)."""
    return [k for k in kinds
            if os.readlink(f"/proc/{pid}/ns/{k}") == os.readlink(f"/proc/self/ns/{k}")]


def caps(pid: int) -> set:
    value = int(status(pid)["CapEff"], 16)
    return {bit for bit in range(64) if value >> bit & 1}


def same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def assert_qemu_jailed(qemu: int) -> None:
    st = status(qemu)
    assert st["Uid"].split()[0] != "0" and st["Gid"].split()[0] != "0", st["Uid"]
    assert set(st["Uid"].split()) == {st["Uid"].split()[0]}, "real, effective, saved, fs"
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0000000000000000"
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert host_namespaces(qemu) == []
    assert set(os.listdir(f"/proc/{qemu}/root")) == JAIL_ENTRIES
    # rlimits: few files, no core dumps (a core would hold the guest's memory)
    with open(f"/proc/{qemu}/limits") as f:
        limits = f.read()
    assert [line.split()[-3:-1] for line in limits.splitlines()
            if line.startswith("Max core file size")] == [["0", "0"]]


def assert_share_server_confined(pid: int) -> None:
    st = status(pid)
    assert caps(pid) <= SHARE_SERVER_CAPS, sorted(caps(pid) - SHARE_SERVER_CAPS)
    assert st["NoNewPrivs"] == "1"
    assert host_namespaces(pid, ("net", "ipc", "uts")) == []


@pytest.mark.parametrize("with_netns", [False, True], ids=["fresh-netns", "netns-path"])
def test_qemu_and_the_share_server_are_jailed(runv, bundle, driver, request, with_netns):
    if driver[0] == "namespace":
        pytest.skip("the namespace driver runs no VMM")
    cid = runv.id()
    b = bundle(["sleep", "600"], hostname="jailed")
    path = ""
    if with_netns:
        path = request.getfixturevalue("netns")["path"]
        in_netns(b, path)
    runv.detached("run", "-d", "-b", b, cid)
    try:
        [qemu] = qemu_pids(runv.tag)
        assert_qemu_jailed(qemu)
        if path:  # the pod's network namespace, where its tap is
            assert same_file(f"/proc/{qemu}/ns/net", path)
        servers = share_server_pids(cid)
        assert servers, "virtiofsd or the 9p proxy helper serves the share"
        for pid in servers:
            assert_share_server_confined(pid)
        # The pid runv-py reports carries the spec's namespaces: the given network one, new
        # ipc, uts (with the spec's hostname) and cgroup ones.
        shim = runv.state(cid)["pid"]
        # The shim keeps what making a sandbox takes, not module loading, raw I/O, the
        # clock, reboot or BPF; and no_new_privs.
        assert {SYS_ADMIN, NET_ADMIN} <= caps(shim)
        assert not caps(shim) & {SYS_MODULE, SYS_RAWIO, SYS_BOOT, SYS_TIME, BPF}
        assert status(shim)["NoNewPrivs"] == "1"
        assert host_namespaces(shim, ("net", "ipc", "uts", "cgroup")) == []
        if path:
            assert same_file(f"/proc/{shim}/ns/net", path)
        hostname = subprocess.run(["nsenter", "-t", str(shim), "-u", "hostname"],
                                  capture_output=True, text=True, timeout=30).stdout
        assert hostname == "jailed\n"
        # The guest still works through all of it.
        r = runv("exec", cid, "sh", "-c", "echo ok > /tmp/f && cat /tmp/f && hostname")
        assert r.stdout == b"ok\njailed\n", r.stderr
    finally:
        runv("delete", "-f", cid)


def test_the_jail_can_be_turned_off(runv, bundle, driver, monkeypatch):
    if driver != ("", "9p"):
        pytest.skip("one share is enough")
    monkeypatch.setenv("RUNV_JAIL", "off")
    cid = runv.id()
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), cid)
    try:
        [qemu] = qemu_pids(runv.tag)
        assert status(qemu)["Uid"].split()[0] == "0"
        assert not share_server_pids(cid), "QEMU serves 9p itself"
        assert runv("exec", cid, "true").returncode == 0
    finally:
        runv("delete", "-f", cid)
