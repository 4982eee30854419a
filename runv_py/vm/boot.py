"""BootConfig; BootedVM, a VM whose agent has answered, which every factory hands out;
and DirectFactory, which boots one for every request."""
import dataclasses
import os

from .. import paths
from ..drivers import DriverError
from ..hyperstart import messages as m
from ..hyperstart.errors import InvalidArgument, RunvError
from . import launcher
from .agent_client import AgentClient

BOOT_TIMEOUT = float(os.environ.get("RUNV_BOOT_TIMEOUT", "60"))


@dataclasses.dataclass
class BootConfig:
    cpus: int = 1
    memory_mib: int = 256
    kernel: str = paths.KERNEL
    initrd: str = paths.INITRD
    debug: bool = False
    extra_cmdline: tuple = ()
    max_cpus: int = 0            # room to grow (0: none): the VM has this many, offline
    max_memory_mib: int = 0      # likewise, memory the guest adds when told
    share: str = "9p"            # how the sandbox's share reaches the guest: 9p or virtiofs

    def __post_init__(self):
        if self.cpus < 1 or self.cpus > 16:
            raise InvalidArgument(f"cpus must be between 1 and 16, not {self.cpus}")
        if self.memory_mib < 64:
            raise InvalidArgument(f"memory must be at least 64 MiB, not {self.memory_mib}")
        if self.max_cpus > 16:
            raise InvalidArgument(f"a VM has at most 16 cpus, not {self.max_cpus}")
        if self.share not in ("9p", "virtiofs"):
            raise InvalidArgument(f"unknown share kind {self.share!r} (9p or virtiofs)")

    @property
    def grows(self) -> bool:
        return self.max_cpus > self.cpus or self.max_memory_mib > self.memory_mib


def cold_boot_reason(config: BootConfig, network=None) -> str:
    """Why a request must be cold-booted whatever a cache or template holds ("" if it
    need not): ready VMs and clones have no NIC for a pod's network, and their size is
    fixed."""
    if network is not None:
        return "it joins a pod's network"
    if config.grows:
        return "it may grow"
    return ""


class BootedVM:
    """A VM whose agent has said READY (or answered, for a clone)."""

    def __init__(self, vm, agent: AgentClient, share_dir: str, config: BootConfig,
                 origin: str = "direct"):
        self.vm = vm
        self.agent = agent
        self.share_dir = share_dir
        self.config = config
        self.origin = origin      # direct | template | cache | factory: how it was made
        self.mount_ns = 0         # a pid whose mount namespace holds the share (0: ours)
        self.cleanups = []        # run by release(), after stop() and the unmounts

    def stop(self) -> None:
        self.agent.close()
        self.vm.stop()

    def release(self) -> None:
        """Remove what the factory kept for this VM (a cache's directory); call after
        stop() once nothing is mounted below share_dir any more."""
        while self.cleanups:
            self.cleanups.pop()()


def connect_agent(vm, timeout: float, ping: bool = False) -> AgentClient:
    """Connect to the VM's channels and wait until the agent answers; on failure stop the
    VM and raise DriverError with the guest's console tail."""
    try:
        agent = AgentClient(*vm.channels())  # QEMU's sockets, or the namespace driver's pairs
        if ping:
            agent.call(m.Ping(), timeout)  # a clone's agent is already up
        else:
            agent.wait_ready(timeout, vm.alive)
        return agent
    except (RunvError, TimeoutError, OSError) as e:
        vm.stop()
        raise DriverError(f"the guest did not come up ({e}): {vm.failure()}") from None


class DirectFactory:
    """Boots a fresh VM for every request."""

    name = "direct"
    late_network = True   # its VMs can have a NIC for a network made after create

    def __init__(self, driver):
        self.driver = launcher.safe(driver)

    def close(self) -> None:
        pass

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        share = os.path.join(workdir, "share")
        os.makedirs(share, exist_ok=True)
        vm = self.driver.launch(config, os.path.join(workdir, "vm"), name, share, network=network)
        agent = connect_agent(vm, BOOT_TIMEOUT)
        return BootedVM(vm, agent, share, config)
