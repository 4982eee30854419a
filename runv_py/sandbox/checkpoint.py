"""Checkpoint and restore of a sandbox: its whole VM (guest RAM and device state) in
a directory, and a new VM that goes on from it.

QEMU 7.2 will not save a VM whose guest has a 9p share mounted, nor one with a
vhost-user-fs device at all. So a checkpointable container's files are copied into guest
memory when it is created (NewContainer.rootfs_in_guest), and at the checkpoint the
agent unmounts the share (ReleaseShare). The checkpoint (its files: oci/checkpoint_dir.py)
holds QEMU's migration stream, guest RAM included (the processes, their memory, the
container's files, sockets, the guest kernel), and the metadata a restore needs: the
VM's sizes and devices, the kernel's and initrd's digests (another kernel cannot run
this RAM), the agent client's stream numbering and the bytes of any frame it had begun
to read, and the container's init (its stdio streams).

A restore boots nothing: QEMU starts ``-incoming`` with the same devices, loads the
state, and the agent is told of its new world: fresh entropy, and the network of the
namespace it is restored into (ResetNetwork, then the usual SetupInterface/SetupRoute).
"""
import base64
import dataclasses
import logging
import os
import time

from ..hyperstart import messages as m
from ..hyperstart import states
from ..hyperstart.errors import FailedPrecondition, InvalidArgument
from ..oci.checkpoint_dir import (FORMAT, STATE_FILE, CheckpointError, digest, read,
                                  write_checkpoint)
from .container import Container, Process, ProcessIO

log = logging.getLogger("runv_py.checkpoint")

# The annotation (or the setting) that makes a container checkpointable.
ANNOTATION = "io.github.runv-py.checkpoint"


def wanted(bundle, sandbox) -> bool:
    """Whether a new container's files go into guest memory (so that its VM can be
    saved): asked for by the annotation, or by ``checkpoint = true`` in the node's
    settings. Only a VM with a 9p share can be saved."""
    asked = bundle.annotations.get(ANNOTATION)
    if asked is None:
        from ..settings import node_file
        asked = node_file()[1].get("checkpoint", False)
    elif asked not in ("true", "false"):
        raise InvalidArgument(f"annotation {ANNOTATION}: true or false, not {asked!r}")
    if asked not in (True, "true"):
        return False
    require_9p(sandbox.vm)
    return True


def require_9p(vm) -> None:
    if getattr(vm, "share_kind", "") != "9p":
        raise FailedPrecondition("QEMU 7.2 cannot save a VM with a virtio-fs device; use the "
                                 "9p share (share = \"9p\") for containers to checkpoint")


def check_checkpointable(sandbox) -> None:
    vm = sandbox.vm
    if not hasattr(vm, "save_state"):
        raise FailedPrecondition("only a VM sandbox can be checkpointed")
    require_9p(vm)
    for container in sandbox.alive_containers():
        if not container.rootfs_in_guest:
            raise FailedPrecondition(
                f"container {container.id} was not created checkpointable: its files are on "
                f"the VM's share, which QEMU 7.2 cannot save (create it with the annotation "
                f"{ANNOTATION}=true, or checkpoint = true in the settings)")


