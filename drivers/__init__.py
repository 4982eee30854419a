"""Hypervisor drivers and the driver loader.

``probe(name)`` returns the driver to use: QEMU with KVM where KVM can run a stock guest
kernel, QEMU with TCG otherwise (PVM hosts, no /dev/kvm), or the one named by ``name``.
"""
import logging
import os
import shutil

log = logging.getLogger("runv_py.drivers")

QEMU_BINARY = "qemu-system-x86_64"
DRIVER_NAMES = ("", "kvm", "qemu-tcg", "qemu", "namespace")


from ..hyperstart.errors import Unavailable


class DriverError(Unavailable):
    """No usable driver, or the driver could not start (or reach) a VM."""


def terminate(proc, timeout: float = 3.0) -> None:
    """End a child process: SIGTERM, SIGKILL if it is still there after ``timeout``."""
    import subprocess
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def kvm_verdict() -> tuple:
    """(usable, reason): can /dev/kvm run the stock guest kernel here?"""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, ("/dev/kvm is backed by kvm_pvm (PVM), which boots only PVM-built "
                       "guest kernels; a stock guest kernel would hang")
    return True, "/dev/kvm is usable"


def find_qemu() -> str:
    path = os.environ.get("RUNV_QEMU") or shutil.which(QEMU_BINARY)
    if not path or not os.access(path, os.X_OK):
        raise DriverError(f"{os.environ.get('RUNV_QEMU') or QEMU_BINARY} not found: "
                          "install it with 'apt-get install qemu-system-x86'")
    return path


def probe(name: str = ""):
    """The driver called ``name`` ('' picks the best one); raises DriverError."""
    if name not in DRIVER_NAMES:
        raise DriverError(f"unknown driver {name!r} (choose from kvm, qemu-tcg, namespace)")
    if name == "namespace":
        from .namespace import NamespaceDriver
        return NamespaceDriver()
    from .qemu import QemuDriver
    qemu = find_qemu()
    usable, reason = kvm_verdict()
    if name == "kvm":
        if not usable:
            raise DriverError(f"driver kvm: {reason}")
        return QemuDriver(qemu, "kvm", reason)
    if name in ("qemu-tcg", "qemu") or not usable:
        why = "forced by --driver" if name else f"{reason}; using TCG"
        if not name:
            log.info("driver: %s", why)
        return QemuDriver(qemu, "tcg", why)
    return QemuDriver(qemu, "kvm", reason)
