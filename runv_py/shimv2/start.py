"""containerd's ``start`` of the shim v2, with as little imported as it can.

containerd runs ``BIN ... -id ID start`` in the bundle and waits for it, for a pod's
sandbox and again for each of its containers: every module it loads is on a pod's start.
logging, subprocess, typing and the pods module cost some 40 ms here, so ``start`` loads
none of them; the fork server's client is imported only when a daemon must be started.
The daemon and the other actions are main.py's.
"""
import os
import sys

import _socket as socket

from ..hyperstart.errors import RunvError
from ..oci.bundle import check_id, read_spec

SOCKET_DIR = "/run/containerd/s"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


class Flags:
    """containerd's Go-style flags: ``-name value`` (``-debug`` alone) and an action."""

    VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}

    def __init__(self, argv: list):
        self.values: dict = {}
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

    def argv(self) -> list:
        """The flags again, for the daemon's command line (without the action)."""
        args = [f"-{name}={value}" for name, value in self.values.items() if name != "socket"]
        return args + (["-debug"] if self.debug else [])


def socket_path(address: str, namespace: str, cid: str) -> str:
    """As containerd's own shims do: a hash of containerd's address, namespace and id."""
    from hashlib import sha256
    digest = sha256(os.path.join(address, namespace, cid).encode()).hexdigest()
    return os.path.join(SOCKET_DIR, digest[:32])


def annotations_of(bundle: str) -> dict:
    annotations = read_spec(bundle).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def sandbox_of(annotations: dict) -> str:
    """The sandbox id a pod's app container joins ('' for a sandbox, or no pod)."""
    if annotations.get(CONTAINER_TYPE) == "container":
        return annotations.get(SANDBOX_ID, "")
    return ""


def sandbox_group(bundle: str, cid: str) -> str:
    """The sandbox a task belongs to (containerd's CRI annotations), as containerd's runc
    shim groups them: a pod's containers share its daemon, and its VM."""
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
    from . import zygote
    pid = zygote.spawn(flags.argv(), fd, bundle) if zygote.enabled() else 0
    if not pid:
        import subprocess
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
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def can_connect(path: str) -> bool:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(path)
        finally:
            sock.close()
        return True
    except OSError:
        return False


def write_address(bundle: str, address: str) -> None:
    """containerd reconnects after a restart through ``<bundle>/address``."""
    tmp = os.path.join(bundle, "address.tmp")
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, os.path.join(bundle, "address"))


def main(argv: list = None) -> None:
    """The entry point: ``start`` and ``-v`` here, every other action in main.py."""
    flags = Flags(sys.argv[1:] if argv is None else argv)
    if flags.action == "version":
        print("containerd-shim-runvpy-v2 (runv-py)")
        sys.exit(0)
    if flags.action != "start":
        from .main import run
        run(flags)
        return
    try:
        code = start(flags)
    except Exception as e:
        if not isinstance(e, RunvError):  # not the caller's mistake: where it happened
            import traceback
            traceback.print_exc()
        print(f"containerd-shim-runvpy-v2 start: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
