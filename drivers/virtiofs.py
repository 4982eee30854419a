"""virtio-fs for the sandbox's share: one virtiofsd per VM, started before QEMU and
ended with it (it dies with its launcher too: a parent-death signal).

virtiofsd is Debian's (qemu-system-common 7.2, /usr/lib/qemu/virtiofsd), run with
``sandbox=chroot``: chrooted into the share, in the mount namespace of the process that
owns the sandbox, so the rootfs and bind mounts made there later are what the guest
sees (a namespace sandbox would copy the mount table at start and miss them).
vhost-user needs the guest's RAM shared with it: the VM gets a memfd backend, share=on.
"""
import os
import subprocess

from . import DriverError, jail

VIRTIOFSD = os.environ.get("RUNV_VIRTIOFSD", "/usr/lib/qemu/virtiofsd")
SOCKET = "vfs.sock"
LOG = "virtiofsd.log"


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


def start(share_dir: str, workdir: str, detached: bool = False,
          jailed: bool = False) -> subprocess.Popen:
    """Start virtiofsd serving ``share_dir`` on ``workdir``/vfs.sock, a socket bound here
    and handed over with --fd: QEMU may connect at once (the connection waits in the
    backlog until virtiofsd accepts it). With --socket-path virtiofsd would also take a
    lock named after that path, which a relative path would make common to all VMs, and
    an absolute one can pass the 107 bytes a socket path may have. A ``detached``
    virtiofsd (the node factory's) does not die with its launcher. A ``jailed`` one keeps
    only the capabilities it needs, in fresh ipc, uts and network namespaces."""
    import socket
    if not available():
        raise DriverError(f"{VIRTIOFSD} not found (apt-get install qemu-system-common), "
                          "or use the 9p share")
    try:
        os.unlink(os.path.join(workdir, SOCKET))
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:  # through the directory's fd: a short path whatever workdir's length
            listener.bind(f"/proc/self/fd/{dir_fd}/{SOCKET}")
        finally:
            os.close(dir_fd)
        listener.listen(1)
        if jailed:  # QEMU connects as the VM user
            uid, gid = jail.vm_user()
            os.chown(os.path.join(workdir, SOCKET), uid, gid)
        argv = [VIRTIOFSD, f"--fd={listener.fileno()}", "-o", f"source={share_dir}",
                "-o", "sandbox=chroot", "-o", "cache=auto", "-o", "log_level=warn"]
        argv = jail.share_server_argv(argv, die_with_parent=not detached) if jailed \
            else jail.tied_to_launcher(argv, not detached)
        with open(os.path.join(workdir, LOG), "wb") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, pass_fds=(listener.fileno(),))
    except OSError as e:
        raise DriverError(f"cannot start virtiofsd: {e}") from None
    finally:
        listener.close()  # virtiofsd holds it now
