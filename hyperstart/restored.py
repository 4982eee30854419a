"""What only a container restored from a checkpoint needs: done from a child of the
agent that joins one of the container's namespaces (the agent itself stays in its own)."""
import os

from . import syscalls as sc
from .errors import InvalidArgument


def set_hostname(pid: int, hostname: str) -> None:
    """The new spec's hostname in the UTS namespace of ``pid``."""
    in_namespace_of(pid, "uts", sc.CLONE_NEWUTS, lambda: sc.sethostname(hostname),
                    "set the hostname of")


def in_namespace_of(pid: int, kind: str, flag: int, action, what: str) -> None:
    """``action()`` in a child that joined ``pid``'s ``kind`` namespace (the agent stays)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            sc.setns(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY), flag)
            action()
            os._exit(0)
        except BaseException as e:
            os.write(write_end, str(e).encode()[:500])
            os._exit(1)
    os.close(write_end)
    why = os.read(read_end, 512).decode(errors="replace")
    os.close(read_end)
    _, status = os.waitpid(child, 0)
    if status:
        raise InvalidArgument(f"cannot {what} a restored container: {why}")


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def give_boot_id(pid: int, boot_id: str) -> None:
    """The guest kernel made its boot id before the checkpoint and keeps it: a restored
    container reads a file of its own over it (a bind mount in its mount namespace)."""
    os.makedirs("/run/runv", exist_ok=True)
    path = os.path.join("/run/runv", f"boot_id-{pid}")
    with open(path, "w") as f:
        f.write(boot_id + "\n")
    try:
        tree = sc.clone_tree(path, recursive=False)
        try:
            in_namespace_of(pid, "mnt", sc.CLONE_NEWNS, lambda: replace_mount(tree, BOOT_ID),
                            "give a boot id to")
        finally:
            os.close(tree)
    finally:
        os.unlink(path)  # the mount holds the file


def replace_mount(tree: int, target: str) -> None:
    """``tree`` at ``target`` instead of what an earlier restore put there (whose file
    is gone: nothing mounts on it)."""
    if os.path.ismount(target):
        sc.umount(target, sc.MNT_DETACH)
    sc.move_into(tree, target)
