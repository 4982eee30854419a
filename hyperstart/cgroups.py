"""Container cgroups for the agent, behind one interface with two backends.

The host asks in cgroup v2 terms (``memory.max``, ``pids.max``, ``cpu.max`` values;
``memory.current``, ``cpu.stat``... to read). ``GuestCgroups`` is the guest's own cgroup2
hierarchy. ``HostCgroups`` serves the namespace driver on a host whose memory, pids and
cpu controllers live on cgroup v1 hierarchies: it maps the same names onto one v1
directory per controller, and stands in for ``memory.oom.group`` (which v1 lacks) by
watching the container's OOM eventfd and killing the whole container.
"""
import os
import time

from .errors import NotFound

GUEST_ROOT = "/sys/fs/cgroup"
GUEST_PARENT = "runv"
# cgroup v2 controls devices only through BPF programs: the guest keeps a cgroup v1
# hierarchy with the devices controller alone, beside its cgroup2 root.
GUEST_DEVICES = "/run/runv/cgroup-devices"
CONTROLLERS = ("memory", "pids", "cpu", "freezer", "devices")
# What runc allows every container on top of its spec's rules (mknod of any device; the
# devices every container has).
DEFAULT_DEVICE_RULES = ["c *:* m", "b *:* m", "c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm",
                        "c 1:5 rwm", "c 1:9 rwm", "c 5:1 rwm", "c 136:* rwm", "c 5:2 rwm",
                        "c 10:200 rwm"]

# cgroup v2 file names the host reads, and where cgroup v1 keeps the same figure.
V1_FILES = {"memory.current": ("memory", "memory.usage_in_bytes"),
            "memory.max": ("memory", "memory.limit_in_bytes"),
            "memory.peak": ("memory", "memory.max_usage_in_bytes"),
            "memory.stat": ("memory", "memory.stat"),
            "pids.current": ("pids", "pids.current"), "pids.max": ("pids", "pids.max"),
            "cpu.stat": ("cpu", "cpu.stat")}


