"""`runv-py factory serve`: the node's VM factory process (see __init__.py).

Threads: one serves the socket (each request is short: a handout never waits for a
boot), one refills each pool, one watches pidfds (each handed-out VM's QEMU and owner,
each pooled VM's QEMU) and reclaims a VM when either ends.
"""
import collections
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import threading
import time

from ..hyperstart.errors import InvalidArgument, RunvError
from ..host import proc as hostproc
from ..vm.boot import BOOT_TIMEOUT, BootConfig
from . import LOCK, SOCKET, TEMPLATES, VMS, path, wire
from .vms import FactoryVM, key_name, key_of, make, recover

log = logging.getLogger("runv_py.factory")

MAX_POOLS = 8                # shapes kept warm at once; others are served cold
POOL_IDLE = 600.0            # seconds a shape nobody asks for stays warm
REFILL_DELAY = 2.0           # seconds a refill waits after a hand-out while a VM is ready
REQUEST_TIMEOUT = 5.0
FACTORY_CGROUP = "/runv-py-factory"


def boot_files(config: BootConfig) -> tuple:
    """The kernel's and initrd's identity now: a VM made from other files runs another
    guest (another agent), and is not handed out."""
    from ..vm.template import _file_id
    return (_file_id(config.kernel), _file_id(config.initrd))


class Pool:
    """``size`` ready VMs of one shape, refilled by a thread of its own."""

    def __init__(self, factory: "Factory", key: tuple, config: BootConfig, nics: int, size: int):
        self.factory, self.key, self.config, self.nics, self.size = factory, key, config, nics, size
        self.ready = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.failures = 0
        self.used = time.monotonic()   # last asked for: an unused pool is closed
        self.taken = 0.0               # last handed a VM out
        self.thread = threading.Thread(target=self._refill, name="pool", daemon=True)
        self.thread.start()

    def _refill(self) -> None:
        while True:
            with self.cond:
                while not self.closed:
                    if len(self.ready) >= self.size:
                        self.cond.wait()
                        continue
                    # A VM was just handed out and its pod is starting on the same cores:
                    # while another is ready, the next one is made after that start.
                    wait = self.taken + REFILL_DELAY - time.monotonic()
                    if self.ready and wait > 0:
                        self.cond.wait(wait)
                        continue
                    break
                if self.closed:
                    return
            try:
                files = boot_files(self.config)
                vm = make(self.factory.driver, self.factory.new_name(), self.key, self.config,
                          self.nics)
                vm.files = files
            except (RunvError, OSError, ValueError) as e:
                self.failures += 1
                delay = min(60.0, 0.5 * 2 ** min(self.failures, 7))
                log.warning("pool %s: cannot make a VM (%s); next try in %.0fs", self.describe(),
                            e, delay)
                with self.cond:
                    self.cond.wait(delay)  # a broken shape must not spin
                continue
            self.failures = 0
            with self.cond:
                if self.closed:
                    vm.reclaim()
                    return
                self.ready.append(vm)
            self.factory.watch(vm)
            log.info("pool %s: %s ready (%s, qemu pid %d)", self.describe(), vm.name, vm.origin,
                     vm.process.pid)

    def take(self):
        self.used = time.monotonic()
        try:
            files = boot_files(self.config)
        except OSError:
            files = None
        with self.cond:
            while self.ready:
                vm = self.ready.popleft()
                self.cond.notify_all()
                if vm.process.poll() is None and vm.files == files:
                    self.taken = time.monotonic()
                    return vm
                if vm.files != files:  # made before the kernel or initrd was replaced
                    log.info("pool %s: %s runs a kernel or initrd replaced since: dropped",
                             self.describe(), vm.name)
                self.factory.forget(vm)
                vm.reclaim()
        return None

    def describe(self) -> str:
        c = self.config
        return f"{c.cpus}cpu/{c.memory_mib}MiB/{c.share}/{self.nics}nic"

    def close(self) -> None:
        """Stop the ready VMs, and the one being made once it is (a boot is bounded)."""
        with self.cond:
            self.closed = True
            spare = list(self.ready)
            self.ready.clear()
            self.cond.notify_all()
        for vm in spare:
            self.factory.forget(vm)
            vm.reclaim()
        self.thread.join(BOOT_TIMEOUT + 10)


