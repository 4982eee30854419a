"""Per-container state directories under ``--root`` (default /run/runv-py).

Removal never follows a mount point: whatever is still mounted below the directory in
this mount namespace is detached first, so a bind-mounted rootfs is never deleted.
"""
import errno
import os

from ..hyperstart.errors import AlreadyExists
from ..oci.bundle import check_id


def container_dir(root: str, cid: str) -> str:
    check_id(cid)
    return os.path.join(os.path.abspath(root), cid)


def create(root: str, cid: str) -> str:
    """Make the state directory of a new container; an existing one is an error."""
    path = container_dir(root, cid)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise AlreadyExists(f"container {cid!r} already exists") from None
    return path


def remove(path: str) -> None:
    """Remove a state directory without ever descending into a mount."""
    if not os.path.lexists(path):
        return
    # ctypes: imported here, not for the commands that only read records
    from ..hyperstart import syscalls
    syscalls.unmount_below(path)
    still_mounted = set(syscalls.mounts_below(path, include_self=True))
    _remove_tree(path, still_mounted)


def _remove_tree(path: str, keep: set) -> None:
    if path in keep:
        return
    try:
        entries = os.scandir(path)
    except NotADirectoryError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    with entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path, keep)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise
