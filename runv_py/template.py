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
import fcntl
import json
import logging
import os
import time

from .agent_client import AgentClient, AgentError
from .drivers import DriverError
from .hyperstart import protocol

log = logging.getLogger("runv_py.template")

DEFAULT_TEMPLATE_DIR = "/var/lib/runv-py/template"
META_FILE = "template.json"
STATE_FILE = "state"
SHM_DIR = "/dev/shm"
MIGRATE_TIMEOUT = 30.0


class TemplateError(DriverError):
    """No usable template, or the template could not be made."""


def memory_file_for(template_dir: str) -> str:
    """The /dev/shm file holding a template's RAM, named after its directory."""
    import hashlib
    digest = hashlib.sha256(os.path.abspath(template_dir).encode()).hexdigest()[:16]
    return os.path.join(SHM_DIR, f"runv-py-template-{digest}.mem")


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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _qmp_wait(vm, done, what: str, timeout: float = MIGRATE_TIMEOUT, interval: float = 0.005):
    """Poll a QMP query until ``done(reply)`` is true; raises TemplateError on failure."""
    deadline = time.monotonic() + timeout
    while True:
        if not vm.alive():
            raise TemplateError(f"QEMU exited during {what}: {vm.failure()}")
        result = done()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TemplateError(f"{what} did not finish within {timeout:.0f}s")
        time.sleep(interval)


class _RawQmp:
    """A minimal synchronous QMP client for a clone's few commands: qemu.qmp's asyncio
    client costs tens of milliseconds to import and start, a third of a clone's start.
    QEMU serves one QMP client at a time: close() frees the monitor for QemuVM.qmp()."""

    def __init__(self, vm, timeout: float = 10.0):
        from .drivers.qemu import QMP_SOCKET
        self.sock = vm.connect(QMP_SOCKET, timeout=5)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._reply()  # the greeting
        self.cmd("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise DriverError("QEMU closed its QMP socket")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            message = json.loads(line)
            if "event" not in message:
                return message

    def cmd(self, command: str, **args):
        self.sock.sendall(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        reply = self._reply()
        if "error" in reply:
            raise DriverError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    def close(self) -> None:
        self.sock.close()


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def create(driver, config, template_dir: str) -> dict:
    """Boot a VM from ``config``, save it as a template in ``template_dir``; returns the
    template's metadata. Raises TemplateError if one exists already."""
    import shlex
    import shutil
    import tempfile
    from .factory import BOOT_TIMEOUT, connect_agent
    if getattr(driver, "kind", "") != "vm":
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
            vm = driver.launch(config, os.path.join(workdir, "vm"), "template", share,
                               memory_file=memory_file, shared_memory=True)
            agent = connect_agent(vm, BOOT_TIMEOUT)
            started = time.monotonic()
            vm.qmp_command("stop")
            vm.qmp_command("migrate-set-capabilities",
                           capabilities=[{"capability": "x-ignore-shared", "state": True}])
            vm.qmp_command("migrate", uri=f"exec:cat > {shlex.quote(state_file)}")

            def completed():
                status = vm.qmp_command("query-migrate").get("status")
                if status in ("failed", "cancelled"):
                    raise TemplateError(f"saving the template failed ({status}): {vm.failure()}")
                return status == "completed"
            _qmp_wait(vm, completed, "saving the template")
            agent.close()
            vm.stop()
            meta = {"cpus": config.cpus, "memory_mib": config.memory_mib,
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
    """'' if a clone of the template can serve ``config``, else why not."""
    if config.cpus > meta["cpus"]:
        return f"{config.cpus} cpus asked, the template has {meta['cpus']}"
    if config.memory_mib > meta["memory_mib"]:
        return f"{config.memory_mib} MiB asked, the template has {meta['memory_mib']}"
    for key in ("kernel", "initrd"):
        if os.path.abspath(getattr(config, key)) != meta[key]:
            return f"{key} {getattr(config, key)} is not the template's {meta[key]}"
    return ""


def clone(driver, meta: dict, template_dir: str, config, workdir: str, name: str,
          share_dir: str) -> tuple:
    """Start a clone of the template in ``workdir``; returns (QemuVM, AgentClient, config).

    ``config`` is the template's own BootConfig with the request's other settings."""
    from .factory import BOOT_TIMEOUT
    config = dataclasses.replace(config, cpus=meta["cpus"], memory_mib=meta["memory_mib"],
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
                           shared_memory=False, incoming=True)
        # The agent's ports were connected when the template was saved: connecting before
        # the state loads means the guest never sees them close, and answers at once.
        agent = AgentClient(*vm.channels())
        qmp = _RawQmp(vm)
        try:
            qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.cmd("migrate-incoming", uri=f"exec:cat {own}/{state_fd}")

            def loaded():
                status = qmp.cmd("query-status").get("status")
                if status not in ("inmigrate", "paused", "running"):
                    raise TemplateError(f"loading the template failed (VM {status})")
                return status != "inmigrate"
            _qmp_wait(vm, loaded, "loading the template", interval=0.001)  # ~5 ms of work
            qmp.cmd("cont")
        finally:
            qmp.close()
        # A clone is not a twin: fresh entropy, its own hostname. The first answer also
        # says the agent is alive.
        agent.request(protocol.RESEED, {"data": base64.b64encode(os.urandom(64)).decode(),
                                        "hostname": name[:63]}, timeout=BOOT_TIMEOUT)
    except (DriverError, AgentError, OSError, ValueError) as e:
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
