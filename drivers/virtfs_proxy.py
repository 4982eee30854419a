"""9p for a jailed QEMU: the share served by virtfs-proxy-helper (qemu-system-common 7.2,
/usr/lib/qemu/virtfs-proxy-helper) over a socketpair, QEMU's ``-fsdev proxy``.

QEMU's own 9p backend needs root to serve a container's files as they are (any owner,
any mode); a jailed QEMU has neither root nor capabilities, so the helper serves them. It
keeps root with only the capabilities for file ownership and modes (host/jail.py), runs
in the mount namespace of the process that owns the sandbox (the rootfs and bind mounts
made there later are what the guest sees) and chroots into the share. It exits when
QEMU closes its end, and dies with its launcher like QEMU.
"""
import os
import socket
import subprocess

from . import DriverError, jail

HELPER = os.environ.get("RUNV_VIRTFS_PROXY", "/usr/lib/qemu/virtfs-proxy-helper")
LOG = "virtfs-proxy.log"


def qemu_args(fd: int, tag: str) -> list:
    return ["-fsdev", f"proxy,id=share,sock_fd={fd}",
            "-device", f"virtio-9p-device,fsdev=share,mount_tag={tag}"]


def start(share_dir: str, workdir: str, detached: bool = False) -> tuple:
    """Start the helper serving ``share_dir``; returns (its process, QEMU's end of the
    socket), the latter for the caller to pass to QEMU and close."""
    if not os.access(HELPER, os.X_OK):
        raise DriverError(f"{HELPER} not found (apt-get install qemu-system-common), "
                          "needed to share files with a jailed QEMU")
    helper_end, qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = jail.share_server_argv(
            [HELPER, "--nodaemon", "--path", share_dir, "--fd", str(helper_end.fileno())],
            die_with_parent=not detached)
        with open(os.path.join(workdir, LOG), "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, pass_fds=(helper_end.fileno(),))
    except OSError as e:
        qemu_end.close()
        raise DriverError(f"cannot start virtfs-proxy-helper: {e}") from None
    finally:
        helper_end.close()
    return proc, qemu_end
