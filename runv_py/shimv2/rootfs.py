"""A task's root filesystem: containerd's Mount list mounted on <bundle>/rootfs (in the
daemon's own mount namespace), and taken down again."""
import logging
import os
import subprocess

from ..hyperstart.errors import InvalidArgument

log = logging.getLogger("runv_py.shimv2")


def mount_rootfs(bundle: str, mounts: list) -> None:
    """containerd's rootfs Mount list (an overlay from the image's snapshot) on
    <bundle>/rootfs; with no mounts the rootfs is already in place."""
    target = os.path.join(bundle, "rootfs")
    for mnt in mounts:
        os.makedirs(target, exist_ok=True)
        args = ["mount", "-t", mnt.type or "none"]
        if mnt.options:
            args += ["-o", ",".join(mnt.options)]
        result = subprocess.run(args + [mnt.source, target], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            unmount(target)
            raise InvalidArgument(f"cannot mount the rootfs ({mnt.type}): {result.stderr.strip()}")


def unmount(target: str) -> None:
    """Unmount everything stacked on ``target`` (overlay over overlay)."""
    from ..hyperstart import syscalls
    for _ in range(8):
        if not os.path.ismount(target):
            return
        try:
            syscalls.umount(target, syscalls.MNT_DETACH)
        except OSError as e:
            log.warning("cannot unmount %s: %s", target, e)
            return
