"""The agent as /init of the guest: boot-time mounts, finding the virtio-serial ports,
and what only a guest does (mount the 9p share, reseed the kernel RNG, power off)."""
import fcntl
import os
import struct
import time

from . import network
from . import protocol as p
from . import syscalls as sc
from .agent import Agent, log
from .cgroups import GUEST_ROOT, GuestCgroups
from .errors import FailedPrecondition, Unavailable

SHARE_DIR = "/run/runv/share"
# The share's volumes/ (runv_py/sandbox/share.py's Volumes), bound once as a shared mount:
# the containers' binds of a volume are its peers or slaves, as runc's are of the host's.
VOLUMES_DIR = "/run/runv/volumes"
# Moving a process into a cgroup otherwise waits for an RCU grace period each time, about
# 10 ms under TCG, twice per container process (the v2 and the v1 devices hierarchy);
# the price is a slightly slower fork and exit (kernel 6.0's option).
CGROUP_OPTIONS = "favordynmods"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


class GuestPlatform:
    """The guest: a whole kernel of the sandbox's own. Each container gets a cgroup
    namespace rooted at its own cgroup (the guest's root cgroup is the agent's)."""

    # The guest's /proc shows the guest's kernel: the spec's masks alone apply.
    masked_paths: tuple = ()
    readonly_paths: tuple = ()

    cgroup_namespace = True
    # A privileged container gets the guest's devices (its spec lists the host's).
    guest_devices = True

    def __init__(self):
        self.cgroups = GuestCgroups()
        self.share_dir = SHARE_DIR
        self.share_mounted = False
        self.share_source = None  # (tag, kind) once mounted: to mount it again
        self.volumes_dir = VOLUMES_DIR
        self.volumes_mounted = False

    def set_hostname(self, name: str) -> None:
        sc.sethostname(name)

    copies_rootfs = True      # checkpointable containers' files live in guest memory

    def mount_share(self, tag: str, kind: str = "9p") -> None:
        if self.share_mounted:
            return
        self.share_source = (tag, kind)
        os.makedirs(SHARE_DIR, exist_ok=True)
        if kind == "virtiofs":
            sc.mount(tag, SHARE_DIR, "virtiofs", 0, None)
        else:
            sc.mount(tag, SHARE_DIR, "9p", 0,
                     "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client")
        self.share_mounted = True

    def release_share(self) -> None:
        """Unmount the share (and the volumes bound from it); EBUSY while a container's
        files are on it."""
        for point, mounted in ((VOLUMES_DIR, self.volumes_mounted), (SHARE_DIR, self.share_mounted)):
            if mounted:
                try:
                    sc.umount(point)
                except OSError as e:
                    raise FailedPrecondition(f"the share is in use in the guest ({e}): a "
                                             "container's files are on it") from None
        self.share_mounted = self.volumes_mounted = False

    def remount_share(self) -> None:
        if not self.share_mounted and self.share_source:
            self.mount_share(*self.share_source)

    def mount_volumes(self) -> None:
        if self.volumes_mounted:
            return
        os.makedirs(VOLUMES_DIR, exist_ok=True)
        sc.mount(os.path.join(SHARE_DIR, "volumes"), VOLUMES_DIR, None, sc.MS_BIND)
        sc.mount(None, VOLUMES_DIR, None, sc.MS_SHARED)
        self.volumes_mounted = True

    def reseed(self, data: bytes) -> None:
        with open("/dev/urandom", "wb") as f:
            fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(f, RNDRESEEDCRNG)

    def warm_up(self) -> None:
        from . import warmup
        warmup.run()

    def set_time(self, time_ns: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)

    def online_cpu_mem(self, cpus: int, memory_mib: int) -> None:
        from . import hotplug
        hotplug.online_cpus(cpus)
        hotplug.online_memory(memory_mib)

    def setup_interface(self, msg) -> None:
        network.setup_interface(msg)

    def reset_network(self) -> None:
        network.reset()

    def setup_routes(self, msg) -> None:
        network.setup_routes(msg)

    def power_off(self) -> None:
        # PID 1 must never exit: reset the machine instead (QEMU runs with -no-reboot).
        os.sync()
        sc.reboot(sc.LINUX_REBOOT_CMD_RESTART)


def mount_guest_filesystems() -> None:
    for source, target, kind, flags, data in (
            ("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
            ("sysfs", "/sys", "sysfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
            ("devtmpfs", "/dev", "devtmpfs", sc.MS_NOSUID, None),
            ("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "ptmxmode=0666,mode=0620"),
            ("shm", "/dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, None),
            ("tmpfs", "/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755"),
            ("cgroup2", GUEST_ROOT, "cgroup2", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
             CGROUP_OPTIONS)):
        os.makedirs(target, exist_ok=True)
        sc.mount(source, target, kind, flags, data)


def find_port(name: str, timeout: float = 10.0) -> str:
    """The /dev node of the virtio-serial port called ``name`` (no udev in the guest).

    Ports are announced asynchronously after the driver binds, so wait for them."""
    base = "/sys/class/virtio-ports"
    deadline = time.monotonic() + timeout
    while True:
        try:
            entries = sorted(os.listdir(base))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(base, entry, "name")) as f:
                    if f.read().strip() == name and os.path.exists(os.path.join("/dev", entry)):
                        return os.path.join("/dev", entry)
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise Unavailable(f"virtio-serial port {name} not found (have {entries})")
        time.sleep(0.002)


def guest_main() -> None:
    """Entry point as /init in the guest."""
    platform = GuestPlatform()
    try:
        mount_guest_filesystems()
        platform.cgroups.setup()
        network.loopback_up()
        ctl = os.open(find_port(p.CONTROL_PORT), os.O_RDWR | os.O_NONBLOCK)
        stream = os.open(find_port(p.STREAM_PORT), os.O_RDWR | os.O_NONBLOCK)
        Agent(ctl, stream, platform).run()
    except BaseException as e:
        log(f"fatal: {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    platform.power_off()
