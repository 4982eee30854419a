"""The sandbox API: one VM and the containers in it.

Every entry point goes through this class: the per-sandbox shim (which the CLI and the
0.2 daemon reach over its socket), the shim v2 task service and the benchmarks. So the
order of things is the same everywhere: a container is created with its process held
at a start gate and the prestart, createRuntime and createContainer hooks run; start
runs the startContainer hooks, opens the gate, then runs poststart; removing a
container runs poststop. Processes end through the agent's exit events (after their
output has drained) or, all at once, when the VM stops.
"""
import logging
import os
import queue
import threading
import time
from typing import Dict, List, Optional

from ..hyperstart import messages as m
from ..hyperstart import states
from ..hyperstart.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..oci import hooks
from ..oci.bundle import Bundle, check_process
from ..oci.linux import container_fields
from ..oci.process import process_spec
from ..oci.resources import cgroup_limits
from ..oci.state import oci_state, rfc3339
from ..vm.boot import BootedVM
from ..vm.stdio import fd_sink, pump_stdin
from . import ports, share
from .container import VM_DIED_STATUS, Container, Exit, Listener, Process, ProcessIO
from .stats import ContainerStats, read_stats
from .stdio import close_io, discard_sink, drop_io

log = logging.getLogger("runv_py.sandbox")

STREAM_DRAIN_TIMEOUT = 2.0
THREAD_JOIN_TIMEOUT = 5.0     # destroy() waits this long for the sandbox's threads


