"""WARMUP: what starting a pod makes the guest's kernel and C code do (new namespaces,
mounts, a cgroup, rtnetlink, a process exec'd in them), run once in a child that is
thrown away. Under TCG, guest code is translated the first time it runs, and the cache
of translations is QEMU's, per process: a template's clone starts with none. A ready
clone that ran this translates less when its pod starts. Nothing of it stays: the
child's namespaces and mounts go with it, and the scratch directory and cgroup it used
are removed."""
import os
import time

import _signal as signal
import _socket as socket

from . import network
from . import syscalls as sc
from .cgroups import GUEST_ROOT
from .errors import Internal
from .netlink import Netlink

SCRATCH = "/run/warm-up"
CGROUP = os.path.join(GUEST_ROOT, "warm-up")
NAMESPACES = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET


def run(timeout: float = 20.0) -> None:
    os.makedirs(SCRATCH, exist_ok=True)
    os.makedirs(CGROUP, exist_ok=True)
    why_r, why_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(why_r)
            code = _child()
        except BaseException as e:
            os.write(why_w, f"{type(e).__name__}: {e}".encode()[:1000])
        finally:
            os._exit(code)
    os.close(why_w)
    try:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise Internal(f"the warm-up took more than {timeout:.0f} s")
            time.sleep(0.005)
        if status != 0:
            why = os.read(why_r, 1000).decode(errors="replace")
            raise Internal(f"the warm-up failed (wait status {status}): {why}")
    finally:
        os.close(why_r)
        for path in (CGROUP, SCRATCH):
            try:
                os.rmdir(path)
            except OSError:
                pass


def _child() -> int:
    sc.unshare(NAMESPACES)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", SCRATCH, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755")
    for name in ("proc", "bin"):
        os.mkdir(os.path.join(SCRATCH, name))
    sc.mount("proc", os.path.join(SCRATCH, "proc"), "proc",
             sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    open(os.path.join(SCRATCH, "bin", "busybox"), "w").close()
    sc.mount(network.BUSYBOX, os.path.join(SCRATCH, "bin", "busybox"), None, sc.MS_BIND)
    sc.sethostname("warm-up")
    network.loopback_up()
    with Netlink() as nl:  # SETUPINTERFACE's and SETUPROUTE's requests
        index = socket.if_nametoindex("lo")
        nl.set_link(index, mtu=65536)
        nl.add_address(index, "10.255.255.1", 24)
        nl.set_link(index, up=True)
        nl.add_route("10.255.254.0/24", device="lo")
    # Last: the first child forked after it is the namespace's pid 1, and once that
    # one exits no other can be forked there.
    sc.unshare(sc.CLONE_NEWPID)
    inner = os.fork()  # pid 1 of the new pid namespace, in the cgroup, chrooted
    if inner == 0:
        try:
            with open(os.path.join(CGROUP, "cgroup.procs"), "w") as f:
                f.write("0")
            os.chroot(SCRATCH)
            os.chdir("/")
            os.execv("/bin/busybox", ["sh", "-c", "echo warm > /proc/self/comm"])
        finally:
            os._exit(127)
    _, status = os.waitpid(inner, 0)
    return 0 if status == 0 else 1
