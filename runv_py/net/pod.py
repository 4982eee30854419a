"""A pod's network, from the network namespace the caller made (CNI for CRI and podman,
docker's libnetwork, or any path in config.json), carried into the VM as runV and Kata
do ("tcfilter"):

- read the namespace's interfaces (name, MAC, MTU, IPv4 addresses) and routes;
- for each interface create a tap in that namespace (TUNSETIFF, VNET_HDR|NO_PI) with the
  same MTU, and redirect everything between the veth and the tap, both ways, with an
  ingress qdisc and a u32 match-all filter whose action is mirred egress redirect;
- give QEMU the tap's fd as a virtio-net device with the veth's MAC; the agent gives
  the guest NIC the veth's name, addresses and MTU, then the routes (link routes first).

The veth keeps its address: the guest answers for it. The taps close with QEMU; detach()
removes the qdiscs (and with them the filters).
"""
import dataclasses
import fcntl
import logging
import os
import struct
from typing import List

from ..hyperstart import messages as m
from ..hyperstart.errors import FailedPrecondition
from .netns import (check_pod_namespace, inside, move_link, read_links, run, run_batch,
                    set_link)

log = logging.getLogger("runv_py.net")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_PREFIX = "tap0_"


@dataclasses.dataclass
class Interface:
    name: str
    mac: str
    mtu: int
    addresses: List[tuple]       # (address, prefix length)
    tap: str = ""
    fd: int = -1
    guest_mac: str = ""          # the guest NIC's MAC before it takes ``mac`` (pooled VMs)


@dataclasses.dataclass
class Nic:
    """What QEMU gets for one interface: the tap's fd and the MAC to give the guest."""
    fd: int
    mac: str