def save(sandbox, state_fd: int, leave_running: bool) -> dict:
    """Write the sandbox's VM into the file open as ``state_fd`` (the caller's: it may
    live in another mount namespace) and return the checkpoint's metadata (write_image
    puts it beside). The VM runs on with ``leave_running`` (paused if it was: containerd
    pauses a task before its checkpoint), else it stays stopped (its owner ends it)."""
    check_checkpointable(sandbox)
    booted, vm, agent = sandbox.booted, sandbox.vm, sandbox.agent
    # Hashed before the VM stops: tens of MB that need not lengthen its pause.
    digests = {f"{key}_sha256": digest(getattr(booted.config, key)) for key in ("kernel", "initrd")}
    started = time.monotonic()
    with sandbox.lock:
        if sandbox.paused:
            vm.resume()   # for a moment: the agent must unmount the share
        try:
            agent.call(m.ReleaseShare())
        finally:
            vm.pause()
        try:
            frozen = time.monotonic()
            leftovers = agent.quiesce()
            devices = vm.devices()
            vm.save_state_to(state_fd, ignore_shared=False)
            saved = time.monotonic()
            meta = {
                "format": FORMAT, "runtime": "runv-py", "created": time.time(), **digests,
                "config": {k: getattr(booted.config, k) for k in
                           ("cpus", "memory_mib", "max_cpus", "max_memory_mib")},
                "online": {"cpus": sandbox.cpus, "memory_mib": sandbox.memory_mib},
                "devices": devices,
                "guest_macs": guest_macs(sandbox.network),
                "agent": {"next_seq": agent.next_seq(),
                          "leftovers": [base64.b64encode(b).decode() for b in leftovers]},
                "containers": [container_meta(c) for c in sandbox.alive_containers()],
                "state_bytes": os.fstat(state_fd).st_size,
                "timings_us": {"freezing": int((frozen - started) * 1e6),
                               "frozen": int((saved - frozen) * 1e6),
                               "memdump": int((saved - frozen) * 1e6)}}
        except BaseException:
            if not sandbox.paused:
                vm.resume()
            raise
        if leave_running and not sandbox.paused:
            vm.resume()
    log.info("sandbox %s checkpointed (%d MiB) in %.2fs", sandbox.id,
             meta["state_bytes"] >> 20, time.monotonic() - started)
    return meta


def save_to_dir(sandbox, image_dir: str, leave_running: bool) -> dict:
    """save() into ``image_dir`` in this process's view of the files."""
    return write_checkpoint(image_dir, lambda fd: save(sandbox, fd, leave_running))


def guest_macs(network) -> list:
    """The MAC each guest NIC has now, in the order of the VM's NICs."""
    if network is None:
        return []
    if getattr(network, "attached", None):  # the guest took each veth's MAC (guest_setup)
        return [i.mac for i in network.attached]
    return [network.mac] if getattr(network, "mac", "") else []


def container_meta(container: Container) -> dict:
    init = container.init
    return {"id": container.id, "status": container.state.status,
            "created": container.created, "init_pid": init.pid,
            "process_ids": sorted(container.processes),   # the guest knows them all
            "init": init.spec.to_wire()}


def restore(sandbox_cls, sandbox_id: str, driver, meta: dict, image_dir: str, config,
            workdir: str, network, bundle, io: ProcessIO, host_pid: int, rng=os.urandom):
    """A new sandbox that goes on from the checkpoint in ``image_dir`` (``meta`` read
    by read()); its container's init writes to ``io``. ``network`` (the namespace it is
    restored into) is the sandbox's from now on. A checkpoint with a warm copy
    (vm/warm.py) is restored as a clone of it."""
    from ..vm import warm
    from ..vm.boot import BootedVM
    from ..vm.launcher import safe
    driver = safe(driver)  # QEMU must outlive the thread that asks (a request's)
    if len(meta["containers"]) != 1:
        raise CheckpointError(f"the checkpoint holds {len(meta['containers'])} containers, "
                              "not one")
    config = dataclasses.replace(config, share="9p", **meta["config"])  # its devices
    share_dir = os.path.join(workdir, "share")
    os.makedirs(share_dir, exist_ok=True)
    wanted = meta["devices"]["nics"]
    from ..net.late import LateNetwork
    if wanted == 0 and isinstance(network, LateNetwork):
        network = None   # a VM made without a NIC (a template's clone): it still has none
    have = network.nics_wanted() if network is not None else 0
    if have != wanted:
        raise FailedPrecondition(f"the checkpointed VM had {wanted} NICs; the network "
                                 f"namespace it is restored into gives {have}")
    wmeta = warm.usable(image_dir)
    try:
        if wmeta:
            vm, agent, config = warm.clone(driver, wmeta, image_dir, config,
                                           os.path.join(workdir, "vm"), sandbox_id, share_dir,
                                           network, connect=agent_for(meta))
            origin = "warm checkpoint"
        else:
            vm, agent = load_whole(driver, meta, image_dir, config, workdir, sandbox_id,
                                   share_dir, network)
            origin = "checkpoint"
    except BaseException:
        if network is not None:
            network.detach()
        raise
    log.info("%s restored from %s (%s)", sandbox_id, image_dir, origin)
    booted = BootedVM(vm, agent, share_dir, config, origin=origin)
    sandbox = sandbox_cls(sandbox_id, booted, network)
    try:
        sandbox.cpus, sandbox.memory_mib = meta["online"]["cpus"], meta["online"]["memory_mib"]
        agent.call(m.Reseed(data=base64.b64encode(rng(64)).decode(),
                            time_ns=time.time_ns()))
        if network is not None:
            macs = meta["guest_macs"]
            if isinstance(network, LateNetwork):
                network.mac = macs[0] if macs else network.mac
            for iface, mac in zip(network.interfaces, macs):
                iface.guest_mac = mac  # the guest's NIC, told apart by the MAC it has now
            agent.call(m.ResetNetwork())
            msgs = network.connect() if isinstance(network, LateNetwork) else network.guest_setup()
            for msg in msgs:
                agent.call(msg)
        held = meta["containers"][0]
        import uuid   # its name now, its spec's hostname, a boot id of its own
        agent.call(m.RenameContainer(container=held["id"], new_id=sandbox_id,
                                     hostname=bundle.hostname, boot_id=str(uuid.uuid4())))
        revive(sandbox, dict(held, id=sandbox_id), bundle, io, host_pid)
    except BaseException:
        sandbox.destroy()
        raise
    return sandbox