class Factory:
    def __init__(self, driver, pool_size: int, warm: list):
        self.driver = driver
        self.pool_size = pool_size
        self.warm = warm                   # [(BootConfig, nics)] kept ready from the start
        self.idle_seconds = float(os.environ.get("RUNV_FACTORY_POOL_IDLE") or POOL_IDLE)
        self.pools = {}
        self.lock = threading.Lock()
        self.watched = {}                  # pidfd -> FactoryVM
        self.handed = {}                   # name -> FactoryVM
        self.counter = 0
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def new_name(self) -> str:
        with self.lock:
            self.counter += 1
            return f"{os.getpid()}-{self.counter}"

    # ---- watching -------------------------------------------------------------------

    def watch(self, vm: FactoryVM) -> None:
        with self.lock:
            for fd in (vm.pidfd, vm.owner_fd):
                if fd >= 0:
                    self.watched[fd] = vm
        os.write(self.wake_w, b"x")

    def forget(self, vm: FactoryVM) -> None:
        """Stop watching ``vm`` (it is being reclaimed by its pool)."""
        with self.lock:
            for fd in (vm.pidfd, vm.owner_fd):
                self.watched.pop(fd, None)

    def _watch_loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                fds = list(self.watched)
            try:
                readable, _, _ = select.select(fds + [self.wake_r], [], [], 1.0)
            except OSError:  # a pidfd closed by a reclaim meanwhile: look again
                continue
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            for fd in readable:
                with self.lock:
                    vm = self.watched.get(fd)
                    if vm is None:
                        continue
                    for other in (vm.pidfd, vm.owner_fd):
                        self.watched.pop(other, None)
                    self.handed.pop(vm.name, None)
                what = "its QEMU exited" if fd == vm.pidfd else f"its owner (pid {vm.owner_pid}) exited"
                if vm.owner_pid or fd != vm.pidfd:
                    log.info("%s (%s) ends: %s", vm.name, vm.container or "unclaimed", what)
                else:
                    log.warning("pooled VM %s died", vm.name)
                vm.reclaim()

    # ---- requests -------------------------------------------------------------------

    def pool_for(self, config: BootConfig, nics: int):
        key = key_of(config, nics)
        with self.lock:
            pool = self.pools.get(key)
            if pool is None and len(self.pools) < MAX_POOLS and not self.stopping.is_set():
                pool = self.pools[key] = Pool(self, key, config, nics, self.pool_size)
            if pool is not None:
                pool.used = time.monotonic()
            return pool

    def close_idle_pools(self) -> None:
        """Pools nobody asked for in ``idle_seconds`` go, and their templates (the memory
        a node's unused shapes hold is bounded): asked for again, a shape is made again."""
        now = time.monotonic()
        with self.lock:
            idle = [(k, p) for k, p in self.pools.items() if now - p.used > self.idle_seconds]
            for key, _ in idle:
                del self.pools[key]
        for key, pool in idle:
            log.info("pool %s: not asked for in %.0f s: closed", pool.describe(),
                     now - pool.used)
            threading.Thread(target=self._close_pool, args=(key, pool), name="close",
                             daemon=True).start()

    def _close_pool(self, key: tuple, pool: Pool) -> None:
        from ..vm import template
        pool.close()
        with self.lock:
            if key in self.pools:  # asked for again meanwhile: its template serves on
                return
        tdir = path(TEMPLATES, key_name(key))
        if template.exists(tdir):
            template.remove(tdir)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        try:
            request, fds = wire.recv(conn)
        except (EOFError, OSError, RunvError) as e:
            log.debug("a request failed: %s", e)
            return
        for fd in fds:  # none are expected
            os.close(fd)
        op = request.get("op")
        try:
            if uid != 0:
                raise InvalidArgument("only root may use the factory")
            if op == "get":
                self.hand_out(conn, request, pid)
            elif op == "warm":  # keep a shape ready from now on (setup, tests, benchmarks)
                pool = self.pool_for(BootConfig(**dict(request.get("config") or {})),
                                     int(request.get("nics", 0)))
                wire.send(conn, {"ok": True} if pool is not None else
                          {"ok": False, "reason": "too many shapes"})
            elif op == "status":
                wire.send(conn, {"ok": True, **self.status()})
            elif op == "stop":
                wire.send(conn, {"ok": True})
                self.stop()
            else:
                raise InvalidArgument(f"unknown request {op!r}")
        except (RunvError, TypeError, ValueError) as e:
            try:
                wire.send(conn, {"ok": False, "reason": str(e)})
            except OSError:
                pass

    def hand_out(self, conn: socket.socket, request: dict, pid: int) -> None:
        config = BootConfig(**dict(request.get("config") or {}))
        nics = int(request.get("nics", 0))
        if nics not in (0, 1):
            raise InvalidArgument("a pooled VM has no NIC or one")
        pool = self.pool_for(config, nics)
        vm = pool.take() if pool is not None else None
        if vm is None:
            why = "no pool for this shape (too many shapes)" if pool is None else \
                f"no ready VM of this shape yet (pool {pool.describe()} is filling)"
            wire.send(conn, {"ok": False, "reason": why})
            return
        vm.owner_pid, vm.owner_start = pid, hostproc.start_time(pid)
        vm.container = str(request.get("name", ""))[:256]
        vm.handed_out = time.time()
        try:
            vm.owner_fd = os.pidfd_open(pid)
            vm.write_record()
            wire.send(conn, {"ok": True, "vm": vm.public()},
                      [vm.agent.control.fileno(), vm.agent.stream.fileno()])
        except (OSError, RunvError) as e:
            log.warning("handing %s to pid %d failed: %s", vm.name, pid, e)
            self.forget(vm)
            vm.reclaim()
            return
        vm.agent.close()   # the shim holds the channels now
        vm.agent = None
        with self.lock:
            self.handed[vm.name] = vm
        self.watch(vm)
        log.info("%s handed to %s (pid %d)", vm.name, vm.container, pid)

    def status(self) -> dict:
        with self.lock:
            pools = [{"shape": p.describe(), "ready": [v.name for v in p.ready], "size": p.size,
                      "failures": p.failures} for p in self.pools.values()]
            vms = [v.public() for v in self.handed.values()]
        return {"pid": os.getpid(), "pools": pools, "vms": vms}

    # ---- running --------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._watch_loop, name="watch", daemon=True).start()
        for entry in sorted(os.listdir(path(VMS))):
            vm = recover(path(VMS, entry))
            if vm is not None:
                log.info("watching %s again (%s, owner pid %d)", vm.name, vm.container, vm.owner_pid)
                with self.lock:
                    self.handed[vm.name] = vm
                self.watch(vm)
        for config, nics in self.warm:
            self.pool_for(config, nics)
        listener.settimeout(1.0)
        checked = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() - checked >= 1.0:  # however busy the socket is
                checked = time.monotonic()
                self.close_idle_pools()
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as e:
                log.warning("accept: %s", e)
                time.sleep(0.1)
                continue
            with conn:
                self.handle(conn)

    def stop(self) -> None:
        """Stop pooled VMs; handed-out VMs go on (their shims own them)."""
        self.stopping.set()
        with self.lock:
            pools = list(self.pools.values())
        for pool in pools:
            pool.close()


