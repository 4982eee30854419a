"""runc's `checkpoint` and `restore`, with runc's flags, for a container's whole VM
(sandbox/checkpoint.py). What CRIU does piecemeal (TCP connections, file locks, unix
sockets, a shell job) the VM's state holds whole, so those flags ask for nothing more;
what only makes sense for CRIU's process trees (pre-dumps, lazy pages, a page server)
is refused with the reason."""
import os
import sys

import click

from . import runtime_errors

NOT_FOR_A_VM = {
    "pre_dump": "--pre-dump: a VM is saved whole; there are no incremental dumps",
    "parent_path": "--parent-path: a VM is saved whole; there are no incremental dumps",
    "lazy_pages": "--lazy-pages: a VM's memory is restored whole, not paged in lazily",
    "page_server": "--page-server: a VM's memory is written to --image-path only",
    "status_fd": "--status-fd: only CRIU's lazy-pages server uses it",
    "empty_ns": "--empty-ns: the VM's namespaces are all in its state",
}


def refuse_unsupported(**given) -> None:
    from ..hyperstart.errors import InvalidArgument
    for name, value in given.items():
        if value:
            raise InvalidArgument(NOT_FOR_A_VM[name])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def criu_stats(path: str, kind: int, values: list) -> None:
    """CRIU's stats image (stats-dump: kind 1, stats-restore: kind 2), which podman reads
    for --print-stats and puts in an export: two magics, then a size-prefixed StatsEntry
    whose field ``kind`` holds ``values`` as fields 1, 2, ... (protobuf varints)."""
    import struct
    inner = b"".join(_varint(i << 3) + _varint(v) for i, v in enumerate(values, 1))
    entry = _varint(kind << 3 | 2) + _varint(len(inner)) + inner
    with open(path, "wb") as f:
        f.write(struct.pack("<III", 0x55105940, 0x57093306, len(entry)) + entry)


def work_log(work_path: str, name: str, line: str) -> None:
    """runc's CRIU writes dump.log / restore.log in --work-path; ours says what was done."""
    if work_path:
        os.makedirs(work_path, exist_ok=True)
        with open(os.path.join(work_path, name), "a") as f:
            f.write(line + "\n")


CRIU_EQUIVALENTS = (  # runc's flags whose effect a VM's state has anyway
    click.option("--tcp-established", is_flag=True, help="Kept: the VM's state holds its TCP connections."),
    click.option("--ext-unix-sk", is_flag=True, help="Kept: the VM's state holds its sockets."),
    click.option("--shell-job", is_flag=True, help="Kept: the VM's state holds its terminals."),
    click.option("--file-locks", is_flag=True, help="Kept: the VM's state holds its file locks."),
    click.option("--manage-cgroups-mode", default="", help="Ignored: the guest's cgroups are in the VM's state."),
    click.option("--auto-dedup", is_flag=True, help="Ignored: nothing to deduplicate."),
)


def criu_equivalents(func):
    for option in reversed(CRIU_EQUIVALENTS):
        func = option(func)
    return func


@click.command()
@click.option("--image-path", default="", help="Directory for the checkpoint (default ./checkpoint).")
@click.option("--work-path", default="", help="Directory for dump.log (default: --image-path).")
@click.option("--leave-running", is_flag=True, help="Leave the container running after the checkpoint.")
@criu_equivalents
@click.option("--pre-dump", is_flag=True, help="Refused: a VM is saved whole.")
@click.option("--parent-path", default="", help="Refused: a VM is saved whole.")
@click.option("--lazy-pages", is_flag=True, help="Refused: memory is saved whole.")
@click.option("--page-server", default="", help="Refused: memory goes to --image-path.")
@click.option("--status-fd", default="", help="Refused: no lazy-pages server.")
@click.option("--empty-ns", default="", help="Refused: the VM's namespaces are in its state.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def checkpoint(opts, image_path, work_path, leave_running, tcp_established, ext_unix_sk,
               shell_job, file_locks, manage_cgroups_mode, auto_dedup, pre_dump, parent_path,
               lazy_pages, page_server, status_fd, empty_ns, container_id):
    """Checkpoint a running container: its VM's RAM and state go to --image-path. The
    container must have been created checkpointable (annotation io.github.runv-py.checkpoint=true,
    or checkpoint = true in the settings)."""
    from ..shim import lifecycle
    refuse_unsupported(pre_dump=pre_dump, parent_path=parent_path, lazy_pages=lazy_pages,
                       page_server=page_server, status_fd=status_fd, empty_ns=empty_ns)
    image_path = os.path.abspath(image_path or "checkpoint")
    meta = lifecycle.checkpoint(opts.root, container_id, image_path, leave_running)
    work_path = work_path or image_path
    work_log(work_path, "dump.log", f"runv-py: {container_id}'s VM saved in {image_path}"
             f"{' (left running)' if leave_running else ''}")
    took, pages = meta["timings_us"], meta["state_bytes"] // 4096
    # freezing, frozen, memdump, memwrite (µs); pages scanned, skipped, written;
    # irmap_resolve (µs), pages_lazy
    criu_stats(os.path.join(work_path, "stats-dump"), 1,
               [took["freezing"], took["frozen"], took["memdump"], took["memdump"], pages, 0,
                pages, 0, 0])


@click.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.option("--image-path", default="", help="The checkpoint's directory (default ./checkpoint).")
@click.option("--work-path", default="", help="Directory for restore.log (default: --image-path).")
@click.option("-d", "--detach", is_flag=True, help="Detach from the restored container.")
@click.option("--pid-file", default="", help="Write the container's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@criu_equivalents
@click.option("--no-subreaper", is_flag=True, hidden=True)
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--lsm-profile", default="", hidden=True)
@click.option("--lsm-mount-context", default="", hidden=True)
@click.option("--lazy-pages", is_flag=True, help="Refused: memory is restored whole.")
@click.option("--empty-ns", default="", help="Refused: the VM's namespaces are in its state.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def restore(opts, bundle, image_path, work_path, detach, pid_file, console_socket,
            tcp_established, ext_unix_sk, shell_job, file_locks, manage_cgroups_mode,
            auto_dedup, no_subreaper, no_pivot, lsm_profile, lsm_mount_context, lazy_pages,
            empty_ns, container_id):
    """Restore a container from a checkpoint into a new VM; it runs at once, its stdio
    and network those of this call and bundle."""
    from ..shim import lifecycle
    from .commands import shim_args
    refuse_unsupported(lazy_pages=lazy_pages, empty_ns=empty_ns)
    image_path = os.path.abspath(image_path or "checkpoint")
    if not detach:
        from .run import run_foreground
        sys.exit(run_foreground(opts.root, container_id, bundle, shim_args(opts),
                                restore_from=image_path))
    import time
    started = time.monotonic()
    lifecycle.create(opts.root, container_id, bundle, console_socket=console_socket,
                     pid_file=pid_file, restore_from=image_path, **shim_args(opts))
    work_path = work_path or image_path
    work_log(work_path, "restore.log", f"runv-py: {container_id} restored from {image_path}")
    took = int((time.monotonic() - started) * 1e6)
    # pages compared, skipped (copy-on-write), forking time, restore time (µs)
    criu_stats(os.path.join(work_path, "stats-restore"), 2, [0, 0, 0, took])
