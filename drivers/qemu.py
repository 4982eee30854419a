"""The QEMU driver: builds QEMU's command line, launches and supervises it, talks QMP.

One VM is one QEMU process on ``-machine microvm`` with the guest kernel booted as an
uncompressed PVH vmlinux. The agent's two virtio-serial ports, QMP and the serial console
live as files in the VM's directory; QEMU runs with that directory as its working
directory so socket paths stay short whatever the container id.
"""
import dataclasses
import logging
import os
import socket
import subprocess
import time

from ..host import jail
from . import DriverError, terminate, virtfs_proxy, virtiofs

log = logging.getLogger("runv_py.drivers.qemu")

CONTROL_SOCKET = "ctl.sock"
STREAM_SOCKET = "stream.sock"
QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
SHARE_TAG = "runvshare"
MIGRATE_TIMEOUT = 30.0


def host_tsc_khz() -> int:
    """The host's TSC rate. Under TCG the guest TSC follows the host's, and telling the
    guest its rate avoids the calibration that hung 1 boot in 8 here."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def share_kind(config, memory_file: str = "") -> str:
    """The share a VM gets: virtio-fs if asked for, except for a VM whose RAM is a
    template's file (vhost-user cannot serve a clone's private copy of it)."""
    return "virtiofs" if config.share == "virtiofs" and not memory_file else "9p"


# The TCG translation cache, in MiB. QEMU 7.2 reserves 1 GiB by default and a small
# guest filled about 46 MiB of it. Below 32 MiB retranslation shows: a cold boot took
# 15% longer at 16 and twice as long at 8; a clone's `run true` 27% longer at 16.
TB_SIZE_MIB = int(os.environ.get("RUNV_TB_SIZE", "32"))


class QemuDriver:
    supports_templates = True

    def __init__(self, qemu: str, accel: str, reason: str):
        self.qemu = qemu
        self.accel = accel
        self.reason = reason
        self.name = "kvm" if accel == "kvm" else "qemu-tcg"

    def describe(self) -> dict:
        return {"driver": self.name, "hypervisor": "qemu", "binary": self.qemu,
                "accelerator": self.accel, "reason": self.reason}

    def kernel_cmdline(self, config) -> str:
        args = ["console=ttyS0", "reboot=t", "panic=-1", "rdinit=/init",
                "loglevel=7" if config.debug else "quiet"]
        if self.accel == "tcg":
            khz = host_tsc_khz()
            if khz:
                args.append(f"tsc_early_khz={khz}")
            # TCG's vCPUs read one virtual clock: without this the guest distrusts its
            # TSC, falls back to jiffies, and every vCPU ticks at HZ even when idle (an
            # idle 2-vCPU VM took 6.6% of a host CPU; 0.1% with it).
            args.append("tsc=reliable")
        # Room to grow (a pod's VM): the VM has the maximum, the guest starts on less and
        # onlines the rest when told (ONLINECPUMEM).
        if config.max_cpus > config.cpus:
            args.append(f"maxcpus={config.cpus}")
        if config.max_memory_mib > config.memory_mib:
            args.append(f"mem={config.memory_mib}M")
        return " ".join(args + list(config.extra_cmdline))

    def command(self, config, name: str, share_dir: str, memory_file: str = "",
                shared_memory: bool = False, incoming: bool = False, nics=(),
                jailed: bool = False, proxy_fd: int = -1) -> list:
        """QEMU's command line. A ``jailed`` QEMU runs under its seccomp sandbox; with
        ``proxy_fd`` its 9p share is served by virtfs-proxy-helper over that socket."""
        machine = "microvm,acpi=off,rtc=on,pit=on,pic=on,isa-serial=on"
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
                ["-accel", f"tcg,thread=multi,tb-size={TB_SIZE_MIB}"]
        cmd = [self.qemu, "-name", f"runv-py:{name}", *accel,
               "-smp", str(max(config.cpus, config.max_cpus)),
               "-m", f"{max(config.memory_mib, config.max_memory_mib)}M",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               # An incoming VM (a template's clone) never boots: its RAM holds the
               # kernel already, and loading 30 MB of boot files would cost time and memory.
               *([] if incoming else ["-kernel", config.kernel, "-initrd", config.initrd,
                                      "-append", self.kernel_cmdline(config)]),
               "-serial", f"file:{CONSOLE_LOG}",
               "-device", "virtio-serial-device,max_ports=4",
               "-chardev", f"socket,id=ctl,path={CONTROL_SOCKET},server=on,wait=off",
               "-device", "virtserialport,chardev=ctl,name=sh.hyper.channel.0",
               "-chardev", f"socket,id=stream,path={STREAM_SOCKET},server=on,wait=off",
               "-device", "virtserialport,chardev=stream,name=sh.hyper.channel.1",
               "-object", "rng-random,id=rng0,filename=/dev/urandom",
               "-device", "virtio-rng-device,rng=rng0",
               # The guest reports the memory it frees (the unpacked initramfs archive,
               # dropped caches) and QEMU gives it back to the host. Not where the RAM is
               # a template's file: QEMU 7.2 punches the reported pages out of the file
               # itself, under every other clone (a template and its clones must agree).
               "-device", "virtio-balloon-device,free-page-reporting="
                          f"{'off' if memory_file else 'on'}",
               "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]
        if share_kind(config, memory_file) == "virtiofs":
            args, memory_option = virtiofs.qemu_args(
                SHARE_TAG, max(config.memory_mib, config.max_memory_mib))
            cmd += args
            machine += memory_option
        elif proxy_fd >= 0:
            cmd += virtfs_proxy.qemu_args(proxy_fd, SHARE_TAG)
        else:
            cmd += ["-fsdev", f"local,id=share,path={share_dir},security_model=passthrough,"
                              "multidevs=remap",
                    "-device", f"virtio-9p-device,fsdev=share,mount_tag={SHARE_TAG}"]
        if memory_file:
            # Guest RAM in a file: shared by a template, a private copy-on-write map for a clone.
            size = max(config.memory_mib, config.max_memory_mib)  # as -m: room to grow too
            cmd += ["-object", f"memory-backend-file,id=mem0,size={size}M,"
                               f"mem-path={memory_file},share={'on' if shared_memory else 'off'}"]
            machine += ",memory-backend=mem0"
        for i, nic in enumerate(nics):
            # The tap is opened in the pod's namespace; QEMU gets its fd (vhost off: TCG).
            cmd += ["-netdev", f"tap,id=net{i},fd={nic.fd},vhost=off",
                    "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]
        if incoming:
            cmd += ["-incoming", "defer"]
        if jailed:
            cmd += ["-sandbox", jail.QEMU_SANDBOX]
        cmd += ["-machine", machine]
        return cmd

    def launch(self, config, workdir: str, name: str, share_dir: str, memory_file: str = "",
               shared_memory: bool = False, incoming: bool = False, network=None,
               detached: bool = False) -> "QemuVM":
        """Start QEMU for ``config`` in ``workdir``; returns at once (the guest boots).
        A ``detached`` VM (the node factory's) does not die with the launching thread:
        its owner changes after it has booted. QEMU runs in its jail (host/jail.py)
        unless the jail is turned off."""
        for path, what in ((config.kernel, "guest kernel"), (config.initrd, "initrd")):
            if not os.path.isfile(path):
                raise DriverError(f"{what} {path} not found (run 'runv-py setup' or pass "
                                  f"--{'kernel' if what == 'guest kernel' else 'initrd'})")
        os.makedirs(workdir, exist_ok=True)
        for stale in (CONTROL_SOCKET, STREAM_SOCKET, QMP_SOCKET):
            try:
                os.unlink(os.path.join(workdir, stale))
            except FileNotFoundError:
                pass
        share = share_kind(config, memory_file)
        if share != config.share:
            log.info("%s shares over 9p, not virtio-fs: its RAM is a template's file, and "
                     "vhost-user cannot serve a clone's private copy of it", name)
        jailed = jail.enabled()
        share_dir = os.path.abspath(share_dir)
        proxy_end = None
        if share == "virtiofs":
            server = virtiofs.start(share_dir, workdir, detached, jailed)
        elif jailed:  # QEMU cannot serve a container's files without root: a helper does
            server, proxy_end = virtfs_proxy.start(share_dir, workdir, detached)
        else:
            server = None
        try:
            nics = network.attach() if network is not None else []
            fds = [n.fd for n in nics] + ([proxy_end.fileno()] if proxy_end else [])
            try:
                proc = self._spawn(config, workdir, name, share_dir, memory_file,
                                   shared_memory, incoming, nics, detached, jailed,
                                   proxy_end.fileno() if proxy_end else -1,
                                   getattr(network, "netns", ""), fds)
            finally:
                if network is not None:
                    network.close_fds()
                if proxy_end is not None:
                    proxy_end.close()
        except BaseException:
            if server is not None:
                terminate(server)
            raise
        if incoming:
            # A clone is driven over QMP at once: load the client while QEMU starts.
            import qemu.qmp.legacy  # noqa: F401
        return QemuVM(self, proc, workdir, share, server)

    def _spawn(self, config, workdir, name, share_dir, memory_file, shared_memory, incoming,
               nics, detached, jailed, proxy_fd, netns, fds):
        if jailed:
            files = {} if incoming else {jail.INSIDE_KERNEL: config.kernel,
                                         jail.INSIDE_INITRD: config.initrd}
            if memory_file:
                files[jail.INSIDE_MEMORY] = memory_file
                memory_file = jail.INSIDE_MEMORY
            inside = dataclasses.replace(config, kernel=jail.INSIDE_KERNEL,
                                         initrd=jail.INSIDE_INITRD)
            cmd = self.command(inside, name, share_dir, memory_file, shared_memory, incoming,
                               nics, jailed=True, proxy_fd=proxy_fd)
            try:
                argv = jail.QemuJail(workdir, files, netns, not detached).argv(cmd)
            except OSError as e:
                raise DriverError(f"cannot set up QEMU's jail: {e}") from None
        else:
            cmd = self.command(config, name, share_dir, memory_file, shared_memory, incoming,
                               nics)
            # QEMU must not outlive the thread that launched it (see vm/launcher.py).
            argv = cmd if detached else ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        log.debug("launching %s", " ".join(cmd))
        with open(os.path.join(workdir, QEMU_LOG), "wb") as qlog:
            try:
                proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                        stdout=qlog, stderr=qlog, start_new_session=True,
                                        pass_fds=fds)
            except OSError as e:
                raise DriverError(f"cannot start {self.qemu}: {e}") from None
        return jail.JailedProcess(proc) if jailed else proc


class QemuVM:
    """A running QEMU process and the files through which it is reached."""

    share_tag = SHARE_TAG     # the guest mounts the sandbox's share with this tag
    network_in_guest = True   # a pod's network is configured by the agent, in the guest

    def __init__(self, driver: QemuDriver, process: subprocess.Popen, workdir: str,
                 share_kind: str = "9p", share_server: subprocess.Popen = None):
        self.driver = driver
        self.process = process
        self.pid = process.pid
        self.workdir = workdir
        self.share_kind = share_kind  # "9p" or "virtiofs"
        self.share_server = share_server  # virtiofsd or virtfs-proxy-helper, if any
        self._dirfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
        self._qmp = None

    @classmethod
    def adopt(cls, driver: QemuDriver, qemu_pid: int, workdir: str, share_kind: str,
              share_server_pid: int = 0) -> "QemuVM":
        """A VM another process launched (the node factory), watched through pidfds."""
        from .adopted import Adopted
        vfsd = Adopted(share_server_pid) if share_server_pid else None
        try:
            return cls(driver, Adopted(qemu_pid), workdir, share_kind, vfsd)
        except BaseException:
            if vfsd is not None:
                vfsd.kill()
            raise

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def short_path(self, name: str) -> str:
        """A path to a file of the VM's that fits a unix socket address (108 bytes)."""
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def channels(self) -> tuple:
        """Connected sockets to the agent's control and stream ports."""
        return self.connect(CONTROL_SOCKET), self.connect(STREAM_SOCKET)

    def connect(self, name: str, timeout: float = 10.0) -> socket.socket:
        """Connect to one of QEMU's server sockets, waiting for QEMU to create it."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.short_path(name))
                return sock
            except OSError:
                sock.close()
            if not self.alive():
                raise DriverError(f"QEMU exited before the guest came up: {self.failure()}")
            if time.monotonic() > deadline:
                raise DriverError(f"QEMU did not open {name} within {timeout:.0f}s")
            time.sleep(0.002)

    def failure(self) -> str:
        """What went wrong, from QEMU's own log and the tail of the guest console."""
        parts = []
        if self.process.poll() is not None:
            parts.append(f"QEMU exit status {self.process.returncode}")
        qemu_log = self.read_tail(QEMU_LOG, 1000).strip()
        if qemu_log:
            parts.append(f"QEMU said: {qemu_log}")
        if self.share_server is not None:
            kind, name = (("virtiofsd", virtiofs.LOG) if self.share_kind == "virtiofs"
                          else ("virtfs-proxy-helper", virtfs_proxy.LOG))
            server_log = self.read_tail(name, 1000).strip()
            if server_log:
                parts.append(f"{kind} said: {server_log}")
        console = self.console_tail()
        if console:
            parts.append(f"guest console (last lines):\n{console}")
        return "; ".join(parts) or "no output"

    def read_tail(self, name: str, size: int) -> str:
        try:
            with open(self.path(name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 15) -> str:
        return "\n".join(self.read_tail(CONSOLE_LOG, 4000).splitlines()[-lines:])

    # ---- QMP ------------------------------------------------------------------------

    def qmp(self):
        if self._qmp is None:
            from qemu.qmp.legacy import QEMUMonitorProtocol
            sock = self.connect(QMP_SOCKET, timeout=5)
            qmp = QEMUMonitorProtocol(sock)
            qmp.connect()
            self._qmp = qmp
        return self._qmp

    def qmp_command(self, command: str, **args):
        try:
            return self.qmp().cmd(command, **args) if args else self.qmp().cmd(command)
        except DriverError:
            raise
        except Exception as e:
            raise DriverError(f"QMP {command} failed: {e}") from None

    def status(self) -> str:
        return self.qmp_command("query-status").get("status", "unknown")

    def pause(self) -> None:
        self.qmp_command("stop")

    def resume(self) -> None:
        self.qmp_command("cont")

    # ---- templates ------------------------------------------------------------------

    def save_state(self, path: str) -> None:
        """Stop the guest and write its device state to ``path``. With the RAM in a
        shared file, x-ignore-shared leaves it out: the state is tens of KB."""
        self.qmp_command("stop")
        self._ignore_shared_memory()
        # Through an fd: a jailed QEMU can neither open the path nor run `cat` (spawn=deny).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.qmp_command("migrate", uri=f"fd:{self._send_fd(fd)}")
        finally:
            os.close(fd)

        def completed() -> bool:
            status = self.qmp_command("query-migrate").get("status")
            if status in ("failed", "cancelled"):
                raise DriverError(f"saving the VM state failed ({status}): {self.failure()}")
            return status == "completed"
        self._poll(completed, "saving the VM state", interval=0.005)

    def load_state(self, path: str) -> None:
        """Load ``path`` into this incoming VM (launched with ``incoming``) and run it."""
        self._ignore_shared_memory()  # QEMU refuses the state of a VM saved with it otherwise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DriverError(f"cannot read the VM state {path}: {e}") from None
        try:
            self.qmp_command("migrate-incoming", uri=f"fd:{self._send_fd(fd)}")
        finally:
            os.close(fd)

        def loaded() -> bool:
            status = self.status()
            if status not in ("inmigrate", "paused", "running"):
                raise DriverError(f"loading the VM state failed (VM {status}): {self.failure()}")
            return status != "inmigrate"
        self._poll(loaded, "loading the VM state", interval=0.001)  # about 5 ms of work
        self.qmp_command("cont")

    def _send_fd(self, fd: int, name: str = "migration") -> str:
        """Give QEMU a copy of ``fd`` over QMP (SCM_RIGHTS); returns the name it has there."""
        try:
            self.qmp().send_fd_scm(fd)
        except (OSError, Exception) as e:
            raise DriverError(f"cannot pass a file to QEMU: {e}") from None
        self.qmp_command("getfd", fdname=name)
        return name

    def _ignore_shared_memory(self) -> None:
        self.qmp_command("migrate-set-capabilities",
                         capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def _poll(self, done, what: str, interval: float, timeout: float = MIGRATE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if not self.alive():
                raise DriverError(f"QEMU exited while {what}: {self.failure()}")
            if time.monotonic() > deadline:
                raise DriverError(f"{what} did not finish within {timeout:.0f}s")
            time.sleep(interval)

    # ---- shutdown -------------------------------------------------------------------

    def wait(self, timeout=None):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 3.0) -> None:
        """Stop QEMU: SIGTERM (QEMU exits cleanly at once), SIGKILL if it lingers."""
        terminate(self.process, timeout)
        if self.share_server is not None:
            terminate(self.share_server, timeout)
        self.close()

    def close(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except (EOFError, OSError, Exception):  # QEMU closed the socket first
                pass
            self._qmp = None
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1
