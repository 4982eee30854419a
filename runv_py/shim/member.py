"""Pods found by namespace paths: podman's pods and docker's ``container:X`` modes.

A container whose spec names a namespace (network, ipc, uts or pid) of a live runv-py
container's host pid (podman's members name ``/proc/<infra pid>/ns/*``; docker's
``--network container:X`` names X's) joins that container's VM, as a CRI pod's containers
join their sandbox's: the container is made there, sharing the guest's ipc, uts and pid
namespaces its spec gives paths for (the network is the VM's). Its own shim stays its
host pid (it carries the spec's namespaces, lives as long as the container and exits
with its status) but boots nothing: it relays every request to the shim of the VM's
owner, the pod's infra. The VM ends with the infra; its members then stop as if killed.
"""
import os
import threading
from typing import Optional

from ..hyperstart import states, syscalls
from ..hyperstart.errors import FailedPrecondition, InvalidArgument, RunvError, Unavailable
from ..oci import bundle as oci
from ..oci.linux import shared_namespaces
from ..oci.state import now_rfc3339
from ..sandbox import VM_DIED_STATUS, ProcessIO
from . import protocol as p
from .records import Record, connect_unix, list_ids, read

NS_FILES = {"network": "net", "ipc": "ipc", "uts": "uts", "pid": "pid"}
LIVE = (states.CREATED, states.RUNNING, states.PAUSED)
JOIN_TIMEOUT = 120.0   # the member's container made in the VM (its hooks included)


def find_infra(root: str, spec: dict, cid: str) -> Optional[Record]:
    """The live container of ``root`` whose VM a container with ``spec`` joins, if any."""
    wanted = []
    for entry in (spec.get("linux") or {}).get("namespaces") or []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind in NS_FILES and entry.get("path"):
            try:
                st = os.stat(entry["path"])
            except OSError:
                continue  # specns reports a path that does not exist
            wanted.append((NS_FILES[kind], (st.st_dev, st.st_ino)))
    if not wanted:
        return None
    for other in list_ids(root):
        if other == cid:
            continue
        record = read(root, other)
        if record.status not in LIVE or record.pid <= 0:
            continue
        for ns, key in wanted:
            try:
                st = os.stat(f"/proc/{record.pid}/ns/{ns}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == key:
                return read(root, record.sandbox) if record.sandbox else record
    return None


def join(server, infra: Record) -> None:
    """Boot a member (``server`` is its ShimServer): its container in ``infra``'s VM."""
    from ..host import specns
    from .client import ShimClient
    bundle = server.bundle
    specns.enter(bundle.spec, bundle.hostname)  # our pid carries the pod's namespaces
    tree = syscalls.clone_tree(bundle.rootfs, True)  # mounted here, maybe not there
    io = None
    try:
        io = server.init_io()
        fds = [io.stdin, io.stdout, io.stderr if io.stderr >= 0 else io.stdout, tree]
        ShimClient(infra, timeout=JOIN_TIMEOUT).call(
            p.Join(container=server.cid, bundle=bundle.path, pid=os.getpid()), fds)
    finally:
        os.close(tree)
        if io is not None and io.owned:  # a pty's: the infra's shim has its copies
            for fd in {io.stdin, io.stdout, io.stderr} - {-1}:
                os.close(fd)
    server.infra = infra
    server.update(sandbox=infra.id, qemu_pid=infra.qemu_pid, status=states.CREATED)
    threading.Thread(target=_watch, args=(server, infra), name="member-exit",
                     daemon=True).start()


def _watch(server, infra: Record) -> None:
    """The member's container exits (or the VM goes): so does its shim, with its status."""
    from .client import ShimClient
    status, sig = VM_DIED_STATUS, 0
    try:
        reply = ShimClient(infra, timeout=None).call(p.Wait(container=server.cid))
        status, sig = reply["exit"], reply.get("signal") or 0
    except (RunvError, OSError, KeyError):
        pass  # the infra's shim, and the VM, are gone
    server.update(status=states.STOPPED, exit_status=status, finished=now_rfc3339())
    server.finish(status, sig)


def relay(server, req: p.Request, fds: list, conn) -> Optional[dict]:
    """A member's request, served by the infra's shim."""
    from .client import ShimClient
    if req.OP in ("pause", "resume"):
        raise FailedPrecondition(f"container {server.cid} shares its pod's VM: pause or resume "
                                 f"the pod (its infra, {server.infra.id}), not one member")
    if req.OP == "shutdown":
        server.finish(VM_DIED_STATUS)
        return {}
    req.container = server.cid
    if req.OP not in ("exec", "wait"):
        try:
            reply = ShimClient(server.infra).call(req, fds)
        except Unavailable:  # the infra's shim is gone, and the VM with our container
            server.finish(VM_DIED_STATUS)
            if req.OP == "kill":
                return {}  # what the signal was for has happened
            raise
        if req.OP == "start":
            server.update(status=states.RUNNING, started=now_rfc3339())
        return reply
    # Two answers, the second when the process exits: passed on as they come.
    with connect_unix(server.infra.socket) as sock:
        sock.settimeout(None)
        p.send(sock, p.encode(req), fds)
        while True:
            data = sock.recv(65536)
            if not data:
                return None
            conn.sendall(data)


def kill(server, sig: int) -> None:
    """A signal sent to a member's host pid: to its container."""
    from .client import ShimClient
    if server.record.status == states.RUNNING:
        ShimClient(server.infra).call(p.Kill(container=server.cid, signal=sig))


def leave(record: Record) -> None:
    """Remove a member's container from its pod's VM (delete; its shim may be dead)."""
    from .client import ShimClient
    try:
        infra = read(os.path.dirname(record.path), record.sandbox)
        ShimClient(infra, timeout=30).call(p.Leave(container=record.id))
    except RunvError:
        pass  # the pod's VM is gone, and the member's container with it


# ---- the infra's side -----------------------------------------------------------------

def op_join(server, req: p.Join, fds: list, conn) -> dict:
    if server.infra is not None or server.sandbox is None:
        raise FailedPrecondition(f"container {server.cid} has no VM of its own to join")
    if len(fds) != 4:
        raise InvalidArgument("join needs the member's stdin, stdout, stderr and rootfs")
    bundle = oci.load(req.bundle)
    io = ProcessIO(*(os.dup(fd) for fd in fds[:3]))
    shared = {kind: server.cid for kind in shared_namespaces(bundle.spec)}
    server.sandbox.create_container(req.container, bundle, io, host_pid=req.pid,
                                    shared=shared, rootfs_tree=fds[3])
    with server.lock:
        server.members.add(req.container)
    return {}


def op_leave(server, req: p.Leave, fds: list, conn) -> dict:
    from ..hyperstart.errors import NotFound
    try:
        server.sandbox.remove_container(req.container)
    except NotFound:
        pass
    with server.lock:
        server.members.discard(req.container)
    return {}
