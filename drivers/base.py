"""What a driver and the VMs it launches provide, as typing Protocols.

A driver turns a boot configuration into a running VM whose agent the runtime reaches
over two channels (control and stream). Drivers that can save a booted VM and start
clones of it (``supports_templates``) implement the template capability: launch with
the guest RAM in a file, ``save_state`` a stopped VM, launch ``incoming`` and
``load_state`` into a clone. Everything above the drivers sees only these methods.
"""
from typing import Optional, Protocol, Tuple


class VM(Protocol):
    pid: int
    share_tag: str             # the tag of the sandbox's share ("": nothing to mount)
    share_kind: str            # how the guest mounts it: "9p" or "virtiofs"
    network_in_guest: bool     # a pod's network must be set up by the agent

    def channels(self) -> Tuple:
        """Connected sockets to the agent's control and stream channels."""

    def alive(self) -> bool: ...

    def failure(self) -> str:
        """What went wrong, for an error message (exit status, console tail)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self, timeout: float = 3.0) -> None:
        """End the VM; safe to call twice."""

    # The template capability (drivers with supports_templates only).
    def save_state(self, path: str) -> None:
        """Stop the VM and write its device state to ``path`` (RAM stays in its file)."""

    def load_state(self, path: str) -> None:
        """Load the device state at ``path`` into an incoming VM and run it."""


class Network(Protocol):
    """A pod's network for a VM (runv_py/net/pod.py): the namespace it lives in, and the
    taps that carry it into a VM."""
    netns: str

    def attach(self) -> list:
        """Create the taps; returns NICs with ``fd`` and ``mac``."""

    def close_fds(self) -> None:
        """The VM holds the taps now."""


class Driver(Protocol):
    name: str
    supports_templates: bool

    def describe(self) -> dict: ...

    def launch(self, config, workdir: str, name: str, share_dir: str,
               memory_file: Optional[str] = None, shared_memory: bool = False,
               incoming: bool = False, network: Optional[Network] = None) -> VM:
        """Start a VM for ``config`` (a BootConfig) with its files in ``workdir``; returns
        at once, the guest boots on. ``memory_file`` backs the guest RAM with a file
        (``shared_memory``: a template's, written through; else a private copy-on-write
        map for a clone); ``incoming`` waits for load_state instead of booting;
        ``network`` is the pod's network the VM joins."""
