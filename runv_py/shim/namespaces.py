"""Where a shim puts itself before its VM is made: the container's host cgroup, a
private mount namespace, and the namespaces its spec names (our pid is the container's)."""
import os

from ..sandbox import private_mount_namespace


def enter_namespaces(server, late_network: bool):
    """Our cgroup, mount and spec namespaces (our pid is the container's); returns
    the network the VM is to have."""
    from ..host import specns
    from ..net import network_for
    join_host_cgroup(server)
    private_mount_namespace()
    network = network_for(server.bundle.spec)
    if network is not None:
        server.update(netns=network.netns)  # recorded first: delete releases it
    specns.enter(server.bundle.spec, server.bundle.hostname)
    if network is None and late_network and server.params.driver != "namespace":
        from ..net.late import LateNetwork  # runc's: configured between create and start
        network = LateNetwork(f"/proc/{os.getpid()}/ns/net")
    return network


def join_host_cgroup(server) -> None:
    """linux.cgroupsPath on the host: this shim, and so its QEMU, lives there."""
    if not server.bundle.cgroups_path:
        return
    from ..host.cgroups import HostCgroup
    cgroup = HostCgroup.for_path(server.bundle.cgroups_path)
    server.update(host_cgroups=cgroup.dirs)  # recorded first: delete removes them
    cgroup.enter(server.bundle.resources, server.params.config["memory_mib"])
    server.host_cgroup = cgroup
