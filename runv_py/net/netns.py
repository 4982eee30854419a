"""Working inside a network namespace named by a path (/var/run/netns/cni-..., or a
/proc/PID/ns/net): iproute2's commands run there through nsenter, and a thread can step
in for the system calls that must be made there (opening a tap, rtnetlink requests: the
links, addresses and routes of a pod's start, where nsenter and `ip` cost about 12 ms a
step)."""
import json
import os
import subprocess
from typing import Callable

from ..hyperstart import syscalls as sc
from ..hyperstart.netlink import Netlink
from ..hyperstart.errors import Internal, InvalidArgument
from ..host.nsthread import in_namespace

COMMAND_TIMEOUT = 30


def same_namespace(path: str, other: str = "/proc/self/ns/net") -> bool:
    a, b = os.stat(path), os.stat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_pod_namespace(path: str) -> None:
    """A network namespace a pod may have: one that exists and is not the host's."""
    if not os.path.exists(path):
        raise InvalidArgument(f"network namespace {path} does not exist")
    if same_namespace(path):  # ours: the host's (the runtime runs in the host's)
        raise InvalidArgument(f"network namespace {path} is the host's: host networking is not "
                              "supported (a VM has a network stack of its own)")


def run(netns: str, *args: str, json_out: bool = False):
    """Run an iproute2 command (``ip``, ``tc``) in ``netns``; its JSON output if asked."""
    cmd = ["nsenter", f"--net={netns}", *args[:1], *(["-j"] if json_out else []), *args[1:]]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Internal(f"{' '.join(args)} in {netns}: {e}") from None
    if result.returncode != 0:
        raise Internal(f"{' '.join(args)} in {netns}: {result.stderr.strip()}")
    return json.loads(result.stdout or "[]") if json_out else result.stdout


def run_batch(netns: str, tool: str, commands: list) -> None:
    """Several commands of one iproute2 tool (``ip``, ``tc``) in ``netns`` in one process
    (``-batch``): each nsenter and exec costs several ms on a pod's start. It stops at
    the first that fails."""
    cmd = ["nsenter", f"--net={netns}", tool, "-batch", "-"]
    script = "".join(" ".join(c) + "\n" for c in commands)
    try:
        result = subprocess.run(cmd, input=script, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Internal(f"{tool} -batch in {netns}: {e}") from None
    if result.returncode != 0:
        said = result.stderr.strip().replace("\n", "; ")
        raise Internal(f"{tool} in {netns}: {said} (of: {script.strip()!r})")


def inside(netns: str, fn: Callable):
    """``fn()`` run by a thread that has entered ``netns``; its result or exception
    comes back."""
    return in_namespace(netns, sc.CLONE_NEWNET, fn, COMMAND_TIMEOUT)


def _netlink(netns: str, what: str, fn: Callable):
    """``fn(Netlink)`` on a netlink socket in ``netns``; a refusal is Internal."""
    def body():
        with Netlink() as nl:
            return fn(nl)
    try:
        return inside(netns, body)
    except OSError as e:
        raise Internal(f"{what} in {netns}: {e}") from None


def read_links(netns: str) -> tuple:
    """(links, IPv4 addresses, IPv4 routes) of ``netns`` (Netlink's forms)."""
    return _netlink(netns, "reading the network",
                    lambda nl: (nl.links(), nl.addresses(), nl.routes()))


def move_link(source: str, name: str, target: str) -> None:
    """Link ``name`` from network namespace ``source`` into ``target`` (both paths)."""
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _netlink(source, f"moving {name} to {target}",
                 lambda nl: nl.set_link(_index(name), netns_fd=fd))
    finally:
        os.close(fd)


def set_link(netns: str, name: str, new_name: str = "", mtu: int = 0, up: bool = None) -> None:
    """Rename link ``name`` (while it is down), then set its MTU and state."""
    def change(nl):
        index = _index(name)
        if new_name:
            nl.set_link(index, name=new_name)
        if mtu or up is not None:
            nl.set_link(index, mtu=mtu, up=up)
    _netlink(netns, f"setting link {name}", change)


def _index(name: str) -> int:
    import socket
    return socket.if_nametoindex(name)
