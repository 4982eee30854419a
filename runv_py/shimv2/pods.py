"""Kubernetes pods as containerd's CRI plugin describes them in the specs' annotations:
which container is the sandbox (the pause container), which sandbox a container joins,
how big the pod is. One VM per pod: the sandbox container boots it, with room to grow
as the pod's containers come (ONLINECPUMEM)."""
import os
import threading
from typing import TYPE_CHECKING

from ..hyperstart.errors import FailedPrecondition, InvalidArgument
from ..oci.linux import shared_namespaces
from ..oci.resources import VM_MEMORY_OVERHEAD_MIB, asked, vm_size
from .start import CONTAINER_TYPE, sandbox_of

if TYPE_CHECKING:
    from ..sandbox import Container

SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
# How much a pod's VM may grow past its size at boot.
GROW_MEMORY_MIB = 1024
MAX_CPUS = 16


def number(annotations: dict, name: str) -> int:
    """A CRI annotation's integer (0 if absent); InvalidArgument if it is not one."""
    value = annotations.get(name) or 0
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"annotation {name} must be an integer, not {value!r}") from None


def sandbox_size(spec: dict, annotations: dict, cpus: int, memory_mib: int) -> dict:
    """BootConfig fields for a pod's VM: the pod's resources (CRI's sandbox annotations)
    if kubelet gave them, else the sandbox container's; plus room to grow for a pod."""
    resources = (spec.get("linux") or {}).get("resources") or {}
    pod = {}
    memory, quota = number(annotations, SANDBOX_MEMORY), number(annotations, SANDBOX_CPU_QUOTA)
    if memory > 0:
        pod["memory"] = {"limit": memory}
    if quota > 0:
        pod["cpu"] = {"quota": quota, "period": number(annotations, SANDBOX_CPU_PERIOD) or 100000}
    cpus, memory_mib = vm_size(pod or resources, cpus, memory_mib)
    if annotations.get(CONTAINER_TYPE) != "sandbox":
        return {"cpus": cpus, "memory_mib": memory_mib}
    return with_room_to_grow({"cpus": cpus, "memory_mib": memory_mib})


def with_room_to_grow(shape: dict) -> dict:
    """A pod VM's shape: ``shape`` (cpus, memory_mib) with the room its containers may
    grow it into. The node factory is told it too, to keep pod VMs ready."""
    return dict(shape, max_cpus=max(shape["cpus"], min(MAX_CPUS, os.cpu_count() or 1)),
                max_memory_mib=shape["memory_mib"] + GROW_MEMORY_MIB)