def agent_for(meta: dict):
    """What connects to a restored VM's channels: an agent client that goes on with the
    checkpointed one's stream numbers and half-read frames."""
    from ..vm.agent_client import AgentClient
    saved = meta["agent"]
    leftovers = tuple(base64.b64decode(b) for b in saved["leftovers"])
    return lambda control, stream: AgentClient(control, stream, first_seq=saved["next_seq"],
                                               leftovers=leftovers)


def load_whole(driver, meta: dict, image_dir: str, config, workdir: str, name: str,
               share_dir: str, network) -> tuple:
    """A new QEMU with the checkpointed VM's devices, the whole state loaded into it."""
    from ..vm.template import SHM_DIR, _private_memory_file
    memory_file = ""
    if meta["devices"]["memory_file"]:  # the RAM's block has the file backend's name
        memory_file = os.path.join(SHM_DIR, f"restore-{os.getpid()}-{name[:32]}.mem")
        _private_memory_file(memory_file)
    vm = agent = None
    try:
        vm = driver.launch(config, os.path.join(workdir, "vm"), name, share_dir,
                           memory_file=memory_file, shared_memory=False, incoming=True,
                           network=network)
        agent = agent_for(meta)(*vm.channels())
        vm.load_state(os.path.join(image_dir, STATE_FILE), ignore_shared=False)
    except BaseException as e:
        if agent is not None:
            agent.close()
        if vm is None:
            raise
        failure = vm.failure()
        vm.stop()
        raise CheckpointError(f"restoring the VM from {image_dir}: {e}; {failure}") from None
    finally:
        if memory_file:
            os.unlink(memory_file)  # QEMU has it mapped: the pages are its own from now on
    return vm, agent


def revive(sandbox, saved: dict, bundle, io: ProcessIO, host_pid: int) -> Container:
    """The host's record of a restored container: its init runs in the guest already."""
    container = Container(saved["id"], bundle, host_pid)
    container.rootfs_in_guest = True
    container.created = saved["created"]
    spec = m.ProcessSpec.from_wire(saved["init"])
    init = Process(container, spec, io)
    init.pid = saved["init_pid"]
    agent = sandbox.agent
    from ..vm.stdio import fd_sink
    from .stdio import discard_sink
    for seq, fd in ((spec.stdio, io.stdout), (spec.stderr, io.stderr)):
        if seq:
            agent.attach(seq, fd_sink(fd, io.owned) if fd >= 0 else discard_sink)
    container.init = init
    container.processes["init"] = init
    container.state.status = states.RUNNING
    init.state.status = states.RUNNING
    sandbox.containers[container.id] = container
    sandbox._pump_stdin(init)
    return container
