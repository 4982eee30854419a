"""containerd-shim-runvpy-v2: the containerd shim v2 for runv-py (runtime
``io.containerd.runvpy.v2``).

containerd runs ``BIN -namespace NS -address SOCK -publish-binary P -id ID start`` in the
bundle; ``start`` binds the shim's socket, leaves a detached daemon serving the ttrpc
``containerd.task.v2.Task`` service on it, and prints its address. The daemon creates
the VM container through the same per-container runv-py shim the CLI uses (a child of
the daemon, so its exit status is the task's), and publishes task events to containerd
on TTRPC_ADDRESS. ``BIN ... -bundle B delete`` cleans up after a daemon that died.
"""
import logging
import os
import socket
import sys
import threading
from typing import List, Optional

from ..hyperstart.errors import RunvError
from . import zygote
from .start import Flags, socket_path, task_id

log = logging.getLogger("runv_py.shimv2")

def delete(flags: Flags) -> int:
    """Clean up after a daemon that is gone (containerd runs this after crashes too): its
    VM died with it; remove the sandbox's files, unmount the rootfs, print a
    DeleteResponse. Idempotent."""
    import json
    from ..host import statedir
    from ..hyperstart import syscalls
    from ..sandbox import VM_DIED_STATUS
    from .pb import shimv2_pb2 as pb
    from .service import TASK_FILE
    bundle = flags.get("bundle") or os.getcwd()
    cid = task_id(flags)
    root = os.path.join(bundle, "runv")
    workdir = os.path.join(root, cid)
    pid = 0
    try:
        with open(os.path.join(workdir, TASK_FILE)) as f:
            pid = int(json.load(f).get("pid") or 0)
    except (OSError, ValueError):
        pass
    statedir.remove(workdir)
    try:
        os.rmdir(root)
    except OSError:
        pass
    syscalls.unmount_below(os.path.join(bundle, "rootfs"))
    release_network(bundle)
    try:  # the socket of the daemon that died
        os.unlink(socket_path(flags.get("address"), flags.get("namespace"), cid))
    except OSError:
        pass
    response = pb.DeleteResponse(pid=pid, exit_status=VM_DIED_STATUS)
    response.exited_at.GetCurrentTime()
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


def release_network(bundle: str) -> None:
    """The redirections a killed daemon left in the pod's network namespace."""
    from ..net import netns_path, release
    from ..oci.bundle import read_spec
    path = netns_path(read_spec(bundle))
    if path:
        release(path)


def serve(flags: Flags) -> int:
    """The daemon: where its VM will come from, its own mount namespace (the rootfs and
    the sandbox's share mounts vanish with it), then the ttrpc server until Shutdown."""
    from .. import ttrpc
    from ..drivers import probe
    from ..sandbox import private_mount_namespace
    from . import config as shim_config
    from .service import TaskService
    from ..factory.client import for_shim
    from ..vm.boot import BootConfig
    from .pods import with_room_to_grow
    bundle = os.getcwd()
    setup_logging(bundle, flags)
    config = shim_config.load()
    # The shape a node factory it starts keeps warm: its pods' (CRI sandboxes grow).
    shape = BootConfig(**with_room_to_grow(config.boot_config()))
    factory = for_shim(probe(config.driver), shape, config.factory_policy or None,
                       config.template)
    private_mount_namespace()  # before any thread: unshare needs a single thread
    listener = socket.socket(fileno=int(flags.get("socket") or 3))
    service = TaskService(flags.get("namespace"), task_id(flags), bundle,
                          os.environ.get("TTRPC_ADDRESS", ""), listener, config, factory)
    log.info("serving %s in %s", flags.get("id"), bundle)
    if zygote.forked_from:
        log.info("forked by the shim fork server (pid %d)", zygote.forked_from)
    elif os.environ.get(zygote.COLD_REASON):
        log.info("started on its own, not forked: %s", os.environ.pop(zygote.COLD_REASON))
    server = ttrpc.Server(service.handlers())
    threading.Thread(target=server.serve, args=(listener,), name="accept", daemon=True).start()
    service.shutdown.wait()  # QEMU dies with this process (its launcher thread's)
    service.wait_shutdown(10.0)
    return 0


def setup_logging(bundle: str, flags: Flags) -> None:
    # RUNVPY_SHIM_LOG_DIR keeps logs past the bundle's removal (tests, debugging).
    log_dir = os.environ.get("RUNVPY_SHIM_LOG_DIR") or bundle
    name = f"shimv2-{flags.get('id')}.log" if log_dir != bundle else "shimv2.log"
    handler = logging.FileHandler(os.path.join(log_dir, name))
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    # The daemon's stderr is /dev/null: a thread's crash must reach the log instead.
    threading.excepthook = lambda a: log.error("thread %s crashed", a.thread and a.thread.name,
                                               exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    root.setLevel(logging.DEBUG if flags.debug or os.environ.get("RUNVPY_SHIM_DEBUG") else logging.INFO)


def main(argv: Optional[List[str]] = None) -> None:
    from .start import main as start_main
    start_main(argv)


def run(flags: Flags) -> None:
    """Every action but ``start`` (start.py)."""
    actions = {"delete": delete, "serve": serve,
               "zygote": lambda _: zygote.serve(),
               "stop-zygote": lambda _: 0 if zygote.stop_server() else 1}
    action = actions.get(flags.action)
    if action is None:
        print(f"containerd-shim-runvpy-v2: unknown action {flags.action!r} "
              "(start, delete, zygote, stop-zygote)", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(action(flags))
    except Exception as e:
        if isinstance(e, RunvError):  # the caller's mistake: its message says it all
            log.info("%s failed: %s", flags.action, e)
        else:
            log.exception("%s failed", flags.action)
        print(f"containerd-shim-runvpy-v2 {flags.action}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
