"""A network made after create, as runc allows: a container whose spec asks for a new
network namespace gets one (the shim's, host/specns.py: /proc/<pid>/ns/net of the pid
runv-py reports), and the caller may put interfaces into it between `create` and
`start` (docker's libnetwork hook, buildah and other CNI users do).

A VM's NICs exist from its boot (microvm has no hotplug), so the VM gets one whose tap
waits, unconnected, in that namespace. At `start` the namespace is read: an interface
found there is redirected to the tap and the guest takes its name, MAC, addresses and
routes, as a pod's network at boot (pod.py). A namespace left empty leaves the guest
with only its loopback, as runc's container would have.
"""
import logging
import os

from ..hyperstart.errors import FailedPrecondition
from .netns import inside, move_link, set_link
from .pod import TAP_PREFIX, Nic, PodNetwork, open_tap

log = logging.getLogger("runv_py.net")

LATE_TAP = TAP_PREFIX + "late"


class LateNetwork(PodNetwork):
    """The shim's own network namespace, connected to the VM at start."""

    def __init__(self, netns: str):
        # Not check_pod_namespace: this is our own namespace, made for the container.
        self.netns = netns
        self.interfaces, self.routes, self.attached = [], [], []
        self.tap = LATE_TAP
        self.fd = -1
        self.mac = "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))  # local, unicast

    def nics_wanted(self) -> int:
        return 1

    def attach(self) -> list:
        """The waiting tap, for QEMU (down, connected to nothing)."""
        self.fd = inside(self.netns, lambda: open_tap(self.tap))
        return [Nic(self.fd, self.mac)]

    def adopt_tap(self, tap: str, guest_mac: str) -> None:
        """A pooled VM's NIC (the node factory's): its tap moves here and waits."""
        from ..factory.vms import holding_netns
        move_link(holding_netns(), tap, self.netns)
        set_link(self.netns, tap, new_name=self.tap)
        self.mac = guest_mac

    def guest_setup(self) -> list:
        return []  # nothing to configure before start

    def connect(self) -> list:
        """At start: redirect the interface the caller put here to the tap; returns the
        agent's messages that make it the guest's ([] if there is none)."""
        self.discover()
        if not self.interfaces:
            return []
        if len(self.interfaces) != 1:
            raise FailedPrecondition(
                f"the container's network namespace has {len(self.interfaces)} interfaces "
                "after create; a VM made before they came has one NIC for them")
        iface = self.interfaces[0]
        iface.tap, iface.guest_mac = (TAP_PREFIX + iface.name)[:15], self.mac
        renamed_from, self.tap = self.tap, iface.tap
        self.attached.append(iface)
        try:
            self._redirect(iface, renamed_from=renamed_from)
        except BaseException:
            self.detach()
            raise
        log.info("the network made after create: %s (%s) into the VM", iface.name,
                 ", ".join(f"{a}/{p}" for a, p in iface.addresses) or "no address")
        return PodNetwork.guest_setup(self)

    def close_fds(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def connect_to_guest(sandbox) -> None:
    """Before a container starts: the network its caller made after create, if any,
    reaches ``sandbox``'s guest."""
    network = sandbox.network
    if isinstance(network, LateNetwork) and sandbox.vm.network_in_guest:
        for msg in network.connect():
            sandbox.agent.call(msg)
