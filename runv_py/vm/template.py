"""VM templates: boot one VM, save its device state, start clones from its memory.

The template VM runs with its RAM in a file under /dev/shm (``share=on``). Once its agent
is up, QMP ``stop`` and a migration with ``x-ignore-shared`` write only the device state
(tens of KB) to ``state``: the RAM is the file itself. A clone maps the same file
``share=off`` (a private copy-on-write view: its writes never reach the file or its
siblings), loads ``state`` with ``-incoming defer`` + ``migrate-incoming`` and resumes.
The template is saved before any STARTPOD: QEMU refuses to migrate with the 9p share
mounted, and only the host side of the share (its path) may differ between clones.

Removing a template unlinks its files; running clones keep their mappings of the
memory file, so they go on working, and the kernel frees it when the last one stops.
"""
import base64
import dataclasses
import json
import logging
import os
import time

from .. import paths
from ..drivers import DriverError
from ..host import flock
from ..hyperstart import messages as m
from ..drivers import jail
from ..hyperstart.errors import RunvError
from .agent_client import AgentClient
from .boot import (BOOT_TIMEOUT, BootConfig, BootedVM, DirectFactory, cold_boot_reason,
                   connect_agent)

log = logging.getLogger("runv_py.template")

DEFAULT_TEMPLATE_DIR = paths.TEMPLATE_DIR
META_FILE = "template.json"
STATE_FILE = "state"
SHM_DIR = "/dev/shm/runv-py"   # mode 0700: only root lists it; memory files are 0600
# A template is made by booting its VM and saving its state: longer than either waits.
LOCK_TIMEOUT = BOOT_TIMEOUT + 240
# Bumped when the VM's devices change: a clone must have its template's devices.
FORMAT = 3


class TemplateError(DriverError):
    """No usable template, or the template could not be made."""


def memory_file_for(template_dir: str) -> str:
    """The /dev/shm file holding a template's RAM, named after its directory."""
    import hashlib
    digest = hashlib.sha256(os.path.abspath(template_dir).encode()).hexdigest()[:16]
    return os.path.join(SHM_DIR, f"template-{digest}.mem")


