"""containerd-shim-runvpy-v2: the containerd shim v2 for runv-py (runtime
``io.containerd.runvpy.v2``).

containerd runs ``BIN -namespace NS -address SOCK -publish-binary P -id ID start`` in the
bundle; ``start`` binds the shim's socket, leaves a detached daemon serving the ttrpc
``containerd.task.v2.Task`` service on it, and prints its address. The daemon creates
the VM container through the same per-container runv-py shim the CLI uses (a child of
the daemon, so its exit status is the task's), and publishes task events to containerd
on TTRPC_ADDRESS. ``BIN ... -bundle B delete`` cleans up after a daemon that died.
"""
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Dict, List, Optional

from ..hyperstart.errors import RunvError
from ..oci.bundle import check_id
from . import zygote

log = logging.getLogger("runv_py.shimv2")

SOCKET_DIR = "/run/containerd/s"


class Flags:
    """containerd's Go-style flags: ``-name value`` (``-debug`` alone) and an action."""

    VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}

    def __init__(self, argv: List[str]):
        self.values: Dict[str, str] = {}
        self.debug = False
        self.action = ""
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg.startswith("-"):
                name, _, value = arg.lstrip("-").partition("=")
                if name in self.VALUED and not value and i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                if name in ("debug", "v"):
                    self.debug = self.debug or name == "debug"
                    if name == "v":
                        self.action = "version"
                else:
                    self.values[name] = value
            else:
                self.action = arg
            i += 1

    def get(self, name: str) -> str:
        return self.values.get(name, "")

    def argv(self) -> List[str]:
        """The flags again, for the daemon's command line (without the action)."""
        args = [f"-{name}={value}" for name, value in self.values.items() if name != "socket"]
        return args + (["-debug"] if self.debug else [])


def socket_path(address: str, namespace: str, cid: str) -> str:
    """As containerd's own shims do: a hash of containerd's address, namespace and id."""
    digest = hashlib.sha256(os.path.join(address, namespace, cid).encode()).hexdigest()
    return os.path.join(SOCKET_DIR, digest[:32])


def sandbox_group(bundle: str, cid: str) -> str:
    """The sandbox a task belongs to (containerd's CRI annotations), as containerd's runc
    shim groups them: a pod's containers share its daemon, and its VM."""
    from .pods import annotations_of, sandbox_of
    return sandbox_of(annotations_of(bundle)) or cid


def task_id(flags: Flags) -> str:
    """The -id flag, checked as the CLI checks container ids: it names directories."""
    return check_id(flags.get("id"), "task id")


def start(flags: Flags) -> int:
    bundle = os.getcwd()
    group = sandbox_group(bundle, task_id(flags))
    if group != flags.get("id"):  # from the spec's annotations: checked like an id
        check_id(group, "sandbox id")
    path = socket_path(flags.get("address"), flags.get("namespace"), group)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    address = f"unix://{path}"
    if can_connect(path):  # a daemon already serves this task or its pod: its address
        write_address(bundle, address)
        sys.stdout.write(address)
        return 0
    if group != flags.get("id"):
        raise RuntimeError(f"the shim of sandbox {group} is not running: a container of a "
                           "pod runs in its sandbox's VM")
    try:
        os.unlink(path)  # a stale socket of a dead shim of the same task
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: only root may call the shim
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    fd = listener.fileno()
    pid = zygote.spawn(flags.argv(), fd, bundle) if zygote.enabled() else 0
    if not pid:
        # Python fds are close-on-exec: the daemon gets the listener explicitly
        # (pass_fds makes it inheritable) and none of containerd's pipes, so that
        # `start`'s output ends when `start` does.
        devnull = os.open(os.devnull, os.O_RDWR)
        pid = subprocess.Popen(
            [sys.executable, "-m", "runv_py.shimv2", *flags.argv(), "-socket", str(fd),
             "serve"], stdin=devnull, stdout=devnull, stderr=devnull, cwd=bundle,
            start_new_session=True, pass_fds=(fd,)).pid
    listener.close()
    write_address(bundle, address)
    log.debug("daemon %d serves %s", pid, address)
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def can_connect(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)
        return True
    except OSError:
        return False


def write_address(bundle: str, address: str) -> None:
    """containerd reconnects after a restart through ``<bundle>/address``."""
    tmp = os.path.join(bundle, "address.tmp")
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, os.path.join(bundle, "address"))


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
    flags = Flags(sys.argv[1:] if argv is None else argv)
    if flags.action == "version":
        print("containerd-shim-runvpy-v2 (runv-py)")
        sys.exit(0)
    actions = {"start": start, "delete": delete, "serve": serve,
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