def write_file(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def read_pids(path: str) -> list:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def remove_tree(path: str, timeout: float = 5.0) -> bool:
    """rmdir a cgroup and its children, waiting for their dying tasks to go."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        try:
            for root, dirs, _ in os.walk(path, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(root, d))
            os.rmdir(path)
        except FileNotFoundError:
            break
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
    return True


def apply_device_rules(path: str, rules: list) -> None:
    """OCI device rules (messages.DeviceRule, in order) on a cgroup v1 devices directory:
    everything denied first, then each rule, then runc's default allowances."""
    write_file(os.path.join(path, "devices.deny"), "a")
    for rule in rules:
        if rule.type == "a" and rule.major is None and rule.minor is None:
            line = "a"
        else:
            major = "*" if rule.major is None or rule.major < 0 else rule.major
            minor = "*" if rule.minor is None or rule.minor < 0 else rule.minor
            line = f"{rule.type} {major}:{minor} {rule.access or 'rwm'}"
        write_file(os.path.join(path, "devices.allow" if rule.allow else "devices.deny"), line)
    for line in DEFAULT_DEVICE_RULES:
        write_file(os.path.join(path, "devices.allow"), line)


def v1_mounts(controllers=CONTROLLERS) -> dict:
    """controller -> where its cgroup v1 hierarchy is mounted."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "cgroup":
                continue
            for opt in fields[sep + 3].split(","):
                if opt in controllers:
                    mounts.setdefault(opt, fields[4])
    return mounts


def v1_cgroup_dirs(controllers=CONTROLLERS, mounts: dict = None) -> dict:
    """controller -> this process's own directory in that cgroup v1 hierarchy (under
    ``mounts``, v1_mounts' answer, if the caller has it already)."""
    mounts = v1_mounts(controllers) if mounts is None else mounts
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(","):
                own[name] = path
    return {c: os.path.join(m, own.get(c, "/").lstrip("/")) for c, m in mounts.items()}


class GuestCgroups:
    """One cgroup v2 directory per container under /sys/fs/cgroup/runv."""

    def __init__(self, root: str = GUEST_ROOT):
        self.parent = os.path.join(root, GUEST_PARENT)
        self.paths = {}           # container id -> its directory
        self.devices = {}         # container id -> its v1 devices directory
        self.has_devices = False
        self.watch = {}           # fd -> callback (none here)

    def setup(self) -> None:
        """At boot: enable the controllers for the containers' parent; mount the v1
        devices hierarchy (a kernel without it gets no device cgroup)."""
        from . import syscalls as sc
        root = os.path.dirname(self.parent)
        write_file(os.path.join(root, "cgroup.subtree_control"), "+memory +pids +cpu")
        os.makedirs(self.parent, exist_ok=True)
        write_file(os.path.join(self.parent, "cgroup.subtree_control"), "+memory +pids +cpu")
        os.makedirs(GUEST_DEVICES, exist_ok=True)
        try:
            sc.mount("devices", GUEST_DEVICES, "cgroup", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                     "devices,favordynmods")  # see guest.CGROUP_OPTIONS
            self.has_devices = True
        except OSError:
            pass

    def create(self, cid: str, limits: dict, device_rules: list = ()) -> None:
        path = os.path.join(self.parent, cid)
        os.makedirs(path, exist_ok=True)
        self.paths[cid] = path
        if self.has_devices:
            devices = self.devices[cid] = os.path.join(GUEST_DEVICES, cid)
            os.makedirs(devices, exist_ok=True)
            apply_device_rules(devices, device_rules)
        for name, value in limits.items():
            write_file(os.path.join(path, name), str(value))
        if "memory.max" in limits:
            # No swap in the guest; an over-limit container is OOM-killed as a group.
            try:
                write_file(os.path.join(path, "memory.oom.group"), "1")
            except OSError:
                pass

    def rename(self, cid: str, new_id: str) -> None:
        """A restored container's new id: its cgroup keeps its directory."""
        for table in (self.paths, self.devices):
            if cid in table:
                table[new_id] = table.pop(cid)

    def path(self, cid: str) -> str:
        try:
            return self.paths[cid]
        except KeyError:
            raise NotFound(f"container {cid} has no cgroup") from None

    def join(self, cid: str) -> None:
        write_file(os.path.join(self.path(cid), "cgroup.procs"), "0")
        if cid in self.devices:
            write_file(os.path.join(self.devices[cid], "cgroup.procs"), "0")

    def pids(self, cid: str) -> list:
        return read_pids(self.paths.get(cid, "/nonexistent"))

    def read(self, cid: str, name: str) -> bytes:
        with open(os.path.join(self.path(cid), os.path.basename(name)), "rb") as f:
            return f.read(1 << 20)

    def write(self, cid: str, name: str, value: str) -> None:
        write_file(os.path.join(self.path(cid), os.path.basename(name)), value)

    def oom_killed(self, cid: str) -> bool:
        try:
            text = self.read(cid, "memory.events").decode()
            counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
            return int(counts.get("oom_kill", "0")) > 0
        except (OSError, ValueError, NotFound):
            return False

    def remove(self, cid: str) -> None:
        for path in (self.paths.pop(cid, None), self.devices.pop(cid, None)):
            if path:
                try:
                    os.rmdir(path)
                except OSError:
                    pass


class HostCgroups:
    """cgroup v1 directories per container below the sandbox's own (one per controller)."""

    def __init__(self, parents: dict):
        self.parents = parents    # controller -> the sandbox's directory
        self.groups = {}          # container id -> {controller: path}
        self.oom = set()          # containers an OOM was seen in
        self.oom_fds = {}         # container id -> its OOM eventfd
        self.watch = {}           # eventfd -> callback, polled by the agent's loop
        self.on_oom = None        # callable(cid): kill the whole container

    def setup(self) -> None:
        pass  # the launcher made (and will remove) the sandbox's directories

    def create(self, cid: str, limits: dict, device_rules: list = ()) -> None:
        paths = {c: os.path.join(parent, cid) for c, parent in self.parents.items()}
        for path in paths.values():
            os.makedirs(path, exist_ok=True)
        self.groups[cid] = paths
        for name, value in limits.items():
            self.write(cid, name, value)
        if "devices" in paths:
            apply_device_rules(paths["devices"], device_rules)
        if "memory.max" in limits and "memory" in paths:
            self.watch_oom(cid, paths["memory"])

    def write(self, cid: str, name: str, value: str) -> None:
        paths = self.group(cid)
        value = str(value)
        if name == "memory.max" and "memory" in paths:
            limit = "-1" if value == "max" else value
            write_file(os.path.join(paths["memory"], "memory.limit_in_bytes"), limit)
            memsw = os.path.join(paths["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # no swapping past the limit, as in the guest
                write_file(memsw, limit)
        elif name == "pids.max" and "pids" in paths:
            write_file(os.path.join(paths["pids"], "pids.max"), value)
        elif name == "cpu.max" and "cpu" in paths:
            quota, _, period = value.partition(" ")
            write_file(os.path.join(paths["cpu"], "cpu.cfs_period_us"), period or "100000")
            write_file(os.path.join(paths["cpu"], "cpu.cfs_quota_us"),
                       "-1" if quota == "max" else quota)
        else:
            raise NotFound(f"no cgroup file {name} on this host")

    def group(self, cid: str) -> dict:
        try:
            return self.groups[cid]
        except KeyError:
            raise NotFound(f"container {cid} has no cgroup") from None

    def watch_oom(self, cid: str, path: str) -> None:
        """Get told of the container's OOMs, to kill all of it as memory.oom.group would.

        (``oom_kill_disable`` would hold the tasks instead, but then an allocation made
        inside a system call fails with EFAULT rather than waiting.)"""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = os.open(os.path.join(path, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        write_file(os.path.join(path, "cgroup.event_control"), f"{efd} {control}")
        os.close(control)

        def on_event() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            self.oom.add(cid)
            if self.on_oom is not None:
                self.on_oom(cid)

        self.watch[efd] = on_event
        self.oom_fds[cid] = efd

    def join(self, cid: str) -> None:
        for path in self.group(cid).values():
            write_file(os.path.join(path, "cgroup.procs"), "0")

    def pids(self, cid: str) -> list:
        paths = self.groups.get(cid, {})
        return read_pids(paths.get("memory") or next(iter(paths.values()), "/nonexistent"))

    def read(self, cid: str, name: str) -> bytes:
        controller, v1_name = V1_FILES.get(os.path.basename(name), (None, None))
        paths = self.group(cid)
        if controller not in paths:
            raise NotFound(f"no cgroup file {name} on this host")
        with open(os.path.join(paths[controller], v1_name), "rb") as f:
            return f.read(1 << 20)

    def oom_killed(self, cid: str) -> bool:
        return cid in self.oom

    def remove(self, cid: str) -> None:
        paths = self.groups.pop(cid, {})
        efd = self.oom_fds.pop(cid, -1)
        if efd >= 0:
            del self.watch[efd]
            os.close(efd)
        for path in paths.values():
            try:
                os.rmdir(path)
            except OSError:
                pass
        self.oom.discard(cid)