def _private_memory_file(path: str) -> None:
    """Create the (empty) memory file 0600 in a 0700 directory before QEMU opens it:
    QEMU would create it 0644, and the guest's memory would be readable by anyone."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    if jail.enabled():  # the VM user's own: every clone's QEMU opens it (host/jail.py)
        os.chown(path, *jail.vm_user())


def load(template_dir: str) -> dict:
    """The template's metadata; raises TemplateError when there is none."""
    try:
        with open(os.path.join(template_dir, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise TemplateError(f"no VM template in {template_dir} "
                            "(make one with 'runv-py manage create-template')") from None
    except (OSError, ValueError) as e:
        raise TemplateError(f"cannot read the template in {template_dir}: {e}") from None
    for path in (meta["memory_file"], os.path.join(template_dir, STATE_FILE)):
        if not os.path.exists(path):
            raise TemplateError(f"the template in {template_dir} is incomplete: {path} is missing")
    return meta


def exists(template_dir: str) -> bool:
    """Whether a complete template (its metadata, written last) is in ``template_dir``."""
    return os.path.isfile(os.path.join(template_dir, META_FILE))


class _DirLock:
    """An exclusive flock beside the template directory: creation and removal by
    concurrent processes must not interleave."""

    def __init__(self, template_dir: str):
        parent = os.path.dirname(os.path.abspath(template_dir))
        os.makedirs(parent, exist_ok=True)
        self.path = os.path.join(parent, f".{os.path.basename(template_dir)}.lock")

    def __enter__(self):
        self.fd = flock.lock(self.path, LOCK_TIMEOUT, "another process is making or removing "
                             "this template for too long")
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def create(driver, config, template_dir: str, network=None) -> dict:
    """Boot a VM from ``config``, save it as a template in ``template_dir``; returns the
    template's metadata. Raises TemplateError if one exists already. A ``network``
    (an object with attach/close_fds, as for launch) gives the template its NICs: its
    clones get theirs in the same places."""
    import shutil
    import tempfile
    if not getattr(driver, "supports_templates", False):
        raise TemplateError(f"VM templates need a VM driver, not {getattr(driver, 'name', driver)}")
    template_dir = os.path.abspath(template_dir)
    with _DirLock(template_dir):
        if exists(template_dir):
            raise TemplateError(f"a template exists in {template_dir} (remove it first)")
        os.makedirs(template_dir, exist_ok=True)
        memory_file = memory_file_for(template_dir)
        state_file = os.path.join(template_dir, STATE_FILE)
        workdir = tempfile.mkdtemp(prefix="runv-py-template-")
        vm = None
        try:
            share = os.path.join(workdir, "share")  # never mounted: only its path is used
            os.mkdir(share)
            _private_memory_file(memory_file)
            vm = driver.launch(config, os.path.join(workdir, "vm"), "template", share,
                               memory_file=memory_file, shared_memory=True, network=network)
            agent = connect_agent(vm, BOOT_TIMEOUT)
            started = time.monotonic()
            vm.save_state(state_file)
            agent.close()
            vm.stop()
            meta = {"format": FORMAT, "cpus": config.cpus, "memory_mib": config.memory_mib,
                    "max_cpus": config.max_cpus, "max_memory_mib": config.max_memory_mib,
                    "nics": 1 if network is not None else 0,
                    # The guest keeps the MAC it booted with: every clone's NIC has it.
                    "nic_mac": getattr(network, "mac", ""),
                    "kernel": os.path.abspath(config.kernel), "initrd": os.path.abspath(config.initrd),
                    "kernel_id": _file_id(config.kernel), "initrd_id": _file_id(config.initrd),
                    "memory_file": memory_file, "created": time.time(),
                    "state_bytes": os.path.getsize(state_file)}
            tmp = os.path.join(template_dir, META_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2)
            os.rename(tmp, os.path.join(template_dir, META_FILE))  # the template exists now
            log.info("template saved in %s (%d cpus, %d MiB, state %d bytes in %.2fs)",
                     template_dir, config.cpus, config.memory_mib, meta["state_bytes"],
                     time.monotonic() - started)
            return meta
        except BaseException:
            if vm is not None:
                vm.stop()
            _remove_files(template_dir, memory_file)
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def remove(template_dir: str) -> bool:
    """Remove the template's files; running clones are unaffected. False if there was
    no template."""
    template_dir = os.path.abspath(template_dir)
    with _DirLock(template_dir):
        had = exists(template_dir)
        _remove_files(template_dir, memory_file_for(template_dir))
        return had


def _remove_files(template_dir: str, memory_file: str) -> None:
    for path in (os.path.join(template_dir, META_FILE), os.path.join(template_dir, STATE_FILE),
                 os.path.join(template_dir, META_FILE + ".tmp"), memory_file):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(template_dir)
    except OSError:
        pass  # not empty (someone else's files) or gone


def fits(meta: dict, config) -> str:
    """'' if a clone of the template can serve ``config``, else why not (a kernel or
    initrd rebuilt since the template was made does not fit: its agent is another)."""
    if meta.get("format") != FORMAT:
        return "the template was made by another runv-py version (other devices)"
    if config.cpus > meta["cpus"]:
        return f"{config.cpus} cpus asked, the template has {meta['cpus']}"
    if config.memory_mib > meta["memory_mib"]:
        return f"{config.memory_mib} MiB asked, the template has {meta['memory_mib']}"
    if (config.max_cpus, config.max_memory_mib) != (meta["max_cpus"], meta["max_memory_mib"]):
        return "another room to grow than the template's"
    for key in ("kernel", "initrd"):
        if os.path.abspath(getattr(config, key)) != meta[key]:
            return f"{key} {getattr(config, key)} is not the template's {meta[key]}"
        try:
            if _file_id(meta[key]) != meta[f"{key}_id"]:
                return f"{key} {meta[key]} changed since the template was made"
        except OSError:
            return f"{key} {meta[key]} is gone"
    return ""


def clone(driver, meta: dict, template_dir: str, config, workdir: str, name: str,
          share_dir: str, network=None, detached: bool = False,
          connect=AgentClient, run: bool = True) -> tuple:
    """Start a clone of the template in ``workdir``; returns (VM, agent, config), the
    agent made by ``connect`` from the VM's two channels. ``run=False`` leaves it
    loaded but stopped, not yet reseeded: whoever resumes it must reseed it.

    ``config`` is the template's own BootConfig with the request's other settings. A
    template made with a NIC needs a ``network`` for its clone (see create)."""
    config = dataclasses.replace(config, cpus=meta["cpus"], memory_mib=meta["memory_mib"],
                                 max_cpus=meta["max_cpus"], max_memory_mib=meta["max_memory_mib"],
                                 kernel=meta["kernel"], initrd=meta["initrd"])
    # Both files are opened first and reach QEMU through /proc/PID/fd: a template removed
    # meanwhile cannot take them away, nor make QEMU create an empty memory file.
    try:
        state_fd = os.open(os.path.join(template_dir, STATE_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise TemplateError(f"the template in {template_dir} is gone: {e}") from None
    try:
        memory_fd = os.open(meta["memory_file"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(state_fd)
        raise TemplateError(f"the template in {template_dir} is gone: {e}") from None
    own = f"/proc/{os.getpid()}/fd"
    agent = vm = None
    try:
        vm = driver.launch(config, workdir, name, share_dir, memory_file=f"{own}/{memory_fd}",
                           shared_memory=False, incoming=True, network=network,
                           detached=detached)
        # The agent's ports were connected when the template was saved: connecting before
        # the state loads means the guest never sees them close, and answers at once.
        agent = connect(*vm.channels())
        vm.load_state(f"{own}/{state_fd}", run=run)
        # A clone is not a twin: fresh entropy, its own hostname. The first answer also
        # says the agent is alive.
        if run:
            agent.call(m.Reseed(data=base64.b64encode(os.urandom(64)).decode(),
                                hostname=name[:63], time_ns=time.time_ns()),
                       timeout=BOOT_TIMEOUT)
    except (RunvError, OSError, ValueError) as e:
        if agent is not None:
            agent.close()
        if vm is None:
            raise
        vm.stop()
        raise DriverError(f"cloning the template in {template_dir}: {e}; {vm.failure()}") from None
    finally:
        os.close(state_fd)
        os.close(memory_fd)
    return vm, agent, config


class TemplateFactory:
    """Starts clones of a saved VM template; a request the template cannot serve (more
    cpus or memory, another kernel) is cold-booted."""

    name = "template"

    def __init__(self, driver, template_dir: str, create_from: BootConfig = None):
        """With ``create_from``, a missing template is made from that config first."""
        from .launcher import safe
        if not getattr(driver, "supports_templates", False):
            raise TemplateError("VM templates need a VM driver, not "
                                f"{getattr(driver, 'name', driver)}")
        self.driver = safe(driver)
        self.template_dir = os.path.abspath(template_dir)
        self.direct = DirectFactory(self.driver)
        if create_from is not None and not exists(self.template_dir):
            try:
                create(self.driver, create_from, self.template_dir)
            except TemplateError:
                if not exists(self.template_dir):  # not just a concurrent creator
                    raise
        self.meta = load(self.template_dir)

    def get_vm(self, config: BootConfig, workdir: str, name: str, network=None) -> BootedVM:
        why = cold_boot_reason(config, network) or fits(self.meta, config)
        if why:
            log.info("cold boot for %s, not the template: %s", name, why)
            return self.direct.get_vm(config, workdir, name, network)
        share = os.path.join(workdir, "share")
        os.makedirs(share, exist_ok=True)
        vm, agent, used = clone(self.driver, self.meta, self.template_dir, config,
                                os.path.join(workdir, "vm"), name, share)
        log.info("%s started from the template in %s", name, self.template_dir)
        return BootedVM(vm, agent, share, used, origin="template")

    def close(self) -> None:
        pass