class Pod:
    """The shim v2's VM: booted for the first (sandbox) container, in its host cgroup
    and its network, sized for the pod; a pod's other containers join it, and it grows
    for their limits. One daemon, one Pod, one VM."""

    def __init__(self, workdir: str, config, factory, on_exit):
        self.workdir = workdir
        self.config = config          # shimv2.config.ShimConfig
        self.factory = factory
        self.on_exit = on_exit
        self.sandbox = None
        self.cgroup = None            # the sandbox's host cgroup (cgroupsPath)
        self.left_cgroups = []        # where this daemon was before joining it
        self.needs = {}               # container id -> (cpus, MiB) of its limits
        self.lock = threading.Lock()
        self.ending = threading.Lock()  # end() runs once at a time, to its end

    def create(self, cid: str, bundle, io, host_pid_of) -> "Container":
        """Create ``cid`` in the pod's VM (booting it for the sandbox container); ``io``
        is the pod's from now on, also when this fails."""
        from ..sandbox import close_io
        try:
            joins = sandbox_of(bundle.annotations)
            if self.sandbox is None:
                if joins:
                    raise FailedPrecondition(f"sandbox {joins} of container {cid} is not running")
                self.sandbox = self.boot(cid, bundle)
            elif joins != self.sandbox.id:
                raise FailedPrecondition(f"container {cid} is not in pod {self.sandbox.id}")
            self.needs[cid] = asked(bundle.resources)
            self.grow()
        except BaseException:
            close_io(io)
            raise
        shared = {kind: self.sandbox.id for kind in shared_namespaces(bundle.spec)} if joins else {}
        from ..sandbox import checkpoint
        return self.sandbox.create_container(cid, bundle, io, host_pid=host_pid_of(self.sandbox),
                                             shared=shared,
                                             rootfs_in_guest=checkpoint.wanted(bundle, self.sandbox))

    def restore(self, cid: str, bundle, image_dir: str, io) -> "Container":
        """``cid`` restored from a checkpoint (containerd's CreateTaskRequest.checkpoint)
        into a VM of its own; ``io`` is the pod's from now on, also when this fails."""
        from ..drivers import probe
        from ..net import network_for
        from ..sandbox import Sandbox, checkpoint, close_io
        from ..vm.boot import BootConfig
        try:
            if self.sandbox is not None or sandbox_of(bundle.annotations):
                raise FailedPrecondition("a checkpoint is restored into a VM of its own, "
                                         "not into a running pod")
            config = BootConfig(**self.config.boot_config())
            meta = checkpoint.read(image_dir, config)
            size = meta["config"]
            self.join_host_cgroup(bundle, size["max_memory_mib"] or size["memory_mib"])
            os.makedirs(self.workdir, exist_ok=True)
        except BaseException:
            close_io(io)
            raise
        self.sandbox = checkpoint.restore(Sandbox, cid, probe(self.config.driver), meta,
                                          image_dir, config, self.workdir,
                                          network_for(bundle.spec), bundle, io, 0)
        self.sandbox.listeners.append(self.on_exit)
        if self.cgroup is not None:
            self.cgroup.pin(self.sandbox.vm)
        container = self.sandbox.container(cid)
        container.host_pid = self.sandbox.vm.pid
        self.needs[cid] = asked(bundle.resources)
        return container

    def boot(self, cid: str, bundle):
        from ..net import network_for
        from ..sandbox import Sandbox
        from ..vm.boot import BootConfig
        size = sandbox_size(bundle.spec, bundle.annotations, self.config.default_cpus,
                            self.config.default_memory)
        config = BootConfig(**dict(self.config.boot_config(), **size))
        self.join_host_cgroup(bundle, config.max_memory_mib or config.memory_mib)
        os.makedirs(self.workdir, exist_ok=True)
        sandbox = Sandbox.boot(cid, self.factory, config, self.workdir, bundle.hostname,
                               network=network_for(bundle.spec))
        sandbox.listeners.append(self.on_exit)
        if self.cgroup is not None:
            self.cgroup.pin(sandbox.vm)
        return sandbox

    def grow(self) -> None:
        """The VM as big as its containers' limits together (plus the guest's own)."""
        cpus = max([1] + [c for c, _ in self.needs.values()])
        memory = sum(mib for _, mib in self.needs.values()) + VM_MEMORY_OVERHEAD_MIB
        if cpus > self.sandbox.cpus or memory > self.sandbox.memory_mib:
            self.sandbox.grow(cpus, memory)

    def remove(self, cid: str) -> None:
        self.needs.pop(cid, None)
        if self.sandbox is not None:
            self.sandbox.remove_container(cid)

    def join_host_cgroup(self, bundle, vm_memory_mib: int) -> None:
        """The pod's host cgroup (the sandbox's cgroupsPath) holds this daemon and so the
        VM; its limits are the pod's plus the VM's overhead."""
        if not bundle.cgroups_path:
            return
        from ..host.cgroups import HostCgroup
        self.cgroup = HostCgroup.for_path(bundle.cgroups_path)
        self.left_cgroups = self.cgroup.enter(bundle.resources, vm_memory_mib)

    def end(self) -> None:
        """Stop the VM; leave the host cgroup (back where this daemon was) and remove it.
        Safe to call twice, and from two threads (the sandbox's exit, a Delete, the
        Shutdown): a second call returns once the first is done, so the daemon never
        exits (after Shutdown's call) with the cgroup still to remove."""
        with self.ending:
            with self.lock:
                sandbox, cgroup, self.cgroup = self.sandbox, self.cgroup, None
            if sandbox is not None:
                sandbox.destroy()
            if cgroup is not None:
                from ..host.cgroups import HostCgroup
                HostCgroup.rejoin(self.left_cgroups)
                cgroup.remove()
