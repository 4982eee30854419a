"""The VMs the node factory makes: how one is made (a template's clone, or a cold boot
for virtio-fs), its on-disk record, and how it is reclaimed.

A pooled VM's agent has answered once over sockets the factory holds without reader
threads (RawAgent), so the sockets reach the shim with nothing read ahead of it.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from typing import Optional

from ..drivers import DriverError, terminate
from ..hyperstart import messages as m
from ..hyperstart import protocol as p
from ..hyperstart import syscalls
from ..hyperstart.errors import RunvError, from_code
from ..host import proc as hostproc
from ..vm import template
from ..vm.boot import BOOT_TIMEOUT, BootConfig
from . import RECORD, TEMPLATES, VMS, path, settings

log = logging.getLogger("runv_py.factory")


def key_of(config: BootConfig, nics: int) -> tuple:
    """What makes two requests interchangeable: the VM's shape, share and NICs."""
    return (os.path.abspath(config.kernel), os.path.abspath(config.initrd), config.cpus,
            config.memory_mib, config.max_cpus, config.max_memory_mib, config.share, nics)


def key_name(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


class RawAgent:
    """The agent's channels without reader threads: wait for READY or make one call,
    then hand the sockets on untouched."""

    def __init__(self, control: socket.socket, stream: socket.socket):
        self.control, self.stream = control, stream
        self.reader = p.FrameReader(p.CONTROL_HEADER)
        self.pending = []         # frames read but not yet taken

    def _frame(self, deadline: float, alive=lambda: True) -> tuple:
        while not self.pending:  # a read may hold several frames: the rest wait here
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the guest agent did not answer in time")
            self.control.settimeout(min(left, 0.2))
            try:
                data = self.control.recv(65536)
            except socket.timeout:
                if not alive():
                    raise DriverError("the VM stopped before its agent answered") from None
                continue
            if not data:
                raise DriverError("the guest agent closed its channel")
            self.pending += self.reader.feed(data)
        self.control.settimeout(None)
        return self.pending.pop(0)

    def wait_ready(self, timeout: float, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while self._frame(deadline, alive)[0] != p.READY:
            pass

    def call(self, request, timeout: float = 60.0):
        self.control.sendall(m.encode(request))
        code, payload = self._frame(time.monotonic() + timeout)
        if code == p.ERROR:
            error = m.decode(m.ErrorReply, payload)
            raise from_code(error.code, error.message)
        return None

    def close(self) -> None:
        for sock in (self.control, self.stream):
            sock.close()


class HoldingNic:
    """A pooled VM's NIC: a tap in the factory's holding network namespace, handed to a
    pod later (the shim moves the tap into the pod's namespace; the fd stays valid)."""

    def __init__(self, vm_name: str, mac: str = ""):
        """``mac``: the template's, for a clone (its guest kept the MAC it booted with)."""
        self.tap = "rvf" + hashlib.sha256(vm_name.encode()).hexdigest()[:12]
        digest = hashlib.sha256(("mac" + vm_name).encode()).digest()
        self.mac = mac or "02:" + ":".join(f"{b:02x}" for b in digest[:5])
        self.fd = -1

    def attach(self) -> list:
        from ..net.netns import inside
        from ..net.pod import Nic, open_tap
        self.fd = inside(holding_netns(), lambda: open_tap(self.tap))
        return [Nic(self.fd, self.mac)]

    def close_fds(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holding_netns() -> str:
    """The holding namespace's path, made if missing (``ip netns add``)."""
    from . import HOLDING_NETNS
    netns = f"/run/netns/{HOLDING_NETNS}"
    if not os.path.exists(netns):
        import subprocess
        r = subprocess.run(["ip", "netns", "add", HOLDING_NETNS], capture_output=True,
                           text=True, timeout=10)
        if r.returncode != 0 and not os.path.exists(netns):
            raise DriverError(f"cannot make the network namespace {HOLDING_NETNS}: {r.stderr}")
    return netns


@dataclasses.dataclass
class FactoryVM:
    name: str
    key: tuple
    config: dict                   # the BootConfig it runs with
    share_kind: str
    origin: str                    # "template" (a clone) or "cold"
    paused: bool = False           # a clone waits stopped: its taker resumes it
    process: object = None         # Popen (ours) or drivers.adopted.Adopted
    share_server: object = None     # virtiofsd or virtfs-proxy-helper
    qemu_start: str = ""
    nic: dict = dataclasses.field(default_factory=dict)     # {"tap", "mac"}
    files: tuple = ()              # its kernel's and initrd's identity when it was made
    agent: Optional[RawAgent] = None                        # until handed out
    owner_pid: int = 0
    owner_start: str = ""
    container: str = ""
    handed_out: float = 0.0
    pidfd: int = -1                # QEMU's
    owner_fd: int = -1

    @property
    def dir(self) -> str:
        return path(VMS, self.name)

    def public(self) -> dict:
        """What the shim is told (and what the record keeps)."""
        return {"name": self.name, "qemu_pid": self.process.pid if self.process else 0,
                "qemu_start": self.qemu_start,
                "share_server_pid": self.share_server.pid if self.share_server else 0,
                "workdir": os.path.join(self.dir, "vm"), "share_dir": os.path.join(self.dir, "share"),
                "share_kind": self.share_kind, "config": self.config, "origin": self.origin,
                "paused": self.paused,
                "nic": self.nic, "key": list(self.key), "owner_pid": self.owner_pid,
                "owner_start": self.owner_start, "container": self.container}

    def write_record(self) -> None:
        tmp = os.path.join(self.dir, RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.public(), f)
        os.rename(tmp, os.path.join(self.dir, RECORD))

    def reclaim(self) -> None:
        """Stop the VM and remove all it held (mounts the shim left, the directory).
        Safe to call twice."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        for proc in (self.process, self.share_server):
            if proc is not None:
                terminate(proc)
        for fd in (self.pidfd, self.owner_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.owner_fd = -1
        syscalls.unmount_below(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def make(driver, name: str, key: tuple, config: BootConfig, nics: int) -> FactoryVM:
    """Boot one pooled VM: a clone of the shape's template (9p), or a cold boot."""
    vm_dir = path(VMS, name)
    workdir, share = os.path.join(vm_dir, "vm"), os.path.join(vm_dir, "share")
    os.makedirs(share, mode=0o700)
    nic = HoldingNic(name) if nics else None
    qemu = agent = None
    try:
        if config.share == "9p":
            tdir = template_for(driver, key, config, nics)
            meta = template.load(tdir)
            if nic is not None:
                nic = HoldingNic(name, meta.get("nic_mac", ""))
            # Running, its translation cache warming on the guest's idle paths, unless
            # the node asks for ready clones stopped (12 MiB less each, 50-100 ms more
            # per start: README): the shim then resumes and reseeds it.
            wanted = settings()
            paused = wanted["pause"]
            qemu, agent, used = template.clone(driver, meta, tdir, config, workdir,
                                               f"factory-{name}", share, network=nic,
                                               detached=True, connect=RawAgent, run=not paused)
            origin = "template"
            if not paused and wanted["warmup"]:
                try:  # only time is at stake: a clone that could not warm up serves cold
                    agent.call(m.WarmUp(), timeout=BOOT_TIMEOUT)
                except RunvError as e:
                    log.warning("%s: %s", name, e)
        else:
            qemu = driver.launch(config, workdir, f"factory-{name}", share, network=nic,
                                 detached=True)
            agent = RawAgent(*qemu.channels())
            agent.wait_ready(BOOT_TIMEOUT, qemu.alive)
            used, origin, paused = config, "cold", False
        vm = FactoryVM(name=name, key=key, config=dataclasses.asdict(used),
                       share_kind=qemu.share_kind, origin=origin, process=qemu.process,
                       share_server=qemu.share_server, qemu_start=hostproc.start_time(qemu.pid),
                       nic={"tap": nic.tap, "mac": nic.mac} if nic else {}, agent=agent,
                       paused=paused)
        vm.pidfd = os.pidfd_open(qemu.pid)
        qemu.close()  # QMP and the directory fd: the shim opens its own
        vm.write_record()
        return vm
    except BaseException:
        if agent is not None:
            agent.close()
        if qemu is not None:
            qemu.stop()
        syscalls.unmount_below(vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise


def template_for(driver, key: tuple, config: BootConfig, nics: int) -> str:
    """The template directory of a shape, made (or remade, if stale) on first use."""
    tdir = path(TEMPLATES, key_name(key))
    if template.exists(tdir):
        why = template.fits(template.load(tdir), config)
        if not why:
            return tdir
        log.info("remaking the template in %s: %s", tdir, why)
        template.remove(tdir)
    log.info("making a template for %d cpus, %d MiB (%s, %d NIC) in %s", config.cpus,
             config.memory_mib, config.share, nics, tdir)
    nic = HoldingNic(f"template-{key_name(key)}-{os.getpid()}") if nics else None
    try:
        template.create(driver, config, tdir, network=nic)
    except template.TemplateError:
        if not template.exists(tdir):
            raise
    return tdir


def recover(vm_dir: str) -> Optional[FactoryVM]:
    """A handed-out VM of an earlier factory whose shim still lives, to watch again;
    anything else in ``vm_dir`` (an unclaimed pool VM, an orphan) is stopped and removed."""
    from ..drivers.adopted import Adopted
    try:
        with open(os.path.join(vm_dir, RECORD)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = {}
    qemu_alive = bool(rec.get("qemu_pid")) and hostproc.alive(rec["qemu_pid"], rec.get("qemu_start", ""))
    owner_alive = bool(rec.get("owner_pid")) and hostproc.alive(rec["owner_pid"], rec.get("owner_start", ""))
    vm = FactoryVM(name=os.path.basename(vm_dir), key=tuple(rec.get("key") or ()),
                   config=rec.get("config") or {}, share_kind=rec.get("share_kind", ""),
                   origin=rec.get("origin", ""), nic=rec.get("nic") or {},
                   owner_pid=rec.get("owner_pid", 0), owner_start=rec.get("owner_start", ""),
                   container=rec.get("container", ""), qemu_start=rec.get("qemu_start", ""))
    try:
        if qemu_alive:
            vm.process = Adopted(rec["qemu_pid"])
            vm.pidfd = os.pidfd_open(rec["qemu_pid"])
            vfsd = rec.get("share_server_pid") or 0
            if vfsd and hostproc.alive(vfsd):
                vm.share_server = Adopted(vfsd)
        if qemu_alive and owner_alive:
            vm.owner_fd = os.pidfd_open(rec["owner_pid"])
            vm.handed_out = time.time()
            return vm
    except OSError:
        pass  # gone meanwhile
    log.info("removing %s left by an earlier factory (%s)", vm.name,
             "its owner is gone" if rec.get("owner_pid") else "never handed out")
    vm.reclaim()
    return None
