"""The node's VM factory: one long-lived process per node that keeps VM templates and a
small pool of booted VMs, and hands them to the shims that own sandboxes (the CLI's
per-container shims, the shim v2's pods, and through them `runv-py containerd`).

A shim asks for a VM of a given shape (kernel, initrd, size, share, NIC) over a unix
socket and gets the agent's two connected sockets (SCM_RIGHTS) and the VM's pids and
paths. The factory stays QEMU's parent and watches the shim through a pidfd: when the
shim dies, killed or not, the factory stops the VM and removes what it held (mounts,
directory). The VMs it handed out do not depend on the factory: it can be restarted
while they run, and a new factory takes over their records. A shim that cannot reach
the factory starts one for next time and boots its VM cold (one log line).

On by default; ``RUNV_FACTORY=off`` in the environment, or ``factory = false`` in
/etc/runv-py/runv-py.toml, turns it off.
"""
import contextlib
import os

from .. import paths

FACTORY_DIR = os.environ.get("RUNV_FACTORY_DIR", os.path.join(paths.STATE_ROOT, "factory"))
SOCKET = "factory.sock"
LOCK = "factory.lock"
LOG = "factory.log"
VMS = "vms"                 # one directory per VM; a shared mount (see client.py)
TEMPLATES = "templates"
RECORD = "vm.json"
HOLDING_NETNS = "runv-py-factory"   # where pooled VMs' taps wait for a pod (/run/netns)
DEFAULT_POOL = 2


def path(*parts: str) -> str:
    return os.path.join(FACTORY_DIR, *parts)


def settings() -> dict:
    """{"enabled", "pool", "pause", "warmup"} from the environment, then the node's config
    file. ``pause``: ready clones wait stopped (off by default); ``warmup``: ready clones
    run a pod's kernel paths once (on by default)."""
    from ..hyperstart.errors import InvalidArgument
    from ..settings import from_env, node_file
    try:
        values = node_file()[1]
    except InvalidArgument:
        values = {}  # the shim v2 says why; a CLI run boots cold rather than fail
    pool = os.environ.get("RUNV_FACTORY_POOL") or values.get("factory_pool") or DEFAULT_POOL
    try:
        pool = max(0, min(int(pool), 64))
    except (TypeError, ValueError):
        pool = DEFAULT_POOL
    return {"enabled": from_env("RUNV_FACTORY", values.get("factory", True)), "pool": pool,
            "pause": from_env("RUNV_FACTORY_PAUSE", values.get("factory_pause", False)),
            "warmup": from_env("RUNV_FACTORY_WARMUP", values.get("factory_warmup", True))}


@contextlib.contextmanager
def left_as_found():
    """Stop the node's factory, and the shim v2's fork server, on the way out if they were
    not running on the way in: a test run or a benchmark whose clients started them must
    not leave their pooled VMs or processes behind."""
    from ..shimv2 import zygote
    was_running, zygote_was_running = os.path.exists(path(SOCKET)), zygote.running()
    try:
        yield
    finally:
        if not was_running and os.path.exists(path(SOCKET)):
            import subprocess
            import sys
            subprocess.run([sys.executable, "-m", "runv_py.cli", "factory", "stop"],
                           capture_output=True, timeout=120)
        if not zygote_was_running and zygote.running():
            zygote.stop_server()
