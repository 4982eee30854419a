"""A shim's part in checkpoint and restore (the VM's part: sandbox/checkpoint.py).

``checkpoint`` saves the sandbox's VM into the caller's image directory; the container
then stops as runc's does after a dump (its status 137), unless it is left running.
A restoring shim boots nothing: it enters the namespaces of the spec it is given, as a
new container's shim does, and its VM goes on from the checkpoint, the container
already running, its stdio now the restorer's.
"""
import os

from ..hyperstart import states
from ..hyperstart.errors import FailedPrecondition, InvalidArgument
from ..oci.state import now_rfc3339
from ..sandbox import VM_DIED_STATUS
from . import member
from . import protocol as p

def op_checkpoint(server, req: p.Checkpoint, fds, conn) -> dict:
    """The VM into the state file the caller opened (fds[0]); answers the metadata,
    which the caller writes beside it (sandbox/checkpoint.py: write_image)."""
    from ..sandbox import checkpoint
    if server.infra is not None or server.members:
        raise FailedPrecondition("a pod's VM holds other containers: it cannot be "
                                 "checkpointed for one of them")
    if len(fds) != 1:
        raise InvalidArgument("checkpoint needs the state file's descriptor")
    meta = checkpoint.save(server.sandbox, fds[0], req.leave_running)
    if not req.leave_running:
        server.update(exit_status=VM_DIED_STATUS, finished=now_rfc3339())
        server.finish(VM_DIED_STATUS)
    return {"meta": meta}


def restore(server, config) -> None:
    """Boot of a restoring shim (ShimServer.boot)."""
    from ..drivers import probe
    from ..sandbox import Sandbox, checkpoint
    params = server.params
    if member.find_infra(os.path.dirname(server.path), server.bundle.spec, server.cid):
        raise FailedPrecondition("a pod member cannot be restored into its pod's VM")
    meta = checkpoint.read(params.restore_from, config)
    check_bind_sources(server.bundle.spec)
    driver = probe(params.driver)
    from .namespaces import enter_namespaces
    network = enter_namespaces(server, late_network=True)
    server.sandbox = checkpoint.restore(Sandbox, server.cid, driver, meta, params.restore_from,
                                        config, server.path, network, server.bundle,
                                        server.init_io(), os.getpid())
    # Ids the guest has seen already: generated ones go on after them.
    numbered = [int(pid[5:]) for pid in meta["containers"][0]["process_ids"]
                if pid.startswith("exec-") and pid[5:].isdigit()]
    server.exec_count = max(numbered, default=0)
    server.took_sandbox(network)
    server.container = server.sandbox.container(server.cid)
    server.took_container()
    server.update(status=states.RUNNING, started=now_rfc3339())


def check_bind_sources(spec: dict) -> None:
    """The restored container's files are in its VM already, but its spec is the
    contract: a bind mount whose source is missing is refused, as runc's restore does."""
    for mnt in spec.get("mounts") or []:
        bind = mnt.get("type") == "bind" or any(o in ("bind", "rbind") for o in mnt.get("options") or [])
        if bind and not os.path.exists(mnt.get("source", "")):
            raise InvalidArgument(f"bind mount source {mnt.get('source')!r} (for "
                                  f"{mnt.get('destination')}) does not exist")
