"""A sandbox's forwarded ports (net/portforward.py): each connection accepted in the
pod's network namespace becomes a stream to the guest's 127.0.0.1:PORT, carried like a
process of the pod's first running container but unknown to its users (no exit event
reaches the sandbox's listeners, it is in no process list)."""
import itertools
import logging
import socket
import threading
from typing import Optional

from ..hyperstart import messages as m
from ..hyperstart import states
from ..hyperstart.errors import FailedPrecondition
from .container import Process, ProcessIO

log = logging.getLogger("runv_py.sandbox")

_ids = itertools.count(1)


def serve(sandbox) -> Optional[object]:
    """Start forwarding for ``sandbox`` if its VM has a pod network of its own; the
    forwarder (stop() it), or None."""
    from ..net.late import LateNetwork
    from ..net.portforward import LoopbackForwarder
    network = sandbox.network
    if network is None or isinstance(network, LateNetwork) or not sandbox.vm.network_in_guest:
        return None
    forwarder = LoopbackForwarder(network.netns, lambda port, conn: connect(sandbox, port, conn))
    try:
        forwarder.start()
    except Exception as e:  # the pod runs; only port-forward will not
        log.warning("sandbox %s: no port forwarding: %s", sandbox.id, e)
        return None
    return forwarder


def connect(sandbox, port: int, conn: socket.socket) -> None:
    """Join ``conn`` to the guest's 127.0.0.1:``port`` (``conn`` is ours from now on)."""
    agent = sandbox.agent
    with sandbox.lock:
        container = next((c for c in sandbox.containers.values()
                          if c.state.is_(states.RUNNING)), None)
        if container is None:
            raise FailedPrecondition(f"sandbox {sandbox.id} has no running container")
        seq = agent.new_seq()
        agent.attach(seq, ConnectionSink(conn))
        proc = Process(container, m.ProcessSpec(id=f"port-forward-{next(_ids)}", args=[],
                                                stdio=seq), ProcessIO())
        proc.on_end = lambda: _shut(conn, socket.SHUT_RDWR)
        container.processes[proc.id] = proc
    try:
        proc.pid = agent.call(m.ForwardPort(container=container.id, id=proc.id, port=port,
                                            stdio=seq)).pid
    except BaseException:
        with sandbox.lock:
            container.processes.pop(proc.id, None)
        raise
    proc.state.to(states.RUNNING, "start")
    threading.Thread(target=_pump, args=(agent, seq, conn), name=f"forward-{seq}",
                     daemon=True).start()


class ConnectionSink:
    """The guest's bytes to the connection; its end of stream half-closes it."""

    def __init__(self, conn: socket.socket):
        self.conn = conn

    def __call__(self, data: bytes) -> None:
        if data:
            self.conn.sendall(data)
        else:
            _shut(self.conn, socket.SHUT_WR)


def _pump(agent, seq: int, conn: socket.socket) -> None:
    """The connection's bytes to the guest until it ends (or the guest side has, which
    shuts it down); then the connection closes."""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            agent.write_stdin(seq, data)
        agent.close_stdin(seq)
    except OSError:
        pass
    conn.close()


def _shut(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:
        pass