class Sandbox:
    def __init__(self, sandbox_id: str, booted: BootedVM, network=None):
        self.id = sandbox_id
        self.network = network    # the pod's network (runv_py/net), if it has one
        self.booted = booted
        self.vm = booted.vm
        self.agent = booted.agent
        self.share_dir = booted.share_dir
        self.mount_ns = booted.mount_ns    # whose mount namespace the share lives in (0: ours)
        self.volumes = share.Volumes(self.share_dir, self.mount_ns)
        self.containers: Dict[str, Container] = {}
        self.lock = threading.RLock()
        self.listeners: List[Listener] = []   # told of each process exit, in order
        self.paused = False
        self.destroyed = False
        self.forwarder = None     # of ports to the guest's loopback (ports.py)
        self.cpus = booted.config.cpus               # online in the guest now
        self.memory_mib = booted.config.memory_mib
        self._exits: "queue.Queue" = queue.Queue()
        self.agent.event_callbacks.append(self._exits.put)
        self._threads = [threading.Thread(target=self._dispatch_exits, name="exits", daemon=True),
                         threading.Thread(target=self._watch_vm, name="vm-watch", daemon=True)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def boot(cls, sandbox_id: str, factory, config, workdir: str, hostname: str = "",
             network=None) -> "Sandbox":
        """A new sandbox in a VM from ``factory``, its agent told to start the pod, in
        the pod's ``network`` if it has one (it is the sandbox's from now on)."""
        try:
            booted = factory.get_vm(config, workdir, sandbox_id, network)
        except BaseException:
            if network is not None:
                network.detach()
            raise
        sandbox = cls(sandbox_id, booted, network)
        try:
            # No hostname asked for: the sandbox's id, as a clone or a cached VM has it.
            sandbox.agent.call(m.StartPod(hostname=hostname or sandbox_id[:63],
                                          share_tag=sandbox.vm.share_tag,
                                          share_kind=sandbox.vm.share_kind))
            if network is not None and sandbox.vm.network_in_guest:
                for msg in network.guest_setup():
                    sandbox.agent.call(msg)
            sandbox.forwarder = ports.serve(sandbox)
        except BaseException:
            sandbox.destroy()
            raise
        return sandbox

    def container(self, cid: str) -> Container:
        container = self.containers.get(cid)
        if container is None:
            raise NotFound(f"container {cid!r} does not exist")
        return container

    def state_of(self, container: Container) -> dict:
        """runc's state JSON of ``container``, as hooks get it on stdin."""
        bundle = container.bundle
        return oci_state(container.id, container.state.status, container.host_pid, bundle.path,
                         bundle.rootfs, rfc3339(container.created),
                         annotations=bundle.annotations)

    # ---- containers -----------------------------------------------------------------

    def create_container(self, cid: str, bundle: Bundle, io: ProcessIO, host_pid: int = 0,
                         console_size: Optional[tuple] = None, shared: dict = None,
                         rootfs_tree: int = -1, rootfs_in_guest: bool = False) -> Container:
        """Create ``cid`` from ``bundle`` with its init held until start_container; the
        namespaces in ``shared`` (type -> container id) are that container's. The rootfs
        is ``rootfs_tree`` if given (a detached mount, maybe from another namespace);
        ``rootfs_in_guest`` copies its files into guest memory (checkpoint.py)."""
        with self.lock:
            if cid in self.containers:
                close_io(io)  # ours from the call on, as exec's
                raise AlreadyExists(f"container {cid!r} already exists")
            container = self.containers[cid] = Container(cid, bundle, host_pid)
            container.rootfs_in_guest = rootfs_in_guest
        init, pumping = None, False
        try:
            rootfs = os.path.join(cid, "rootfs")
            share.bind(bundle.rootfs, os.path.join(self.share_dir, rootfs), self.mount_ns,
                       tree=rootfs_tree)
            container.mounts.append(os.path.join(self.share_dir, rootfs))
            mounts = share.guest_mounts(self.share_dir, cid, bundle.spec.get("mounts"),
                                        container.mounts, self.mount_ns, self.volumes,
                                        container.volumes)
            process = dict(bundle.process)
            if console_size and not process.get("consoleSize"):
                process["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
            init = self._new_process(container, process, "init", io)
            reply = self.agent.call(m.NewContainer(
                id=cid, rootfs=rootfs, process=init.spec, readonly=bundle.readonly,
                hostname=bundle.hostname, mounts=mounts, limits=cgroup_limits(bundle.resources),
                wait=True, share=dict(shared or {}), rootfs_in_guest=rootfs_in_guest,
                **container_fields(bundle.spec)))
            init.pid = reply.pid
            container.init = init
            container.state.to(states.CREATED, "create")
            self._pump_stdin(init)
            pumping = True
            state = self.state_of(container)
            for kind in (hooks.PRESTART, hooks.CREATE_RUNTIME, hooks.CREATE_CONTAINER):
                hooks.run_hooks(bundle.hooks, kind, state)
        except BaseException:
            self._discard(container)
            drop_io(self.agent, init, io, pumping)
            raise
        return container

    def start_container(self, cid: str) -> None:
        container = self.container(cid)
        container.state.require("start", states.CREATED)
        hooks.run_hooks(container.bundle.hooks, hooks.START_CONTAINER, self.state_of(container))
        with self.lock:  # the exit of an init that ends at once waits for this
            self.agent.call(m.StartContainer(container=cid))
            container.state.to(states.RUNNING, "start")
            if not container.init.done.is_set():
                container.init.state.to(states.RUNNING, "start")
        hooks.run_hooks(container.bundle.hooks, hooks.POSTSTART, self.state_of(container))

    def exec(self, cid: str, exec_id: str, process: dict, io: ProcessIO) -> Process:
        """Run ``process`` (OCI JSON) in the running container ``cid``; ``io`` is the
        sandbox's from now on, also when this fails."""
        try:
            container = self.container(cid)
            if not exec_id or exec_id == "init" or "/" in exec_id:
                raise InvalidArgument(f"invalid process id {exec_id!r}")
            check_process(process)
        except BaseException:
            close_io(io)
            raise
        with self.lock:  # the exit of a process that ends at once waits for this
            try:
                container.state.require("exec in", states.RUNNING)
                if exec_id in container.processes:
                    raise AlreadyExists(f"process {exec_id!r} already exists in container {cid}")
                proc = self._new_process(container, process, exec_id, io)
            except BaseException:
                close_io(io)
                raise
            try:
                proc.pid = self.agent.call(m.ExecCmd(container=cid, process=proc.spec)).pid
            except BaseException:
                container.processes.pop(exec_id, None)
                close_io(io)
                raise
            proc.state.to(states.RUNNING, "start")
        self._pump_stdin(proc)
        return proc

    def remove_container(self, cid: str) -> None:
        """Remove ``cid`` from the VM (killing what still runs) and run poststop."""
        container = self.container(cid)
        self._discard(container)
        hooks.run_hooks(container.bundle.hooks, hooks.POSTSTOP, self.state_of(container))

    # ---- processes ------------------------------------------------------------------

    def kill(self, cid: str, sig: int, all_processes: bool = False) -> None:
        container = self.container(cid)
        if self.paused and sig == 9 and len(self.alive_containers()) == 1:
            self.vm.stop()  # a frozen guest cannot take signals: end the VM
            return
        container.state.require("kill", states.CREATED, states.RUNNING)
        self.agent.call(m.KillContainer(container=cid, signal=sig, all=all_processes))

    def signal(self, cid: str, exec_id: str, sig: int) -> None:
        proc = self.container(cid).process(exec_id)
        proc.state.require("signal", states.CREATED, states.RUNNING)
        self.agent.call(m.SignalProcess(container=cid, process=proc.id, signal=sig))

    def wait(self, cid: str, exec_id: str = "", timeout: Optional[float] = None) -> Optional[Exit]:
        return self.container(cid).process(exec_id).wait(timeout)

    def resize(self, cid: str, exec_id: str, rows: int, cols: int) -> None:
        proc = self.container(cid).process(exec_id)
        if not proc.spec.terminal:
            raise FailedPrecondition(f"process {proc.id} of {cid} has no terminal")
        self.agent.call(m.WinSize(seq=proc.spec.stdio, row=rows, column=cols))

    def close_stdin(self, cid: str, exec_id: str = "") -> None:
        proc = self.container(cid).process(exec_id)
        if proc.spec.stdio and not proc.done.is_set():
            self.agent.close_stdin(proc.spec.stdio)

    def processes(self, cid: str) -> list:
        container = self.container(cid)
        container.state.require("list the processes of", states.CREATED, states.RUNNING)
        return self.agent.call(m.ProcessList(container=cid)).processes

    # ---- resources ------------------------------------------------------------------

    def stats(self, cid: str) -> ContainerStats:
        container = self.container(cid)
        container.state.require("read the stats of", states.CREATED, states.RUNNING)
        return read_stats(self.agent, cid)

    def update(self, cid: str, resources: dict) -> None:
        """New OCI resources, written into the container's cgroup in the guest."""
        from ..oci import schema
        schema.check(resources, schema.RESOURCES, "resources")  # from a client: typed first
        container = self.container(cid)
        container.state.require("update", states.CREATED, states.RUNNING, states.PAUSED)
        import base64
        for name, value in cgroup_limits(resources).items():
            self.agent.call(m.WriteFile(container=cid, file=name, cgroup=True,
                                        data=base64.b64encode(value.encode()).decode()))

    # ---- the VM ---------------------------------------------------------------------

    def grow(self, cpus: int, memory_mib: int) -> None:
        """Give the guest more CPUs or memory, up to what the VM was booted with room
        for (BootConfig.max_*): the agent onlines them (ONLINECPUMEM)."""
        config = self.booted.config
        cpus = min(max(cpus, self.cpus), max(config.cpus, config.max_cpus))
        memory_mib = min(max(memory_mib, self.memory_mib),
                         max(config.memory_mib, config.max_memory_mib))
        if (cpus, memory_mib) == (self.cpus, self.memory_mib):
            return
        self.agent.call(m.OnlineCpuMem(cpus=cpus, memory_mib=memory_mib))
        log.info("sandbox %s grew to %d cpus and %d MiB", self.id, cpus, memory_mib)
        self.cpus, self.memory_mib = cpus, memory_mib

    def alive_containers(self) -> list:
        return [c for c in self.containers.values() if c.state.is_(*states.ALIVE)]

    def pause(self) -> None:
        """Freeze the VM: every container in it is paused."""
        with self.lock:
            alive = self.alive_containers()
            for container in alive:
                container.state.require("pause", states.CREATED, states.RUNNING)
            self.vm.pause()
            self.paused = True
            for container in alive:
                container.state.pause()

    def resume(self) -> None:
        with self.lock:
            if not self.paused:
                raise FailedPrecondition(f"sandbox {self.id} is not paused")
            self.vm.resume()
            self.paused = False
            for container in self.containers.values():
                if container.state.is_(states.PAUSED):
                    container.state.resume()

    def destroy(self) -> None:
        """Stop the VM and undo the host bind mounts; safe to call twice."""
        with self.lock:
            if self.destroyed:
                return
            self.destroyed = True
        if self.forwarder is not None:
            self.forwarder.stop()
        self.booted.stop()
        if self.network is not None:
            self.network.detach()
        self._finish_all(VM_DIED_STATUS)
        for container in list(self.containers.values()):
            share.unbind(container.mounts, self.mount_ns)
        self.volumes.release_all()
        self.booted.release()  # a cache's directory for this VM
        self._exits.put(None)
        # Both end now (the queue's end, the agent closed); not from one of them, though
        # (a listener in the exits thread may destroy the sandbox).
        deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("sandbox %s: thread %s did not end", self.id, thread.name)

    # ---- internals ------------------------------------------------------------------

    def _new_process(self, container: Container, process: dict, exec_id: str,
                     io: ProcessIO) -> Process:
        """Stream sequences and sinks for a new process; registered in its container."""
        terminal = bool(process.get("terminal"))
        if terminal and io.owned and io.stderr not in (-1, io.stdin, io.stdout):
            os.close(io.stderr)  # a terminal's output is all on stdout
        if terminal:
            io.stderr = -1
        seq_out = self.agent.new_seq()
        seq_err = 0 if terminal else self.agent.new_seq()
        self.agent.attach(seq_out, fd_sink(io.stdout, io.owned) if io.stdout >= 0 else discard_sink)
        if seq_err:
            self.agent.attach(seq_err, fd_sink(io.stderr, io.owned) if io.stderr >= 0 else discard_sink)
        proc = Process(container, process_spec(process, exec_id, seq_out, seq_err), io)
        container.processes[exec_id] = proc
        return proc

    def _pump_stdin(self, proc: Process) -> None:
        # Only once the agent knows the stream: earlier input would be dropped.
        if proc.io.stdin >= 0:
            pump_stdin(self.agent, proc.spec.stdio, proc.io.stdin, close=proc.io.owned)
        else:
            self.agent.close_stdin(proc.spec.stdio)

    def _discard(self, container: Container) -> None:
        """Forget a container: out of the guest (if it got there), its binds undone."""
        if container.init is not None and not self.agent.closed.is_set():
            try:
                self.agent.call(m.RemoveContainer(container=container.id), timeout=30)
            except (NotFound, FailedPrecondition):
                pass
        with self.lock:
            for proc in container.processes.values():
                proc.finish(Exit(VM_DIED_STATUS, time.time()))
            if not container.state.is_(states.STOPPED):
                container.state.stop()
            self.containers.pop(container.id, None)
        share.unbind(container.mounts, self.mount_ns)
        self.volumes.release(container.volumes)

    def _dispatch_exits(self) -> None:
        while True:
            event = self._exits.get()
            if event is None:
                return
            container = self.containers.get(event.container)
            proc = container.processes.get(event.process) if container else None
            if proc is None:
                continue
            self.agent.wait_eof(proc.seqs, STREAM_DRAIN_TIMEOUT)
            self._finish(proc, Exit(event.status, time.time(), event.oom, event.signal))

    def _finish(self, proc: Process, exit: Exit) -> None:
        container = proc.container
        with self.lock:
            if not proc.finish(exit):
                return
            if proc.on_end is not None:  # a forwarded connection: nobody else's business
                container.processes.pop(proc.id, None)
            elif proc is container.init and not container.state.is_(states.STOPPED):
                container.state.stop()
        if proc.on_end is not None:
            return proc.on_end()
        for listener in list(self.listeners):
            try:
                listener(container, proc)
            except Exception:
                log.exception("exit listener failed")

    def _watch_vm(self) -> None:
        """The VM stopping (guest panic, QEMU killed) ends every process in it."""
        self.agent.closed.wait()
        if not self.destroyed:
            log.warning("the VM of sandbox %s stopped: %s", self.id, self.vm.failure())
        self._finish_all(VM_DIED_STATUS)

    def _finish_all(self, status: int) -> None:
        """Every process ends; exec'd ones first, so that a container's end is the last
        thing its listeners hear of it."""
        now = time.time()
        procs = [p for c in list(self.containers.values()) for p in list(c.processes.values())]
        for proc in sorted(procs, key=lambda p: p is p.container.init):
            self._finish(proc, Exit(status, now))