def remove_templates() -> None:
    """The templates live as long as the factory that made them."""
    from ..vm import template
    templates = path(TEMPLATES)
    for entry in os.listdir(templates) if os.path.isdir(templates) else []:
        if not entry.startswith("."):  # the templates' lock files
            template.remove(os.path.join(templates, entry))


def own_cgroup() -> None:
    """Leave the cgroups of whoever started us (a shim's caller: conmon's, containerd's)
    for one of our own, where the pooled VMs are accounted too."""
    from ..host.cgroups import HostCgroup
    try:
        cgroup = HostCgroup.for_path(FACTORY_CGROUP)
        cgroup.create(None, None, 100000)
        cgroup.join(0)
    except OSError as e:
        log.warning("the factory stays in its parent's cgroups: %s", e)


def run(driver, pool_size: int, warm: list) -> int:
    """Serve until SIGTERM or a stop request; 0, or 0 at once if a factory runs already."""
    os.makedirs(path(), mode=0o700, exist_ok=True)
    lock = os.open(path(LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("a factory runs already")
        return 0
    os.makedirs(path(VMS), mode=0o700, exist_ok=True)
    remove_templates()  # a killed predecessor's: their memory files would stay in /dev/shm
    own_cgroup()
    factory = Factory(driver, pool_size, warm)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: factory.stopping.set())
    sock_path = path(SOCKET)
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o600)
    listener.listen(64)
    log.info("factory %d serving on %s: pools of %d, driver %s", os.getpid(), sock_path,
             pool_size, driver.name)
    try:
        factory.serve(listener)
    finally:
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        listener.close()
        factory.stop()
        remove_templates()  # clones handed out keep their mappings of the memory files
        log.info("factory %d stopped; %d handed-out VMs go on", os.getpid(), len(factory.handed))
    return 0
