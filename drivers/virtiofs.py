"""virtio-fs for the sandbox's share: one virtiofsd per VM, started before QEMU and
ended with it (it dies with its launcher too: a parent-death signal).

virtiofsd is Debian's (qemu-system-common 7.2, /usr/lib/qemu/virtiofsd), run with
``sandbox=chroot``: chrooted into the share, in the mount namespace of the process that
owns the sandbox, so the rootfs and bind mounts made there later are what the guest
sees (a namespace sandbox would copy the mount table at start and miss them).
vhost-user needs the guest's RAM shared with it: the VM gets a memfd backend, share=on.
"""
import os
import signal
import subprocess
import time

from ..hyperstart import syscalls
from . import DriverError

VIRTIOFSD = os.environ.get("RUNV_VIRTIOFSD", "/usr/lib/qemu/virtiofsd")
SOCKET = "vfs.sock"
LOG = "virtiofsd.log"
START_TIMEOUT = 10.0


def available() -> bool:
    return os.access(VIRTIOFSD, os.X_OK)


def qemu_args(tag: str, memory_mib: int) -> tuple:
    """(QEMU arguments for the device and the shared memory, the machine option)."""
    # libvhost-user serves modern virtio only; microvm's virtio-mmio is legacy by default.
    return (["-global", "virtio-mmio.force-legacy=false",
             "-chardev", f"socket,id=vfs,path={SOCKET}",
             "-device", f"vhost-user-fs-device,chardev=vfs,tag={tag}",
             "-object", f"memory-backend-memfd,id=mem0,size={memory_mib}M,share=on"],
            ",memory-backend=mem0")


def start(share_dir: str, workdir: str) -> subprocess.Popen:
    """Start virtiofsd serving ``share_dir`` on ``workdir``/vfs.sock; returns once the
    socket is there for QEMU to connect to."""
    if not available():
        raise DriverError(f"{VIRTIOFSD} not found (apt-get install qemu-system-common), "
                          "or use the 9p share")
    socket_path = os.path.join(workdir, SOCKET)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    with open(os.path.join(workdir, LOG), "wb") as log:
        try:
            proc = subprocess.Popen(
                # Relative, as QEMU's: a socket path is limited to 107 bytes.
                [VIRTIOFSD, f"--socket-path={SOCKET}", "-o", f"source={share_dir}",
                 "-o", "sandbox=chroot", "-o", "cache=auto", "-o", "log_level=warn"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                preexec_fn=lambda: syscalls.die_with_parent(signal.SIGKILL))
        except OSError as e:
            raise DriverError(f"cannot start virtiofsd: {e}") from None
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            with open(os.path.join(workdir, LOG), errors="replace") as f:
                raise DriverError(f"virtiofsd did not start: {f.read()[-1000:]}")
        time.sleep(0.002)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
