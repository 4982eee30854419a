"""Pod networking: the network namespace a caller made (CNI, podman, docker), carried
into the VM through taps and tc redirections (pod.py)."""
from typing import TYPE_CHECKING, Optional

from ..hyperstart.errors import InvalidArgument

if TYPE_CHECKING:
    from .pod import PodNetwork


def network_for(spec: dict) -> Optional["PodNetwork"]:
    """The pod network a sandbox's spec asks for: None for a network of the VM's own
    (a network namespace without a path); host networking is refused."""
    entry = network_namespace(spec)
    if entry is None:
        raise InvalidArgument("host networking is not supported: a VM has a network stack of "
                              "its own (give the container a network namespace)")
    path = entry.get("path")
    if not path:
        return None
    from .pod import PodNetwork
    return PodNetwork(path)


def release(netns: str, taps: list = ()) -> None:
    """What a killed sandbox left in its pod's namespace: its redirections (pod.release)
    and its port-forward rule (portforward.release)."""
    from . import portforward
    from .pod import release as release_pod
    release_pod(netns, taps)
    portforward.release(netns)


def network_namespace(spec: dict) -> Optional[dict]:
    """The spec's network namespace entry (None: the host's network)."""
    for n in (spec.get("linux") or {}).get("namespaces") or []:
        if n.get("type") == "network":
            return n
    return None


def netns_path(spec: dict) -> str:
    """The network namespace path in a spec ("" for none)."""
    return (network_namespace(spec) or {}).get("path") or ""
