"""The VMM jail: how QEMU and the share's server run on the host.

QEMU runs as the unprivileged user ``runv-py-vm`` with no capabilities (the bounding
set empty too), no_new_privs, QEMU's own seccomp sandbox, rlimits, fresh mount, pid, ipc
and uts namespaces, the pod's network namespace (or a fresh empty one: a VM needs no
host network), chrooted into a tmpfs that holds only what it needs: /usr read-only (the
binary and its libraries), three device nodes, the boot files, the RAM file of a clone
and its own VM directory. Everything is done by util-linux tools exec'ing one another
(setpriv, prlimit, nsenter, unshare, a /bin/sh script for the mounts): no Python runs
between fork and exec, and the jail's mounts live in its own mount namespace, so they
vanish with QEMU whatever kills it.

Why one user for every VM and not one per sandbox: a clone maps its template's RAM file
privately, but QEMU 7.2 opens that file read-write (``readonly=on`` makes the guest's RAM
read-only; read-only file with writable private map came in 8.2), so every clone of a
template needs write access to one 0600 file. VMs are kept apart by the namespaces and
the chroot instead: no QEMU can see or signal another's pid, or reach another's files.

The share's server keeps root because serving a container's files needs it:
virtfs-proxy-helper (9p) and virtiofsd (virtio-fs) keep only the capabilities for file
ownership and modes (``SHARE_SERVER_CAPS``), with no_new_privs, in fresh ipc, uts and
network namespaces, chrooted into the share.

``RUNV_JAIL=off`` in the environment, or ``jail = false`` in /etc/runv-py/runv-py.toml,
turns the jail off (QEMU then runs as root, as before).
"""
import dataclasses
import os
import pwd
import signal
import subprocess
import time

from .adopted import Signalled

# == runv_py/paths.py's CONFIG_FILE (drivers import nothing of runv_py's but hyperstart)
CONFIG_FILE = "/etc/runv-py/runv-py.toml"
VM_USER = "runv-py-vm"
JAIL_ROOT = "jail"             # the chroot's mount point, in the VM's directory
INSIDE_KERNEL = "/boot/kernel"
INSIDE_INITRD = "/boot/initrd"
INSIDE_MEMORY = "/mem/ram"
# QEMU needs few fds: its sockets, the taps, the RAM and boot files.
QEMU_RLIMITS = ("--nofile=1024", "--core=0")
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# What serving a container's files as they are (owners, modes, device nodes) needs, and
# at start the chroot into the share and setpcap, with which the servers drop the rest
# themselves (virtiofsd dies on its own seccomp filter without it).
SHARE_SERVER_CAPS = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid",
                     "mknod", "setfcap", "sys_chroot", "setpcap")

# Run by /bin/sh in the jail's new mount namespace: build the chroot, then exec QEMU
# through unshare --root (the chroot) and setpriv (the user, no capabilities, no_new_privs).
# Arguments: ROOT WORKDIR UID GID then triples (inside path, host path, ro|rw) up to "--",
# then QEMU's command line.
_SCRIPT = r'''set -eu
root=$1 workdir=$2 uid=$3 gid=$4; shift 4
mount -t tmpfs -o mode=0755,size=256k,nosuid,nodev,noexec runv-py-jail "$root"
mkdir "$root/usr" "$root/dev" "$root/vm"
ln -s usr/bin "$root/bin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
mount --bind /usr "$root/usr"; mount -o remount,bind,ro,nosuid,nodev "$root/usr"
mount --bind "$workdir" "$root/vm"
for dev in null zero urandom; do
    : > "$root/dev/$dev"; mount --bind "/dev/$dev" "$root/dev/$dev"
done
while [ "$1" != -- ]; do
    mkdir -p "$root$(dirname "$1")"; : > "$root$1"
    mount --bind "$2" "$root$1"; mount -o "remount,bind,$3,nosuid,nodev,noexec" "$root$1"
    shift 3
done
shift
mount -o remount,ro,nosuid,nodev,noexec "$root"
exec unshare --root="$root" --wd=/vm -- /usr/bin/setpriv --reuid="$uid" --regid="$gid" \
    --clear-groups --nnp --inh-caps=-all --bounding-set=-all --pdeathsig KILL -- "$@"
'''


class JailError(OSError):
    """The jail could not be set up."""


