"""The shims' side of the node factory: a factory (``get_vm``/``close``, as vm/factory.py's)
whose VMs come from the node's factory process, or from a cold boot when it has none.

``NodeFactory.connect`` comes before the shim joins a container's host cgroup, so that a
factory it starts is not in it. The VM's share lives in the factory's mount namespace,
where QEMU runs: the sandbox makes its binds there (BootedVM.mount_ns).
"""
import base64
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Optional

from ..drivers import DriverError
from ..hyperstart import messages as m
from ..hyperstart.errors import RunvError
from ..vm.boot import BOOT_TIMEOUT, BootConfig, BootedVM, DirectFactory
from . import FACTORY_DIR, LOG, SOCKET, path, settings, wire

log = logging.getLogger("runv_py.factory")

CONNECT_TIMEOUT = 2.0


def _connect() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path(SOCKET))
    except OSError:
        sock.close()
        raise
    return sock


def for_shim(driver, config: BootConfig, policy=None, template_dir: str = ""):
    """The factory a shim gets its VM from: its own policy's or template's if it was
    given one, else the node's factory, else a cold boot. Call it before the shim joins
    a container's cgroup (a factory it starts must not be there) and before any thread."""
    from ..host import ksm
    ksm.apply()  # the VMs it boots, and the factory it may start, inherit it
    if policy or template_dir:
        from ..vm.factory import OneShotFactory
        return OneShotFactory(driver, policy, template_dir)
    return NodeFactory.connect(driver, config) or DirectFactory(driver)


def request(message: dict, timeout: float = 10.0) -> tuple:
    """One request to the factory: (reply, fds). Raises OSError if it is not there."""
    with _connect() as sock:
        sock.settimeout(timeout)
        wire.send(sock, message)
        return wire.recv(sock)


def warm(config: BootConfig, nics: int = 0) -> None:
    """Ask the factory to keep VMs of this shape ready (raises OSError if it is not there)."""
    reply, _ = request({"op": "warm", "config": dataclasses.asdict(config), "nics": nics})
    if not reply.get("ok"):
        raise OSError(reply.get("reason", "the factory refused"))


def start_daemon(config: BootConfig, pool: int) -> None:
    """Start the factory in the background (it exits at once if one runs already)."""
    os.makedirs(FACTORY_DIR, mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "runv_py.factory", "--kernel", config.kernel,
           "--initrd", config.initrd, "--pool", str(pool), "--share", config.share,
           "--cpus", str(config.cpus), "--memory", str(config.memory_mib),
           "--max-cpus", str(config.max_cpus), "--max-memory", str(config.max_memory_mib)]
    with open(path(LOG), "ab") as out:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True, cwd="/")


class NodeFactory:
    name = "node"
    late_network = True   # its pooled VMs can have a NIC for a network made after create

    def __init__(self, driver):
        self.driver = driver
        self.fallback = DirectFactory(driver)

    @classmethod
    def connect(cls, driver, config: BootConfig) -> Optional["NodeFactory"]:
        """The node factory if it is on and running; None otherwise (starting it, for
        the next sandbox, if it is on but not running). ``config`` is the shape it is
        told to keep warm when it starts."""
        if not getattr(driver, "supports_templates", False):
            return None  # a VM driver's, not the namespace driver's
        wanted = settings()
        if not wanted["enabled"]:
            return None
        try:
            with _connect():
                pass
        except OSError as e:
            log.info("no VM factory on this node (%s): booting cold, and starting one", e)
            try:
                start_daemon(config, wanted["pool"])
            except OSError as e:
                log.warning("cannot start the VM factory: %s", e)
            return None
        return cls(driver)

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        nics = 0
        if network is not None:
            nics = network.nics_wanted()
            if nics != 1:
                log.info("cold boot for %s: its network has %d interfaces (pooled VMs have "
                         "one NIC)", name, nics)
                return self.fallback.get_vm(config, workdir, name, network)
        try:
            reply, fds = request({"op": "get", "config": dataclasses.asdict(config),
                                  "nics": nics, "name": name})
        except (OSError, EOFError, RunvError) as e:
            log.info("cold boot for %s: the VM factory did not answer (%s)", name, e)
            return self.fallback.get_vm(config, workdir, name, network)
        if not reply.get("ok") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            log.info("cold boot for %s: %s", name, reply.get("reason", "the factory said no"))
            return self.fallback.get_vm(config, workdir, name, network)
        return self._adopt(reply["vm"], fds, name, network)

    def _adopt(self, info: dict, fds: list, name: str, network) -> BootedVM:
        from ..drivers.qemu_vm import QemuVM
        from ..host.cgroups import join_own_cgroups
        from ..vm.agent_client import AgentClient
        control = socket.socket(fileno=fds[0])
        stream = socket.socket(fileno=fds[1])
        vm = agent = None
        try:
            vm = QemuVM.adopt(self.driver, info["qemu_pid"], info["workdir"], info["share_kind"],
                              info.get("share_server_pid", 0))
            # The VM is this sandbox's: its cgroups (a container's cgroupsPath) hold it.
            for pid in (info["qemu_pid"], info.get("share_server_pid", 0)):
                if pid:
                    join_own_cgroups(pid)
            if network is not None:
                network.adopt_tap(info["nic"]["tap"], info["nic"]["mac"])
            if info.get("paused"):  # a template's clone, stopped since it was loaded
                vm.resume()
            agent = AgentClient(control, stream)
            # A pooled VM is not a twin of its siblings: fresh entropy, its own hostname.
            agent.call(m.Reseed(data=base64.b64encode(os.urandom(64)).decode(),
                                hostname=name[:63], time_ns=time.time_ns()),
                       timeout=BOOT_TIMEOUT)
        except (RunvError, OSError, KeyError, TypeError) as e:
            if agent is not None:
                agent.close()
            else:
                control.close()
                stream.close()
            if vm is not None:
                vm.stop()  # the factory sees QEMU go and removes the rest
            raise DriverError(f"the VM from the factory ({info.get('name')}) failed: {e}") from None
        log.info("%s runs in VM %s from the factory (%s, qemu pid %d)", name, info["name"],
                 info.get("origin"), info["qemu_pid"])
        booted = BootedVM(vm, agent, info["share_dir"], BootConfig(**info["config"]),
                          origin="factory")
        # The share's binds go where its server sees them: the proxy helper or virtiofsd
        # (jailed), else QEMU (both in the factory's mount namespace).
        booted.mount_ns = info.get("share_server_pid") or info["qemu_pid"]
        return booted

    def close(self) -> None:
        pass
