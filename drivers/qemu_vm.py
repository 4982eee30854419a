"""A running QEMU (launched by drivers/qemu.py, or adopted from the node factory) and
the files through which it is reached: the agent's sockets, QMP, the logs; saving and
loading its state for templates.
"""
import os
import socket
import subprocess
import time
from typing import TYPE_CHECKING

from . import DriverError, terminate, virtfs_proxy, virtiofs

if TYPE_CHECKING:
    from .qemu import QemuDriver

CONTROL_SOCKET = "ctl.sock"
STREAM_SOCKET = "stream.sock"
QMP_SOCKET = "qmp.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
SHARE_TAG = "runvshare"
MIGRATE_TIMEOUT = 30.0


QMP_GREETING_TIMEOUT = 10.0
QMP_TIMEOUT = 30.0


class QemuVM:
    """A running QEMU process and the files through which it is reached."""

    share_tag = SHARE_TAG     # the guest mounts the sandbox's share with this tag
    network_in_guest = True   # a pod's network is configured by the agent, in the guest

    def __init__(self, driver: "QemuDriver", process: subprocess.Popen, workdir: str,
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
    def adopt(cls, driver: "QemuDriver", qemu_pid: int, workdir: str, share_kind: str,
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
            import select
            from qemu.qmp.legacy import QEMUMonitorProtocol
            sock = self.connect(QMP_SOCKET, timeout=5)
            # The client waits for QEMU's greeting without a bound: a QEMU that
            # accepted but stopped (SIGSTOP, a hung main loop) must not hang us.
            if not select.select([sock], [], [], QMP_GREETING_TIMEOUT)[0]:
                sock.close()
                raise DriverError(f"QEMU did not greet on QMP within {QMP_GREETING_TIMEOUT:g}s")
            qmp = QEMUMonitorProtocol(sock)
            qmp.connect()
            qmp.settimeout(QMP_TIMEOUT)  # each command answered in time, or an error
            self._qmp = qmp
        return self._qmp

    def qmp_command(self, command: str, **args):
        try:
            return self.qmp().cmd(command, **args) if args else self.qmp().cmd(command)
        except DriverError:
            raise
        except Exception as e:
            if self._qmp is not None:  # maybe out of step (a late answer): a fresh one next
                qmp, self._qmp = self._qmp, None
                try:
                    qmp.close()
                except Exception:
                    pass
            raise DriverError(f"QMP {command} failed: {e or type(e).__name__}") from None

    def status(self) -> str:
        return self.qmp_command("query-status").get("status", "unknown")

    def pause(self) -> None:
        self.qmp_command("stop")

    def resume(self) -> None:
        self.qmp_command("cont")

    # ---- templates ------------------------------------------------------------------

    def save_state(self, path: str, ignore_shared: bool = True) -> None:
        """Stop the guest and write its device state to ``path``. With the RAM in a
        shared file, x-ignore-shared leaves it out: the state is tens of KB. Without it
        (a checkpoint) the guest's RAM is in the file too."""
        # Through an fd: a jailed QEMU can neither open the path nor run `cat` (spawn=deny).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.save_state_to(fd, ignore_shared)
        finally:
            os.close(fd)

    def save_state_to(self, fd: int, ignore_shared: bool = True) -> None:
        """save_state into the file open as ``fd`` (a caller's, from another mount
        namespace)."""
        self.qmp_command("stop")
        self._ignore_shared_memory(ignore_shared)
        self.qmp_command("migrate", uri=f"fd:{self._send_fd(fd)}")

        def completed() -> bool:
            info = self.qmp_command("query-migrate")
            status = info.get("status")
            if status in ("failed", "cancelled"):
                why = info.get("error-desc") or self.failure()
                raise DriverError(f"saving the VM state failed ({status}): {why}")
            return status == "completed"
        self._poll(completed, "saving the VM state", interval=0.005)

    def load_state(self, path: str, ignore_shared: bool = True, run: bool = True) -> None:
        """Load ``path`` into this incoming VM (launched with ``incoming``) and run it
        (or leave it stopped)."""
        # As it was saved: QEMU refuses the state of a VM saved with x-ignore-shared otherwise.
        self._ignore_shared_memory(ignore_shared)
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
        if run:
            self.qmp_command("cont")

    def _send_fd(self, fd: int, name: str = "migration") -> str:
        """Give QEMU a copy of ``fd`` over QMP (SCM_RIGHTS); returns the name it has there."""
        try:
            self.qmp().send_fd_scm(fd)
        except (OSError, Exception) as e:
            raise DriverError(f"cannot pass a file to QEMU: {e}") from None
        self.qmp_command("getfd", fdname=name)
        return name

    def _ignore_shared_memory(self, ignore: bool = True) -> None:
        self.qmp_command("migrate-set-capabilities",
                         capabilities=[{"capability": "x-ignore-shared", "state": ignore}])

    def devices(self) -> dict:
        """What a VM restored from this one's state must have as well: its RAM in a file
        (a template's clone) or not, and its number of NICs (read from QEMU's argv)."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError as e:
            raise DriverError(f"cannot read QEMU's command line: {e}") from None
        return {"memory_file": any(a.startswith("memory-backend-file,") for a in argv),
                "nics": sum(a.startswith("virtio-net-device,") for a in argv)}

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
