"""A task's root filesystem: containerd's Mount list mounted on <bundle>/rootfs, in the
daemon's own mount namespace (taken down with syscalls.unmount_below)."""
import logging
import os
import subprocess

from ..hyperstart import syscalls
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
            syscalls.unmount_below(target)
            raise InvalidArgument(f"cannot mount the rootfs ({mnt.type}): {result.stderr.strip()}")
