"""The namespace driver: the hyperstart agent on the host instead of in a VM.

The "VM" is the agent started as a host child process (``runv_py.hyperstart.hostagent``)
in new mount, UTS, IPC, network and pid namespaces, where it is PID 1 as in the guest.
Its two channels are socketpairs instead of virtio-serial ports, and the sandbox's share
directory is the host directory itself: it is bind-mounted onto itself as a shared mount
before the agent starts, so the rootfs bind mounts the runtime makes there later
propagate into the agent's (slave) mount namespace, as 9p would show them to a guest.

Limits use the host's cgroup v1 memory, pids, cpu and freezer controllers (this host's
kernel keeps them on v1 hierarchies, so a private cgroup2 mount would have no memory
controller): one directory per sandbox under this process's own cgroup, capped like the
VM (``memory_mib``, ``cpus``), with one child per container made by the agent.
Stopping kills the agent, which as PID 1 takes every container process with it, then
removes the cgroups and the share mount.
"""
import logging
import os
import signal
import socket
import subprocess
import sys

from ..hyperstart import syscalls as sc
from ..hyperstart.cgroups import remove_tree, v1_cgroup_dirs
from . import DriverError, terminate

log = logging.getLogger("runv_py.drivers.namespace")

AGENT_LOG = "agent.log"
CGROUP_PARENT = "runv-py"


class NamespaceDriver:
    name = "namespace"
    supports_templates = False

    def describe(self) -> dict:
        return {"driver": self.name, "hypervisor": "none (host kernel)",
                "isolation": "mount, UTS, IPC, network and pid namespaces; cgroup v1 "
                             "memory, pids, cpu, freezer"}

    def launch(self, config, workdir: str, name: str, share_dir: str, network=None,
               **_template) -> "NamespaceVM":
        """Start the agent for ``config``; returns at once (the agent says READY). With a
        pod ``network`` the agent joins its namespace instead of making one."""
        os.makedirs(workdir, exist_ok=True)
        share_dir = os.path.abspath(share_dir)
        os.makedirs(share_dir, exist_ok=True)
        vm = NamespaceVM(name, workdir, share_dir)
        try:
            vm.start(config, network.netns if network is not None else "")
        except BaseException:
            vm.stop()
            raise
        return vm


class NamespaceVM:
    """The agent process tree standing in for a VM, and what it holds on the host."""

    share_tag = ""            # the share is the host directory itself
    share_kind = ""           # (nothing to mount)
    network_in_guest = False  # the agent joined the pod's network namespace itself

    def __init__(self, name: str, workdir: str, share_dir: str):
        self.name = name
        self.workdir = workdir
        self.share_dir = share_dir
        self.process = None
        self.pid = 0
        self.cgroups = {}         # controller -> the sandbox's directory
        self.share_mounted = False
        self._channels = None

    def start(self, config, netns: str = "") -> None:
        self.cgroups = self.cgroup_paths()
        # A shared mount: later rootfs binds under it reach the agent's namespace.
        sc.mount(self.share_dir, self.share_dir, None, sc.MS_BIND)
        self.share_mounted = True
        sc.mount(None, self.share_dir, None, sc.MS_SHARED)
        ctl, ctl_agent = socket.socketpair()
        stream, stream_agent = socket.socketpair()
        self._channels = (ctl, stream)
        cmd = [sys.executable, "-m", "runv_py.hyperstart.hostagent",
               "--control-fd", str(ctl_agent.fileno()), "--stream-fd", str(stream_agent.fileno()),
               "--share", self.share_dir, "--name", f"runv-py:{self.name}"]
        cmd += [f"--cgroup={c}={path}" for c, path in self.cgroups.items()]
        # Capped like the VM it stands in for: its memory and its vCPUs.
        cmd += [f"--memory={config.memory_mib * 1024 * 1024}", f"--cpus={config.cpus}"]
        netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns else -1
        # The agent enters its namespaces and sets its parent-death signal itself, after
        # exec: no Python runs between fork and exec in this threaded process. If we die
        # it kills the agent and removes the cgroups on SIGTERM, which it inherits
        # blocked (the signal mask survives exec) until its handler is in place.
        cmd += [f"--parent={os.getpid()}", f"--netns-fd={netns_fd}"]
        pass_fds = (ctl_agent.fileno(), stream_agent.fileno()) + ((netns_fd,) if netns else ())
        with open(os.path.join(self.workdir, AGENT_LOG), "wb") as alog:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
            try:
                self.process = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=alog, stderr=alog, pass_fds=pass_fds,
                    start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                raise DriverError(f"cannot start the namespace agent: {e}") from None
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                ctl_agent.close()
                stream_agent.close()
                if netns_fd >= 0:
                    os.close(netns_fd)
        self.pid = self.process.pid

    def cgroup_paths(self) -> dict:
        """The sandbox's cgroup per controller (the launcher creates and removes them)."""
        dirs = v1_cgroup_dirs()
        if "memory" not in dirs:
            raise DriverError("the namespace driver needs the cgroup v1 memory controller "
                              "(none mounted here)")
        safe = self.name.replace("/", "_").replace(":", "_")
        return {c: os.path.join(own, CGROUP_PARENT, safe) for c, own in dirs.items()}

    def channels(self) -> tuple:
        """The host ends of the control and stream channels (handed out once)."""
        if self._channels is None:
            raise DriverError("the agent's channels were already taken")
        channels, self._channels = self._channels, None
        return channels

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self) -> str:
        parts = []
        if self.process is not None and self.process.poll() is not None:
            parts.append(f"agent exit status {self.process.returncode}")
        tail = self.console_tail()
        if tail:
            parts.append(f"agent log (last lines):\n{tail}")
        return "; ".join(parts) or "no output"

    def console_tail(self, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.workdir, AGENT_LOG), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4000))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _freeze(self, state: str) -> None:
        path = self.cgroups.get("freezer")
        if not path:
            raise DriverError("no freezer cgroup: cannot pause")
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write(state)

    def pause(self) -> None:
        self._freeze("FROZEN")

    def resume(self) -> None:
        self._freeze("THAWED")

    def status(self) -> str:
        if not self.alive():
            return "shutdown"
        try:
            with open(os.path.join(self.cgroups["freezer"], "freezer.state")) as f:
                return "paused" if f.read().strip() == "FROZEN" else "running"
        except (OSError, KeyError):
            return "running"

    def wait(self, timeout=None):
        try:
            return self.process.wait(timeout) if self.process else 0
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 3.0) -> None:
        """Kill the agent (and with it its pid namespace), then undo cgroups and mounts."""
        if self.alive():
            if "freezer" in self.cgroups:
                try:
                    self._freeze("THAWED")  # a frozen launcher cannot act on SIGTERM
                except OSError:
                    pass
            terminate(self.process, timeout)
        for path in self.cgroups.values():
            if not remove_tree(path):
                log.warning("cannot remove cgroup %s", path)
            try:
                os.rmdir(os.path.dirname(path))  # the shared runv-py parent, if now empty
            except OSError:
                pass
        self.cgroups = {}
        # The sandbox undoes its rootfs binds below the share after this; while they are
        # there the share stays (the state directory's removal unmounts it in the end).
        if self.share_mounted and not sc.mounts_below(self.share_dir):
            try:
                sc.umount(self.share_dir, sc.MNT_DETACH)
            except OSError as e:
                log.warning("cannot unmount %s: %s", self.share_dir, e)
            self.share_mounted = False
        if self._channels is not None:
            for sock in self._channels:
                sock.close()
            self._channels = None

    def close(self) -> None:
        pass
