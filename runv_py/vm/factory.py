"""Factories: what turns a BootConfig into a BootedVM.

``DirectFactory`` boots on demand; ``TemplateFactory`` (template.py) clones a saved VM;
``CacheFactory`` keeps N VMs of another factory booted and ready; ``MultiFactory`` picks
the first of a runV factory policy's factories whose VMs are big enough. Every factory
has ``get_vm(config, workdir, name)`` and ``close()``.
"""
import base64
import collections
import dataclasses
import json
import logging
import os
import threading
import time

from .. import paths
from ..drivers import DriverError
from ..hyperstart import messages as m
from ..hyperstart.errors import InvalidArgument
from ..host import statedir
from . import launcher
from .boot import BOOT_TIMEOUT, BootConfig, BootedVM, DirectFactory, cold_boot_reason

log = logging.getLogger("runv_py.factory")


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
            raise InvalidArgument("a cache holds at least one VM")
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
        if isinstance(self.launcher, launcher.SafeLaunch):
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

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        why = cold_boot_reason(config, network) or _exceeds(self.config, config)
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
            return self.base.get_vm(config, workdir, name, network)
        booted.origin = "cache"
        try:
            # Like a clone, a cached VM gets the container's name as its hostname.
            booted.agent.call(m.Reseed(data=base64.b64encode(os.urandom(32)).decode(),
                                       hostname=name[:63], time_ns=time.time_ns()),
                              timeout=BOOT_TIMEOUT)
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
    statedir.remove(path)


def _exceeds(have: BootConfig, want: BootConfig) -> str:
    if want.cpus > have.cpus:
        return f"{want.cpus} cpus asked, the cached VMs have {have.cpus}"
    if want.memory_mib > have.memory_mib:
        return f"{want.memory_mib} MiB asked, the cached VMs have {have.memory_mib}"
    if (want.kernel, want.initrd) != (have.kernel, have.initrd):
        return "another kernel or initrd"
    if want.share != have.share:
        return f"a {want.share} share asked, the cached VMs have {have.share}"
    return ""


class MultiFactory:
    """The first of several factories whose VMs are big enough; cold boot otherwise."""

    name = "multi"

    def __init__(self, factories: list, fallback):
        self.factories = factories
        self.fallback = fallback

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        for factory, limits in self.factories:
            if not _exceeds(limits, config):
                return factory.get_vm(config, workdir, name, network)
        log.info("cold boot for %s: no factory in the policy has %d cpus and %d MiB",
                 name, config.cpus, config.memory_mib)
        return self.fallback.get_vm(config, workdir, name, network)

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
            raise InvalidArgument(f"--factory-policy is not valid JSON: {e}") from None
    if isinstance(policy, dict):
        policy = [policy]
    if not isinstance(policy, list) or not all(isinstance(p, dict) for p in policy):
        raise InvalidArgument("the factory policy is a list of {cache, template, cpu, memory} objects")
    out = []
    for entry in policy:
        unknown = set(entry) - {"cache", "template", "cpu", "memory"}
        if unknown:
            raise InvalidArgument(f"unknown factory policy keys: {', '.join(sorted(unknown))}")
        cache, cpu, memory = entry.get("cache", 0), entry.get("cpu", 0), entry.get("memory", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (cache, cpu, memory)):
            raise InvalidArgument("cache, cpu and memory in a factory policy are non-negative integers")
        out.append({"cache": cache, "template": bool(entry.get("template", False)),
                    "cpu": cpu, "memory": memory})
    return out


def make_factory(driver, policy=None, template_dir: str = "", base_config: BootConfig = None,
                 cache_dir: str = "", cache_name: str = "") -> "DirectFactory | MultiFactory":
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
        return template.TemplateFactory(driver, template_dir) if template_dir else direct
    factories = []
    try:
        for entry in entries:
            config = dataclasses.replace(base_config, cpus=entry["cpu"] or base_config.cpus,
                                         memory_mib=entry["memory"] or base_config.memory_mib)
            if entry["template"]:
                factory = template.TemplateFactory(driver, template_dir or paths.TEMPLATE_DIR,
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
             template_dir: str = "", network=None) -> BootedVM:
    """One VM from the factory a policy describes, the factory closed afterwards (the
    one-container-per-process CLI). A cache's VMs live in ``workdir`` and carry ``name``:
    whatever happens to this process, they go with the container's state."""
    factory = make_factory(driver, policy, template_dir, config, cache_dir=workdir,
                           cache_name=name)
    try:
        return factory.get_vm(config, workdir, name, network)
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

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        why = cold_boot_reason(config, network)
        if why:  # no factory of the policy could serve it: do not build them for nothing
            log.info("cold boot for %s: %s", name, why)
            return DirectFactory(self.driver).get_vm(config, workdir, name, network)
        return boot_one(self.driver, config, workdir, name, self.policy, self.template_dir,
                        network)

    def close(self) -> None:
        pass
