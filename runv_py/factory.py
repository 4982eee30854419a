"""BootConfig and the factories that turn it into a running VM with its agent ready."""
import base64
import collections
import dataclasses
import json
import logging
import os
import queue
import threading
import time

from .agent_client import AgentClient, AgentGone
from .drivers import DriverError
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

    def __init__(self, vm, agent: AgentClient, share_dir: str, config: BootConfig,
                 origin: str = "direct"):
        self.vm = vm
        self.agent = agent
        self.share_dir = share_dir
        self.config = config
        self.origin = origin      # direct | template | cache: how it was made
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
        self.driver = _safe(driver)

    def close(self) -> None:
        pass

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        share = os.path.join(workdir, "share")
        os.makedirs(share, exist_ok=True)
        vm = self.driver.launch(config, os.path.join(workdir, "vm"), name, share)
        agent = connect_agent(vm, BOOT_TIMEOUT)
        return BootedVM(vm, agent, share, config)


class TemplateFactory:
    """Starts clones of a saved VM template (see template.py); a request the template
    cannot serve (more cpus or memory, another kernel) is cold-booted."""

    name = "template"

    def __init__(self, driver, template_dir: str, create_from: BootConfig = None):
        """With ``create_from``, a missing template is made from that config first."""
        from . import template
        if getattr(driver, "kind", "") != "vm":
            raise template.TemplateError("VM templates need a VM driver, not "
                                         f"{getattr(driver, 'name', driver)}")
        self.driver = _safe(driver)
        self.template_dir = os.path.abspath(template_dir)
        self.direct = DirectFactory(self.driver)
        if create_from is not None and not template.exists(self.template_dir):
            try:
                template.create(self.driver, create_from, self.template_dir)
            except template.TemplateError:
                if not template.exists(self.template_dir):  # not just a concurrent creator
                    raise
        self.meta = template.load(self.template_dir)

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        from . import template
        why = template.fits(self.meta, config)
        if why:
            log.info("cold boot for %s, not the template: %s", name, why)
            return self.direct.get_vm(config, workdir, name)
        share = os.path.join(workdir, "share")
        os.makedirs(share, exist_ok=True)
        vm, agent, used = template.clone(self.driver, self.meta, self.template_dir, config,
                                         os.path.join(workdir, "vm"), name, share)
        log.info("%s started from the template in %s", name, self.template_dir)
        return BootedVM(vm, agent, share, used, origin="template")

    def close(self) -> None:
        pass


class _Launcher:
    """One thread, alive as long as the process, that spawns every QEMU a background
    thread asks for: QEMU dies with the *thread* that forked it (PR_SET_PDEATHSIG), so a
    cache's refill thread (or any short-lived thread) must not be its parent."""

    _instance = None
    _guard = threading.Lock()

    def __init__(self):
        self.requests = queue.Queue()
        threading.Thread(target=self._serve, name="qemu-launcher", daemon=True).start()

    @classmethod
    def get(cls) -> "_Launcher":
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _serve(self) -> None:
        while True:
            fn, args, kwargs, result, done = self.requests.get()
            try:
                result.append((True, fn(*args, **kwargs)))
            except BaseException as e:  # handed back to the caller
                result.append((False, e))
            done.set()

    def call(self, fn, *args, **kwargs):
        result, done = [], threading.Event()
        self.requests.put((fn, args, kwargs, result, done))
        done.wait()  # the launch itself is bounded: Popen, or an error
        ok, value = result[0]
        if not ok:
            raise value
        return value


