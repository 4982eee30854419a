"""A container's cgroup on the host: ``linux.cgroupsPath`` holds its shim and its VM.

podman, containerd and kubelet account and limit a container by that cgroup. Under a
VM runtime what runs there is the shim and QEMU, so the cgroup gets the container's
limits plus what the VM costs beyond them: the guest's own memory (the VM is sized at
the container's limit plus VM_MEMORY_OVERHEAD_MIB), QEMU's and the shim's
(HOST_MEMORY_OVERHEAD_MIB), and a tenth of a CPU for QEMU's own threads.

Both hierarchies are handled: cgroup v1 (one directory per controller, as on these
machines) and v2 (one unified directory). A path "slice:prefix:name" is systemd's form
(what ``--systemd-cgroup`` callers pass): it names ``<slice path>/<prefix>-<name>.scope``.
"""
import logging
import os
from typing import Dict, List, Optional

from ..hyperstart.cgroups import remove_tree, v1_cgroup_dirs, v1_mounts, write_file

log = logging.getLogger("runv_py.host.cgroups")

# Measured on this machine (README): an idle QEMU 7.2 (TCG, microvm) beyond its guest's
# RAM, plus the shim.
HOST_MEMORY_OVERHEAD_MIB = 64
CPU_OVERHEAD_US = 10000          # per 100 ms period: a tenth of a CPU
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
UNIFIED = "/sys/fs/cgroup"


def systemd_path(path: str) -> str:
    """``slice:prefix:name`` as a cgroup path, the way runc's systemd driver names it."""
    slice_name, prefix, name = path.split(":", 2)
    parts = []
    if slice_name and slice_name != "-.slice":
        stem = slice_name.removesuffix(".slice")
        words = stem.split("-")
        parts = ["-".join(words[:i + 1]) + ".slice" for i in range(len(words))]
    scope = f"{prefix}-{name}.scope" if prefix else name
    return "/" + "/".join(parts + [scope])


def is_v2() -> bool:
    return os.path.exists(os.path.join(UNIFIED, "cgroup.controllers")) and \
        not os.path.isdir(os.path.join(UNIFIED, "memory"))


class HostCgroup:
    """The directories of one cgroupsPath (created on ``create``, removed on ``remove``)."""

    def __init__(self, dirs: List[str]):
        self.dirs = dirs

    @classmethod
    def for_path(cls, cgroups_path: str) -> "HostCgroup":
        path = systemd_path(cgroups_path) if ":" in cgroups_path else cgroups_path
        if is_v2():
            base = UNIFIED if path.startswith("/") else _own_v2()
            return cls([os.path.normpath(os.path.join(base, path.lstrip("/")))])
        roots = v1_mounts(V1_CONTROLLERS)
        dirs = []
        for controller, own in v1_cgroup_dirs(V1_CONTROLLERS, roots).items():
            base = roots[controller] if path.startswith("/") else own
            target = os.path.normpath(os.path.join(base, path.lstrip("/")))
            if target not in dirs:
                dirs.append(target)
        return cls(dirs)

    def create(self, memory_bytes: Optional[int], cpu_quota: Optional[int],
               cpu_period: int) -> None:
        """Make the directories and set the limits (None: no limit of that kind)."""
        for path in self.dirs:
            os.makedirs(path, exist_ok=True)
            files = _limit_files(path, memory_bytes, cpu_quota, cpu_period)
            for name, value in files.items():
                try:
                    write_file(os.path.join(path, name), value)
                except OSError as e:
                    log.warning("cannot set %s in %s: %s", name, path, e)

    def enter(self, resources: dict, vm_memory_mib: int) -> List[str]:
        """Create the cgroup with the limits for a container with OCI ``resources`` in a
        VM of ``vm_memory_mib`` and move this process there; returns where it was (the
        lines of /proc/self/cgroup, for rejoin)."""
        with open("/proc/self/cgroup") as f:
            was = f.read().splitlines()
        self.create(**limits_for(resources, vm_memory_mib))
        self.join(0)
        return was

    def join(self, pid: int = 0) -> None:
        for path in self.dirs:
            write_file(os.path.join(path, "cgroup.procs"), str(pid))

    def remove(self) -> None:
        for path in self.dirs:
            if not remove_tree(path):
                log.warning("cannot remove cgroup %s", path)

    @staticmethod
    def rejoin(proc_cgroup_lines: list) -> None:
        """Move this process back to the cgroups /proc/self/cgroup said it was in."""
        move_to(0, proc_cgroup_lines)


def join_own_cgroups(pid: int) -> None:
    """Move ``pid`` into this process's cgroups (a VM made elsewhere joins its owner's)."""
    with open("/proc/self/cgroup") as f:
        move_to(pid, f.read().splitlines())


def move_to(pid: int, proc_cgroup_lines: list) -> None:
    """Move ``pid`` (0: this process) to the cgroups that /proc/PID/cgroup lines name."""
    roots = v1_mounts(V1_CONTROLLERS)
    for line in proc_cgroup_lines:
        _, names, rel = line.split(":", 2)
        targets = [os.path.join(roots[n], rel.lstrip("/")) for n in names.split(",")
                   if n in roots] if names else \
            [os.path.join(UNIFIED, rel.lstrip("/"))] if is_v2() else []
        for target in targets:
            try:
                write_file(os.path.join(target, "cgroup.procs"), str(pid))
            except OSError as e:
                log.warning("cannot move pid %d to %s: %s", pid, target, e)


def limits_for(resources: dict, vm_memory_mib: int) -> Dict[str, Optional[int]]:
    """The host cgroup's limits for a container with OCI ``resources`` in a VM of
    ``vm_memory_mib``: None where the container has no limit of that kind."""
    memory = (resources.get("memory") or {}).get("limit")
    cpu = resources.get("cpu") or {}
    period = int(cpu.get("period") or 100000)
    quota = cpu.get("quota")
    return {
        "memory_bytes": (vm_memory_mib + HOST_MEMORY_OVERHEAD_MIB) << 20
        if memory and memory > 0 else None,
        "cpu_quota": int(quota) + CPU_OVERHEAD_US * period // 100000
        if quota and quota > 0 else None,
        "cpu_period": period,   # (pids: the container's live in the guest, not here)
    }


def _limit_files(path: str, memory, quota, period) -> Dict[str, str]:
    exists = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    files = {}
    if memory is not None:
        if exists("memory.max"):
            files["memory.max"] = str(memory)
        elif exists("memory.limit_in_bytes"):
            files["memory.limit_in_bytes"] = str(memory)
    if quota is not None:
        if exists("cpu.max"):
            files["cpu.max"] = f"{quota} {period}"
        elif exists("cpu.cfs_quota_us"):
            files["cpu.cfs_period_us"] = str(period)
            files["cpu.cfs_quota_us"] = str(quota)
    return files


def _own_v2() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(UNIFIED, line.strip()[3:].lstrip("/"))
    return UNIFIED
