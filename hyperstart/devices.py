"""A container's /dev: the default nodes, the spec's devices, and for a privileged
container the guest's own devices; then /dev/ptmx as the link into the container's
devpts, as runc leaves it.

A privileged container's spec (containerd's CRI, podman, docker) lists the devices of the
*host*, where the runtime was asked, and allows every device in the device cgroup. In a VM
the host's device numbers name nothing: such a container gets the guest's devices instead
(runc gives it the host's: the machine it runs on), found in the guest's devtmpfs.
"""
import os

from . import messages as m
from .errors import InvalidArgument

DEFAULT_DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                   ("urandom", 1, 9), ("tty", 5, 0)]
KINDS = {"c": 0o020000, "u": 0o020000, "b": 0o060000, "p": 0o010000}
# Not a privileged container's (containerd's list for host devices), and the agent's own
# channels to the host, which a container writing to would break.
SKIP_DIRS = ("pts", "shm", "fd", "mqueue")
SKIP_NAMES = ("console", "ptmx")
SKIP_PREFIXES = ("vport",)


def make_devices(dev: str) -> None:
    """The default nodes and links of a /dev tmpfs (runc's)."""
    for name, major, minor in DEFAULT_DEVICES:
        path = os.path.join(dev, name)
        if not os.path.exists(path):
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
            os.chmod(path, 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.symlink(target, path)
    os.makedirs(os.path.join(dev, "shm"), exist_ok=True)
    os.makedirs(os.path.join(dev, "pts"), exist_ok=True)


def setup_ptmx(dev: str) -> None:
    """/dev/ptmx -> pts/ptmx, whatever a device list put there (runc's setupPtmx): the
    container's ptys come from its own devpts instance."""
    path = os.path.join(dev, "ptmx")
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink("pts/ptmx", path)


def allows_all(rules) -> bool:
    """Whether the device rules end allowing every device (a privileged container's)."""
    everything = False
    for rule in rules:
        if rule.type in ("a", "") and rule.major is None and rule.minor is None:
            everything = rule.allow and set(rule.access) >= set("rwm")
        elif not rule.allow:
            everything = False
    return everything


def guest_devices(dev: str = "/dev", prefix: str = "/dev") -> list:
    """The character and block devices under ``dev`` as Device messages."""
    found = []
    for entry in sorted(os.scandir(dev), key=lambda e: e.name):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            if entry.name not in SKIP_DIRS:
                found += guest_devices(entry.path, f"{prefix}/{entry.name}")
            continue
        if entry.name in SKIP_NAMES or entry.name.startswith(SKIP_PREFIXES):
            continue
        st = entry.stat(follow_symlinks=False)
        kind = {0o020000: "c", 0o060000: "b"}.get(st.st_mode & 0o170000)
        if kind:
            found.append(m.Device(path=f"{prefix}/{entry.name}", type=kind,
                                  major=os.major(st.st_rdev), minor=os.minor(st.st_rdev),
                                  file_mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid))
    return found


def make_device(root: str, device: m.Device, secure_join) -> None:
    """A device node of linux.devices, with its mode and owner. The last component is
    not followed: a link there (/dev/ptmx) is replaced, not its target."""
    if device.type not in KINDS:
        raise InvalidArgument(f"device {device.path}: unknown type {device.type!r}")
    parent, name = os.path.split(device.path.rstrip("/"))
    if not name or name in (".", ".."):
        raise InvalidArgument(f"device {device.path}: not a file path")
    directory = secure_join(root, parent)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    if os.path.lexists(path):
        os.unlink(path)
    mode = 0o666 if device.file_mode is None else device.file_mode & 0o7777
    os.mknod(path, mode | KINDS[device.type], os.makedev(device.major, device.minor))
    os.chmod(path, mode)
    os.chown(path, device.uid or 0, device.gid or 0)
