"""Where a VM's memory goes, from /proc/PID/smaps: PSS split into the guest's RAM, the
TCG translation cache, and QEMU itself; process trees; the node factory's processes."""
import json
import os
import re
import subprocess
import sys
import time

from runv_py.compare.measure import descendants, pss_kb

MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
# A clone's RAM file is /mem/ram in the jail's chroot (the host shows that path); a
# cold boot's RAM is an anonymous mapping the size of the guest.
GUEST_RAM = ("memfd:memory-backend", "/dev/shm/runv-py/", "/memfd:", "/vm/jail/mem/ram")
ANON_RAM_MIN = 128 << 20


def qemu_split(pid: int) -> dict:
    """{"guest_ram", "tcg_cache", "qemu"} PSS of one QEMU, in KiB. The translation cache
    is QEMU's anonymous executable memory (one region per vCPU thread, guard pages
    between them)."""
    out = {"guest_ram": 0, "tcg_cache": 0, "qemu": 0}
    kind = "qemu"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                m = MAPPING.match(line)
                if m:
                    perms, name = m.group(3), m.group(4)
                    size = int(m.group(2), 16) - int(m.group(1), 16)
                    if any(tag in name for tag in GUEST_RAM) or \
                            (not name and "x" not in perms and size >= ANON_RAM_MIN):
                        kind = "guest_ram"
                    elif not name and "x" in perms:
                        kind = "tcg_cache"
                    else:
                        kind = "qemu"
                elif line.startswith("Pss:"):
                    out[kind] += int(line.split()[1])
    except OSError:
        pass
    return out


def cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def shim_of(pod: str) -> int:
    """The shim serving a pod: containerd starts it with ``-id <pod id>`` (runv-py's
    daemon re-executes itself as ``python3 -m runv_py.shimv2 -id=<pod id> ... serve``)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            shim = args[0].endswith(b"containerd-shim-runc-v2") or b"runv_py.shimv2" in args
            if shim and (pod.encode() in args or b"-id=" + pod.encode() in args):
                return int(name)
    raise RuntimeError(f"no shim for pod {pod}")


def tree_kb(pid: int, skip=()) -> int:
    return sum(pss_kb(p) for p in [pid] + descendants(pid) if p not in skip)


def factory_status(env=None) -> dict:
    r = subprocess.run([sys.executable, "-m", "runv_py.cli", "factory", "status", "--json"],
                       capture_output=True, text=True, timeout=30, env=env)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def vm_of(name: str, status: dict, owner: int) -> tuple:
    """(QEMU pid, share server pid: virtiofsd or virtfs-proxy-helper) serving ``name``:
    from the factory, else a QEMU below ``owner`` (a cold boot)."""
    for vm in status.get("vms", []):
        if vm["container"] == name:
            return vm["qemu_pid"], vm.get("share_server_pid", 0)
    qemu = vfsd = 0
    for pid in descendants(owner):
        args = cmdline(pid)
        if args and args[0].endswith("qemu-system-x86_64"):
            qemu = pid
        elif args and args[0].endswith(("virtiofsd", "virtfs-proxy-helper")):
            vfsd = pid
    return qemu, vfsd


def vm_breakdown(owner: int, name: str, status: dict) -> dict:
    """PSS in KiB of one sandbox by component: its owner (shim), QEMU split three ways,
    the share's server (virtiofsd or virtfs-proxy-helper)."""
    qemu, vfsd = vm_of(name, status, owner)
    row = qemu_split(qemu) if qemu else {"guest_ram": 0, "tcg_cache": 0, "qemu": 0}
    row["share_server"] = tree_kb(vfsd) if vfsd else 0
    row["shim"] = tree_kb(owner, skip={qemu, vfsd} | set(descendants(qemu) if qemu else []))
    return row


def zygote_kb() -> int:
    """The shim v2's fork server (its PSS: what it shares with its daemons is split)."""
    from runv_py.shimv2.zygote import pid_of_server
    pid = pid_of_server()
    return pss_kb(pid) if pid else 0


def factory_kb(status: dict) -> int:
    """The factory process and the VMs it keeps ready (not yet any sandbox's)."""
    if not status:
        return 0
    handed = {v["qemu_pid"] for v in status.get("vms", [])} | \
        {v.get("share_server_pid", 0) for v in status.get("vms", [])}
    return tree_kb(status["pid"], skip=handed)


def pools_full(timeout: float, env: dict = None) -> None:
    """Wait until the node factory's pools are full (its refill would take CPU time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = factory_status(env).get("pools", [])
        if pools and all(len(p["ready"]) >= p["size"] for p in pools):
            return
        time.sleep(0.2)


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0
