"""Port forwarding into a VM (kubectl port-forward, CRI PortForward).

containerd's CRI plugin forwards a port by dialling localhost:PORT inside the pod's
network namespace on the host, where nothing of a VM listens (a runc pod's container
would). So a VM pod's namespace gets one rule, NAT OUTPUT: TCP to 127.0.0.1, any port,
is redirected to one listener of the sandbox's in that namespace. Each connection it
accepts (SO_ORIGINAL_DST says which port was dialled) goes to the guest's 127.0.0.1:PORT
through the agent (FORWARDPORT: a busybox nc the agent runs as nobody), so a server
that listens only on the pod's loopback is reached, as with runc.
"""
import logging
import socket
import struct
import threading
from typing import Callable

from .netns import inside, run

log = logging.getLogger("runv_py.net")

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h, level SOL_IP
RULE_COMMENT = "runv-py-port-forward"
ACCEPT_BACKLOG = 64


def _rule(port: int) -> list:
    return ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1/32", "-m", "comment", "--comment",
            RULE_COMMENT, "-j", "REDIRECT", "--to-ports", str(port)]


def _iptables(netns: str, *args: str) -> str:
    return run(netns, "iptables", "-w", "5", "-t", "nat", *args)


class LoopbackForwarder:
    """The redirect rule and its listener in ``netns``; ``connect(port, conn)`` takes
    each connection (and owns it from then on)."""

    def __init__(self, netns: str, connect: Callable[[int, socket.socket], None]):
        self.netns = netns
        self.connect = connect
        self.listener = None
        self.port = 0
        self.thread = None

    def start(self) -> None:
        def listen():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Its connections in TIME_WAIT then do not look like a listener (release).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(ACCEPT_BACKLOG)
            return sock
        self.listener = inside(self.netns, listen)  # a socket stays in its namespace
        self.port = self.listener.getsockname()[1]
        try:
            _iptables(self.netns, "-A", *_rule(self.port))
        except BaseException:
            self.listener.close()
            raise
        self.thread = threading.Thread(target=self._accept, name="port-forward", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: stop() ran
            try:
                raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                port = struct.unpack_from("!H", raw, 2)[0]
                self.connect(port, conn)
            except Exception as e:  # this connection fails; the next may not
                log.info("port forward in %s: %s", self.netns, e)
                conn.close()

    def stop(self) -> None:
        """Remove the rule and close the listener (connections already made go on)."""
        if self.listener is None:
            return
        try:
            _iptables(self.netns, "-D", *_rule(self.port))
        except Exception as e:  # the namespace may be gone already (CNI DEL)
            log.info("removing the port-forward rule from %s: %s", self.netns, e)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        self.listener = None
        if self.thread is not None:
            self.thread.join(5)


def release(netns: str) -> None:
    """Remove the rules a killed sandbox left in ``netns``: those whose listener is gone
    (another VM's, live, stays)."""
    try:
        rules = _iptables(netns, "-S", "OUTPUT")
    except Exception:
        return  # no such namespace any more, or no iptables: nothing of ours
    for line in rules.splitlines():
        words = line.split()
        if RULE_COMMENT not in words or words[:1] != ["-A"] or not words[-1].isdigit():
            continue
        try:
            if not inside(netns, lambda port=int(words[-1]): _listened_on(port)):
                _iptables(netns, "-D", *words[1:])
        except Exception as e:
            log.info("removing %s from %s: %s", line, netns, e)


def _listened_on(port: int) -> bool:
    """Whether 127.0.0.1:``port`` is taken (in this thread's network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Taken by a listener, not by the connections it leaves in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
