"""BootConfig and the factories that turn it into a running VM with its agent ready."""
import dataclasses
import logging
import os

from .agent_client import AgentClient, AgentGone
from .drivers import DriverError
from .drivers import qemu as qemu_driver
from .hyperstart import protocol

log = logging.getLogger("runv_py.factory")

DEFAULT_KERNEL = "/var/lib/runv-py/kernel"
DEFAULT_INITRD = "/var/lib/runv-py/initrd.img"
BOOT_TIMEOUT = float(os.environ.get("RUNV_BOOT_TIMEOUT", "60"))


@dataclasses.dataclass
class BootConfig:
    cpus: int = 1
    memory_mib: int = 256
    kernel: str = DEFAULT_KERNEL
    initrd: str = DEFAULT_INITRD
    debug: bool = False
    extra_cmdline: tuple = ()
    template_dir: str = ""

    def __post_init__(self):
        if self.cpus < 1 or self.cpus > 16:
            raise ValueError(f"cpus must be between 1 and 16, not {self.cpus}")
        if self.memory_mib < 64:
            raise ValueError(f"memory must be at least 64 MiB, not {self.memory_mib}")


class BootedVM:
    """A VM whose agent has said READY: what every factory hands out."""

    def __init__(self, vm, agent: AgentClient, share_dir: str, config: BootConfig):
        self.vm = vm
        self.agent = agent
        self.share_dir = share_dir
        self.config = config

    def stop(self) -> None:
        self.agent.close()
        self.vm.stop()


def connect_agent(vm, timeout: float, ping: bool = False) -> AgentClient:
    """Connect to the VM's channels and wait until the agent answers; on failure stop the
    VM and raise DriverError with the guest's console tail."""
    try:
        agent = AgentClient(*vm.channels())  # QEMU's sockets, or the namespace driver's pairs
        if ping:
            agent.request(protocol.PING, None, timeout)  # a clone's agent is already up
        else:
            agent.wait_ready(timeout, vm.alive)
        return agent
    except (AgentGone, TimeoutError, DriverError, OSError) as e:
        vm.stop()
        raise DriverError(f"the guest did not come up ({e}): {vm.failure()}") from None


class DirectFactory:
    """Boots a fresh VM for every request."""

    name = "direct"

    def __init__(self, driver):
        self.driver = driver

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        share = os.path.join(workdir, "share")
        os.makedirs(share, exist_ok=True)
        vm = self.driver.launch(config, os.path.join(workdir, "vm"), name, share)
        agent = connect_agent(vm, BOOT_TIMEOUT)
        return BootedVM(vm, agent, share, config)