class PodNetwork:
    """A pod's namespace; what is in it is read when a VM attaches to it (a driver that
    only joins the namespace needs none of it)."""

    def __init__(self, netns: str):
        check_pod_namespace(netns)
        self.netns = netns
        self.interfaces: List[Interface] = []
        self.routes: List[m.Route] = []
        self.attached: List[Interface] = []

    def discover(self) -> None:
        """Read the namespace's ethernet interfaces and their routes."""
        links, addresses, routes = read_links(self.netns)
        interfaces, names = [], {}
        for link in links:
            name = link["name"]
            if not link["ethernet"] or name.startswith(TAP_PREFIX):
                continue
            addrs = [(a, p) for index, a, p in addresses if index == link["index"]]
            interfaces.append(Interface(name, link["mac"], link["mtu"], addrs))
            names[link["index"]] = name
        # The guest makes the subnet routes itself, from the addresses (not the kernel's).
        self.routes = [m.Route(dest=r["dest"], gateway=r["gateway"], device=names[r["oif"]])
                       for r in routes if r["oif"] in names]
        self.interfaces = interfaces

    def nics_wanted(self) -> int:
        """How many NICs a VM for this network has: one per interface."""
        self.discover()
        return len(self.interfaces)

    def _check_free(self) -> None:
        for iface in self.interfaces:
            qdiscs = run(self.netns, "tc", "qdisc", "show", "dev", iface.name, "ingress")
            if "ingress" in qdiscs:
                raise FailedPrecondition(
                    f"{iface.name} in network namespace {self.netns} is already redirected "
                    "(a VM that is not one of this root's containers has it: a container "
                    "joins the VM of a container of its root whose namespaces it names)")

    def _redirect(self, iface: Interface, renamed_from: str = "") -> None:
        """The tap up with the veth's MTU (named iface.tap first if it was
        ``renamed_from``), and everything redirected both ways."""
        set_link(self.netns, renamed_from or iface.tap, new_name=iface.tap if renamed_from else "",
                 mtu=iface.mtu, up=True)
        tc = []
        for src, dst in ((iface.name, iface.tap), (iface.tap, iface.name)):
            tc += [["qdisc", "add", "dev", src, "ingress"],
                   ["filter", "add", "dev", src, "parent", "ffff:", "protocol", "all", "u32",
                    "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dst]]
        run_batch(self.netns, "tc", tc)

    def attach(self) -> List[Nic]:
        """Read the namespace, create the taps and the redirections; returns QEMU's NICs."""
        self.discover()
        self._check_free()
        nics = []
        try:
            for iface in self.interfaces:
                iface.tap = (TAP_PREFIX + iface.name)[:15]
                iface.fd = inside(self.netns, lambda name=iface.tap: open_tap(name))
                self.attached.append(iface)
                self._redirect(iface)
                nics.append(Nic(iface.fd, iface.mac))
        except BaseException:
            self.detach()
            raise
        return nics

    def adopt_tap(self, tap: str, guest_mac: str) -> None:
        """Give the pod a running VM's NIC (the node factory's): its tap moves from the
        factory's holding namespace into the pod's (QEMU's fd stays valid) and is
        redirected like a new one; the guest takes the veth's MAC (guest_setup)."""
        from ..factory.vms import holding_netns
        if len(self.interfaces) != 1:
            raise FailedPrecondition("a pooled VM serves a namespace with one interface")
        self._check_free()
        iface = self.interfaces[0]
        move_link(holding_netns(), tap, self.netns)
        iface.tap, iface.guest_mac = (TAP_PREFIX + iface.name)[:15], guest_mac
        try:
            self.attached.append(iface)
            self._redirect(iface, renamed_from=tap)
        except BaseException:
            self.detach()
            raise

    def guest_setup(self) -> list:
        """The agent's messages that make the guest's network this one."""
        msgs = [m.SetupInterface(device=i.guest_mac or i.mac, new_device_name=i.name, mtu=i.mtu,
                                 mac=i.mac if i.guest_mac else "",
                                 ip_addresses=[m.IpAddress(ip_address=a, net_mask=str(p))
                                               for a, p in i.addresses])
                for i in self.interfaces]
        return msgs + [m.SetupRoute(routes=self.routes)]

    def detach(self) -> None:
        """Undo attach (safe to call twice): the veths' qdiscs go; the taps go with their
        last fd (QEMU's and ours)."""
        while self.attached:
            iface = self.attached.pop()
            try:
                run(self.netns, "tc", "qdisc", "del", "dev", iface.name, "ingress")
            except Exception as e:  # the namespace may be gone already (CNI DEL)
                log.info("removing the redirection from %s: %s", iface.name, e)
            if iface.fd >= 0:
                os.close(iface.fd)
                iface.fd = -1

    def close_fds(self) -> None:
        """QEMU holds the taps now: our copies can go."""
        for iface in self.attached:
            if iface.fd >= 0:
                os.close(iface.fd)
                iface.fd = -1


def release(netns: str, taps: list = ()) -> None:
    """Remove the redirections a sandbox that is gone left in ``netns`` (its shim was
    killed before detach ran): the ingress qdiscs whose filter redirects to one of its
    ``taps`` or to a device that no longer exists (``*``: a tap closed with its QEMU),
    then those taps if they are still there (a QEMU that has not quite ended holds
    them). A redirection to any other live tap is another VM's and stays."""
    if not os.path.exists(netns):
        return  # removed with the pod (CNI DEL): nothing is left
    try:
        links = run(netns, "ip", "link", "show", json_out=True)
    except Exception as e:
        log.info("listing %s: %s", netns, e)
        return
    ours = {"*", *taps}
    for link in links:
        name = link.get("ifname", "")
        if name.startswith(TAP_PREFIX) or name == "lo":
            continue
        try:
            filters = run(netns, "tc", "filter", "show", "dev", name, "ingress", json_out=True)
        except Exception:
            continue  # no ingress qdisc
        targets = {a.get("to_dev", "") for f in filters
                   for a in (f.get("options") or {}).get("actions", []) if a.get("kind") == "mirred"}
        if targets & ours:
            _quietly(netns, "tc", "qdisc", "del", "dev", name, "ingress")
    present = {link.get("ifname", "") for link in links}
    for tap in taps:
        if tap in present:
            _quietly(netns, "ip", "link", "del", "dev", tap)


def _quietly(netns: str, *argv: str) -> None:
    try:
        run(netns, *argv)
    except Exception as e:  # gone meanwhile, or the namespace with it
        log.info("%s in %s: %s", " ".join(argv), netns, e)


def open_tap(name: str) -> int:
    """A tap device ``name`` in this thread's network namespace, as a file descriptor
    (it exists as long as the fd, or a copy of it, is open)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd
