"""A container's cgroup on the host: ``linux.cgroupsPath`` holds its shim and its VM.

podman, containerd and kubelet account and limit a container by that cgroup. Under a
VM runtime what runs there is the shim, QEMU and virtiofsd, so the cgroup gets the
container's ``linux.resources`` as runc writes them, with the VM's headroom where the VM
cannot live with the exact value (cglimits.py says which and how much); QEMU's vCPU
threads are pinned to the spec's cpus (vcpus.py). Where the path lands is runc's rule
(cgpath.py): cleaned, so ``..`` never leaves the hierarchy.

Both hierarchies are handled: cgroup v1 (one directory per controller, as on these
machines) and v2 (one unified directory).
"""
import logging
import os
from typing import Dict, List, Optional

from ..hyperstart.cgroups import remove_tree, v1_cgroup_dirs, v1_mounts, write_file
from ..hyperstart.errors import FailedPrecondition, InvalidArgument
from . import cglimits
from .cgpath import UNIFIED, inner_path, under

log = logging.getLogger("runv_py.host.cgroups")

# Every v1 hierarchy runc joins (those mounted here); name=systemd is a named one.
V1_CONTROLLERS = ("cpuset", "cpu", "cpuacct", "memory", "pids", "blkio", "hugetlb",
                  "net_cls", "net_prio", "devices", "freezer", "perf_event", "name=systemd")


def is_v2() -> bool:
    return os.path.exists(os.path.join(UNIFIED, "cgroup.controllers")) and \
        not os.path.isdir(os.path.join(UNIFIED, "memory"))


class HostCgroup:
    """The directories of one cgroupsPath (created on ``create``, removed on ``remove``):
    controller -> directory on v1, "" -> the one directory on v2."""

    def __init__(self, dirs: List[str], controllers: Optional[Dict[str, str]] = None,
                 roots: Optional[Dict[str, str]] = None):
        self.dirs = dirs
        self.controllers = controllers or {}
        self.roots = roots or {}      # controller -> its hierarchy's root (cpuset's parents)
        self.cpus = ""                # the spec's cpu.cpus: what the vCPU threads are pinned to

    @classmethod
    def for_path(cls, cgroups_path: str) -> "HostCgroup":
        inner = inner_path(cgroups_path)
        if is_v2():
            base = UNIFIED if inner.startswith("/") else _own_v2()
            target = under(base, inner)
            return cls([target], {"": target}, {"": UNIFIED})
        roots = v1_mounts(V1_CONTROLLERS)
        controllers = {}
        for controller, own in v1_cgroup_dirs(V1_CONTROLLERS, roots).items():
            controllers[controller] = under(roots[controller] if inner.startswith("/") else own,
                                            inner)
        dirs = list(dict.fromkeys(controllers.values()))   # co-mounted ones once
        return cls(dirs, controllers, roots)

    def create(self, resources: Optional[dict] = None, vm_memory_mib: Optional[int] = None,
               _unused=None) -> None:
        """Make the directories and write the values ``resources`` ask for (typed errors,
        as runc fails, for a value the kernel refuses or a controller not mounted). The
        factory's call (factory/daemon.py) still passes a third argument, a period."""
        resources = resources or {}
        for controller, path in self.controllers.items():
            if controller == "cpuset":
                self._make_cpuset(path)
            elif controller == "":
                _make_v2(path)
            os.makedirs(path, exist_ok=True)
        self.set(resources, vm_memory_mib)

    def set(self, resources: dict, vm_memory_mib: Optional[int] = None) -> None:
        """Write the values of ``resources`` (the memory limit only with the VM's size)."""
        if "" in self.controllers:
            path = self.controllers[""]
            for name, value in cglimits.v2_writes(resources, vm_memory_mib):
                _write(path, name, value)
        else:
            for controller, name, value in cglimits.v1_writes(resources, vm_memory_mib):
                path = self.controllers.get(controller)
                if path is None:
                    raise FailedPrecondition(
                        f"cannot set {controller} limit: no {controller} cgroup hierarchy is "
                        f"mounted on this host")
                self._write_v1(path, name, value)
        cpus = (resources.get("cpu") or {}).get("cpus")
        if cpus:
            self.cpus = str(cpus)

    def enter(self, resources: dict, vm_memory_mib: int) -> List[str]:
        """Create the cgroup with the limits for a container with OCI ``resources`` in a
        VM of ``vm_memory_mib`` and move this process there; returns where it was (the
        lines of /proc/self/cgroup, for rejoin)."""
        with open("/proc/self/cgroup") as f:
            was = f.read().splitlines()
        self.create(resources, vm_memory_mib)
        self.join(0)
        return was

    def update(self, resources: dict, vm=None) -> None:
        """`runc update`'s fields of ``resources``; ``vm``'s vCPU threads re-pinned (a
        new cpuset gives every thread in it the whole set again)."""
        subset = cglimits.update_subset(resources)
        cpu = subset.get("cpu") or {}
        if cpu.get("quota") and not cpu.get("period"):
            cpu["period"] = self._period()    # the headroom is per period: the one it has
        if subset:
            self.set(subset)
            if vm is not None and (subset.get("cpu") or {}).get("cpus"):
                self.pin(vm)

    def _period(self) -> int:
        if "" in self.controllers:
            fields = _read(self.controllers[""], "cpu.max").split()
            return int(fields[1]) if len(fields) == 2 else 100000
        return int(_read(self.controllers.get("cpu", ""), "cpu.cfs_period_us") or 100000)

    def pin(self, vm) -> None:
        """Pin ``vm``'s vCPU threads to the spec's cpus (nothing without cpus)."""
        if self.cpus:
            from .vcpus import pin_vcpus
            try:
                pin_vcpus(vm, self.cpus)
            except Exception as e:   # the cpuset still holds every thread: not fatal
                log.warning("cannot pin the vCPU threads to %s: %s", self.cpus, e)

    def _make_cpuset(self, path: str) -> None:
        """A new v1 cpuset starts with no cpus or mems, and takes no task until it has
        some: each level down from the root gets its parent's where it has none (as runc
        does)."""
        root = self.roots.get("cpuset", os.path.dirname(path))
        level = root
        for part in os.path.relpath(path, root).split(os.sep):
            parent, level = level, os.path.join(level, part)
            os.makedirs(level, exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not _read(level, name):
                    _write(level, name, _read(parent, name))

    def _write_v1(self, path: str, name, value: str) -> None:
        if isinstance(name, tuple):   # the first of these that exists (None: optional)
            found = [n for n in name if n and os.path.exists(os.path.join(path, n))]
            if not found:
                if name[-1] is None:
                    return
                raise FailedPrecondition(f"cannot set {name[0]}: this kernel has none of "
                                         f"{', '.join(name)} in {path}")
            name = found[0]
        if name == "cpu.cfs_period_us":
            _write_period(path, value)
            return
        _write(path, name, value)
        if name == "cpu.shares" and _read(path, name) != value:
            # The kernel clamps shares to [2, 262144]; runc refuses what it did not take.
            raise InvalidArgument(f"cpu.shares {value} is out of range: the kernel set "
                                  f"{_read(path, name)}")

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: this process) here; OSError if the kernel refuses."""
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


def _write(path: str, name: str, value: str) -> None:
    """Write a cgroup file that must exist (no O_CREAT: cgroupfs answers EACCES to that)."""
    try:
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise FailedPrecondition(f"cannot set {name}: this kernel has no such file in "
                                 f"{path}") from None
    except OSError as e:
        raise InvalidArgument(f"cannot set {name} to {value!r}: {e.strerror}") from None


def _make_v2(path: str) -> None:
    """cgroup v2: each level from the root down delegates every controller it has to its
    children (as runc does); a level that cannot (it holds processes) is left as it is,
    and a value for a controller it did not delegate is then refused."""
    parts = os.path.relpath(path, UNIFIED).split(os.sep)
    level = UNIFIED
    for part in parts:
        controllers = _read(level, "cgroup.controllers").split()
        for name in controllers:
            try:
                write_file(os.path.join(level, "cgroup.subtree_control"), f"+{name}")
            except OSError:
                pass
        level = os.path.join(level, part)
        os.makedirs(level, exist_ok=True)


def _write_period(path: str, value: str) -> None:
    """cpu.cfs_period_us, which the kernel refuses while the quota it has would exceed
    the parent's share with the new period: then the quota goes first (as runc does)."""
    try:
        write_file(os.path.join(path, "cpu.cfs_period_us"), value)
    except OSError:
        quota = _read(path, "cpu.cfs_quota_us")
        _write(path, "cpu.cfs_quota_us", "-1")
        _write(path, "cpu.cfs_period_us", value)
        _write(path, "cpu.cfs_quota_us", quota)


def _read(path: str, name: str) -> str:
    try:
        with open(os.path.join(path, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _own_v2() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(UNIFIED, line.strip()[3:].lstrip("/"))
    return UNIFIED