class _SafeLaunch:
    """A driver whose launch() from any thread but the main one runs on the launcher
    thread, so that the QEMU outlives the thread that asked for it."""

    def __init__(self, driver):
        self._driver = driver
        self.observers = {}       # thread id -> callable(vm), told of the VMs it launches

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def launch(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            vm = self._driver.launch(*args, **kwargs)
        else:
            vm = _Launcher.get().call(self._driver.launch, *args, **kwargs)
        observer = self.observers.get(threading.get_ident())
        if observer is not None:
            observer(vm)
        return vm


def _safe(driver) -> _SafeLaunch:
    return driver if isinstance(driver, _SafeLaunch) else _SafeLaunch(driver)


class CacheFactory:
    """Keeps ``size`` VMs booted (by ``base``) and ready for ``config``; refills in the
    background. A request the cached VMs cannot serve, or one that finds the cache
    empty, goes to ``base`` directly. close() stops the spare VMs."""

    name = "cache"

    def __init__(self, base, size: int, config: BootConfig, cache_dir: str = "",
                 name_prefix: str = ""):
        """VMs are named ``name_prefix-N`` (default ``cache-PID-N``) and live in a new
        directory below ``cache_dir`` (default: the system's temporary directory)."""
        if size < 1:
            raise ValueError("a cache holds at least one VM")
        self.base = base
        self.name_prefix = name_prefix or f"cache-{os.getpid()}"
        # Told of each QEMU the refill thread launches: close() stops a VM still
        # booting instead of waiting for it.
        self.launcher = getattr(base, "driver", None)
        self.inflight = None      # the QEMU of the boot under way
        self.size = size
        self.config = config
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="runv-py-cache-", dir=cache_dir or None)
        self.ready = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.count = 0
        self.booting = False      # a VM is being booted for the cache right now
        self.failures = 0
        self.thread = threading.Thread(target=self._refill, name="vm-cache", daemon=True)
        self.thread.start()

    def _on_launch(self, vm) -> None:
        with self.lock:
            self.inflight = vm
            closed = self.closed
        if closed:
            vm.stop()  # the boot then fails at once

    def _refill(self) -> None:
        if isinstance(self.launcher, _SafeLaunch):
            self.launcher.observers[threading.get_ident()] = self._on_launch
        while True:
            with self.lock:
                while not self.closed and len(self.ready) >= self.size:
                    self.lock.wait()
                if self.closed:
                    return
                self.count += 1
                self.booting = True
                n = self.count
            workdir = os.path.join(self.dir, str(n))
            try:
                booted = self.base.get_vm(self.config, workdir, f"{self.name_prefix}-{n}")
            except Exception as e:
                _remove_dir(workdir)
                with self.lock:
                    self.booting = False
                    self.inflight = None
                    self.lock.notify_all()
                    if self.closed:
                        return
                self.failures += 1
                log.warning("the VM cache could not boot a VM: %s", e)
                with self.lock:  # back off; a broken config must not spin
                    self.lock.wait(min(30.0, 0.5 * 2 ** min(self.failures, 6)))
                continue
            self.failures = 0
            booted.cleanups.append(lambda path=workdir: self._remove(path))
            with self.lock:
                self.booting = False
                self.inflight = None
                self.lock.notify_all()
                if not self.closed:
                    self.ready.append(booted)
                    self.lock.notify_all()
                    continue
            _discard(booted)

    def _remove(self, workdir: str) -> None:
        _remove_dir(workdir)
        if self.closed:  # the last VM handed out takes the cache's directory with it
            try:
                os.rmdir(self.dir)
            except OSError:
                pass

    def wait_full(self, timeout: float) -> bool:
        """Wait until the cache holds ``size`` VMs (benchmarks, tests)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.ready) < self.size:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                self.lock.wait(left)
            return True

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        why = _exceeds(self.config, config)
        booted = None
        if not why:
            deadline = time.monotonic() + BOOT_TIMEOUT
            with self.lock:
                while booted is None:
                    # A boot under way finishes sooner than a new one would.
                    while not self.ready and self.booting and time.monotonic() < deadline:
                        self.lock.wait(deadline - time.monotonic())
                    if not self.ready:
                        break
                    booted = self.ready.popleft()
                    if not booted.vm.alive():  # died while waiting: throw it away
                        _discard(booted)
                        booted = None
                self.lock.notify_all()
            why = "" if booted else "the cache is empty"
        if booted is None:
            log.info("%s not from the cache: %s", name, why)
            return self.base.get_vm(config, workdir, name)
        booted.origin = "cache"
        try:
            # Like a clone, a cached VM gets the container's name as its hostname.
            booted.agent.request(protocol.RESEED, {"data": base64.b64encode(os.urandom(32)).decode(),
                                                   "hostname": name[:63]}, timeout=BOOT_TIMEOUT)
        except Exception as e:
            _discard(booted)
            raise DriverError(f"a cached VM did not answer: {e}") from None
        return booted

    def close(self) -> None:
        with self.lock:
            self.closed = True
            spare = list(self.ready)
            self.ready.clear()
            booting = self.inflight
            self.lock.notify_all()
        if booting is not None:
            booting.stop()  # fails the boot under way rather than waiting for it
        for booted in spare:
            _discard(booted)
        self.thread.join(BOOT_TIMEOUT + 10)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass  # VMs handed out still live below it; they remove their own directories
        self.base.close()


def _discard(booted: BootedVM) -> None:
    booted.stop()
    booted.release()


def _remove_dir(path: str) -> None:
    from . import statedir
    statedir.remove(path)


def _exceeds(have: BootConfig, want: BootConfig) -> str:
    if want.cpus > have.cpus:
        return f"{want.cpus} cpus asked, the cached VMs have {have.cpus}"
    if want.memory_mib > have.memory_mib:
        return f"{want.memory_mib} MiB asked, the cached VMs have {have.memory_mib}"
    if (want.kernel, want.initrd) != (have.kernel, have.initrd):
        return "another kernel or initrd"
    return ""


class MultiFactory:
    """The first of several factories whose VMs are big enough; cold boot otherwise."""

    name = "multi"

    def __init__(self, factories: list, fallback):
        self.factories = factories
        self.fallback = fallback

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        for factory, limits in self.factories:
            if not _exceeds(limits, config):
                return factory.get_vm(config, workdir, name)
        log.info("cold boot for %s: no factory in the policy has %d cpus and %d MiB",
                 name, config.cpus, config.memory_mib)
        return self.fallback.get_vm(config, workdir, name)

    def close(self) -> None:
        for factory, _ in self.factories:
            factory.close()


def parse_policy(policy) -> list:
    """runV's factory policy: a JSON list (or one object) of
    ``{"cache": N, "template": bool, "cpu": N, "memory": MiB}``."""
    if isinstance(policy, str):
        try:
            policy = json.loads(policy) if policy.strip() else []
        except ValueError as e:
            raise ValueError(f"--factory-policy is not valid JSON: {e}") from None
    if isinstance(policy, dict):
        policy = [policy]
    if not isinstance(policy, list) or not all(isinstance(p, dict) for p in policy):
        raise ValueError("the factory policy is a list of {cache, template, cpu, memory} objects")
    out = []
    for entry in policy:
        unknown = set(entry) - {"cache", "template", "cpu", "memory"}
        if unknown:
            raise ValueError(f"unknown factory policy keys: {', '.join(sorted(unknown))}")
        cache, cpu, memory = entry.get("cache", 0), entry.get("cpu", 0), entry.get("memory", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (cache, cpu, memory)):
            raise ValueError("cache, cpu and memory in a factory policy are non-negative integers")
        out.append({"cache": cache, "template": bool(entry.get("template", False)),
                    "cpu": cpu, "memory": memory})
    return out


def make_factory(driver, policy=None, template_dir: str = "", base_config: BootConfig = None,
                 cache_dir: str = "", cache_name: str = "") -> "DirectFactory | TemplateFactory | MultiFactory":
    """The factory for a policy (see parse_policy) or a template directory.

    ``template_dir`` alone (``--template DIR``): clone every VM from the template there,
    which must exist. A policy entry with ``template: true`` uses (creating it if missing)
    the template in ``template_dir`` or the default one. ``base_config`` gives the
    kernel, initrd and default size of what the policy's factories boot; ``cache_dir``
    and ``cache_name`` where a cache keeps its VMs and what it calls them.

    Call it after private_mount_namespace(): a cache's VMs are spawned by a thread
    that must see the sandboxes' bind mounts."""
    from . import template
    entries = parse_policy(policy or [])
    base_config = base_config or BootConfig()
    direct = DirectFactory(driver)
    if not entries:
        return TemplateFactory(driver, template_dir) if template_dir else direct
    factories = []
    try:
        for entry in entries:
            config = dataclasses.replace(base_config, cpus=entry["cpu"] or base_config.cpus,
                                         memory_mib=entry["memory"] or base_config.memory_mib)
            if entry["template"]:
                factory = TemplateFactory(driver, template_dir or template.DEFAULT_TEMPLATE_DIR,
                                          create_from=config)
                config = dataclasses.replace(config, cpus=factory.meta["cpus"],
                                             memory_mib=factory.meta["memory_mib"])
            else:
                factory = DirectFactory(driver)
            if entry["cache"]:
                factory = CacheFactory(factory, entry["cache"], config, cache_dir, cache_name)
            factories.append((factory, config))
    except BaseException:
        for factory, _ in factories:
            factory.close()
        raise
    return MultiFactory(factories, direct)


def boot_one(driver, config: BootConfig, workdir: str, name: str, policy=None,
             template_dir: str = "") -> BootedVM:
    """One VM from the factory a policy describes, the factory closed afterwards (the
    one-container-per-process CLI). A cache's VMs live in ``workdir`` and carry ``name``:
    whatever happens to this process, they go with the container's state."""
    factory = make_factory(driver, policy, template_dir, config, cache_dir=workdir,
                           cache_name=name)
    try:
        return factory.get_vm(config, workdir, name)
    finally:
        factory.close()


class OneShotFactory:
    """make_factory for a process that starts one VM (a shim): the policy's factory
    exists only while it hands that VM out, so no spare VM outlives the request."""

    name = "one-shot"

    def __init__(self, driver, factory_policy=None, template_dir: str = ""):
        self.driver = driver
        self.policy = factory_policy
        self.template_dir = template_dir

    def get_vm(self, config: BootConfig, workdir: str, name: str) -> BootedVM:
        return boot_one(self.driver, config, workdir, name, self.policy, self.template_dir)

    def close(self) -> None:
        pass