def tied_to_launcher(argv: list, tied: bool = True) -> list:
    """``argv`` run so that it dies with the thread that launches it (``tied``): a VM
    and its share's server must not outlive it (see vm/launcher.py)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv] if tied else list(argv)


def enabled() -> bool:
    env = os.environ.get("RUNV_JAIL", "").strip().lower()
    if env:
        return env not in ("0", "off", "false", "no")
    config_file = os.environ.get("RUNVPY_CONFIG") or CONFIG_FILE
    if os.path.isfile(config_file):
        try:
            import tomllib
            with open(config_file, "rb") as f:
                return bool(tomllib.load(f).get("jail", True))
        except (OSError, ValueError):
            pass
    return True


def vm_user() -> tuple:
    """(uid, gid) of the VM user, made the first time it is needed (setup makes it too)."""
    try:
        entry = pwd.getpwnam(VM_USER)
    except KeyError:
        result = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                                 "/nonexistent", "--shell", "/usr/sbin/nologin", VM_USER],
                                capture_output=True, text=True, timeout=30)
        if result.returncode not in (0, 9):  # 9: made meanwhile by another process
            raise JailError(f"cannot create the user {VM_USER}: {result.stderr.strip()}")
        entry = pwd.getpwnam(VM_USER)
    return entry.pw_uid, entry.pw_gid


@dataclasses.dataclass
class QemuJail:
    """What one QEMU sees: its directory, and files bound at inside paths (read-only but
    for the RAM file, which QEMU 7.2 opens read-write)."""
    workdir: str
    files: dict = dataclasses.field(default_factory=dict)   # inside path -> host path
    netns: str = ""           # the pod's network namespace; "" for a fresh empty one
    die_with_parent: bool = True

    def argv(self, qemu_argv: list) -> list:
        """The command that runs ``qemu_argv`` (with the jail's paths) in the jail."""
        uid, gid = vm_user()
        root = os.path.join(self.workdir, JAIL_ROOT)
        os.makedirs(root, exist_ok=True)
        os.chown(self.workdir, uid, gid)
        os.chmod(self.workdir, 0o700)
        binds = []
        for inside, host in sorted(self.files.items()):
            binds += [inside, host, "rw" if inside == INSIDE_MEMORY else "ro"]
        prefix = ["nsenter", f"--net={self.netns}", "--"] if self.netns else []
        return tied_to_launcher([
            *prefix, "prlimit", *QEMU_RLIMITS, "--",
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
            "--kill-child", "--ipc", "--uts", *([] if self.netns else ["--net"]), "--",
            "/bin/sh", "-c", _SCRIPT, "runv-py-jail", root, os.path.abspath(self.workdir),
            str(uid), str(gid), *binds, "--", *qemu_argv], self.die_with_parent)


def share_server_argv(argv: list, die_with_parent: bool) -> list:
    """The command that runs a share server (root, its capabilities only, no_new_privs,
    fresh ipc, uts and network namespaces; it chroots into the share itself)."""
    bounding = ",".join(f"+{c}" for c in SHARE_SERVER_CAPS)
    return tied_to_launcher(["unshare", "--ipc", "--uts", "--net", "--",
                             "setpriv", "--nnp", "--inh-caps=-all",
                             f"--bounding-set=-all,{bounding}", "--", *argv], die_with_parent)


class JailedProcess(Signalled):
    """QEMU in its jail, as QemuVM sees a Popen: ``pid`` is QEMU's host pid (PID 1 of its
    own pid namespace, a child of the jail's ``unshare``), signalled through a pidfd (a
    pid reused after QEMU ended is never hit); the exit status is the jail's (unshare
    passes QEMU's on)."""

    def __init__(self, wrapper: subprocess.Popen, timeout: float = 10.0):
        self.wrapper = wrapper
        self.args = wrapper.args
        self.pid = self._find_qemu(timeout)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.pidfd = -1   # gone already: the caller reads why from the log

    def _find_qemu(self, timeout: float) -> int:
        children = f"/proc/{self.wrapper.pid}/task/{self.wrapper.pid}/children"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(children) as f:
                    found = f.read().split()
                if found:
                    return int(found[0])
            except OSError:
                pass
            if self.wrapper.poll() is not None or time.monotonic() > deadline:
                return self.wrapper.pid
            time.sleep(0.001)

    @property
    def returncode(self):
        return self.wrapper.returncode

    def poll(self):
        code = self.wrapper.poll()
        if code is not None and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return code

    def wait(self, timeout=None):
        code = self.wrapper.wait(timeout)
        self.poll()
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:  # the jail's unshare too: nothing of it may linger
            try:
                self.wrapper.kill()
            except ProcessLookupError:
                pass
