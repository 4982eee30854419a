"""The ``containerd.task.v2.Task`` service of containerd-shim-runvpy-v2.

The daemon owns its sandbox in-process, through the sandbox API: Create boots the VM
(from the factory its config names) and creates the container there; stdio are
containerd's FIFOs, read and written by the sandbox directly (a terminal is the guest's
own pty: its output is the stdout FIFO). Every failure leaves as the ttrpc status its
error code maps to (status.py).
"""
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from google.protobuf.message import DecodeError

from ..host import statedir
from ..hyperstart import states, syscalls
from ..hyperstart.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                 RunvError)
from ..oci import bundle as oci
from ..oci.bundle import check_id
from ..sandbox import VM_DIED_STATUS, Container, Process, Sandbox
from ..ttrpc import TtrpcError
from . import metrics, stdio
from .rootfs import mount_rootfs
from .config import ShimConfig
from .events import Publisher
from .pb import shimv2_pb2 as pb
from .status import ttrpc_error
from .pods import Pod
from .tasks import Task

log = logging.getLogger("runv_py.shimv2")

SERVICE = "containerd.task.v2.Task"
STATUS = {states.CREATING: pb.CREATED, states.CREATED: pb.CREATED, states.RUNNING: pb.RUNNING,
          states.PAUSED: pb.PAUSED, states.STOPPED: pb.STOPPED}
TASK_FILE = "task.json"      # the init's pid, for `delete` after a crash


def timestamp(field, when: float) -> None:
    if when:
        field.FromNanoseconds(int(when * 1e9))


# Calls whose id may be empty: they look nothing up by it and make nothing of it.
ID_OPTIONAL = ("Connect", "Shutdown")


def decode_request(name: str, kind, payload: bytes):
    """The request, its ids checked as the CLI checks container ids (they name files
    and directories) before anything uses them; InvalidArgument otherwise."""
    try:
        request = kind.FromString(payload)
    except DecodeError as e:
        raise InvalidArgument(f"{name}: cannot decode the request: {e}") from None
    if request.id or name not in ID_OPTIONAL:
        check_id(request.id)
    if getattr(request, "exec_id", ""):
        check_id(request.exec_id, "exec id")
    return request


class TaskService:
    def __init__(self, namespace: str, cid: str, bundle: str, ttrpc_address: str,
                 listener: socket.socket, config: ShimConfig, factory):
        self.namespace = namespace
        self.cid = cid
        self.bundle = bundle
        self.workdir = os.path.join(bundle, "runv", cid)
        self.listener = listener
        self.config = config
        self.factory = factory
        self.events = Publisher(ttrpc_address, namespace)
        self.lock = threading.Lock()
        self.pod = Pod(self.workdir, config, factory, self.on_exit)
        self.inits: Dict[str, Task] = {}              # container id -> its init task
        self.execs: Dict[Tuple[str, str], Task] = {}  # (container id, exec id) -> task
        self.shutdown = threading.Event()

    @property
    def sandbox(self) -> Optional[Sandbox]:
        return self.pod.sandbox

    def handlers(self) -> Dict[Tuple[str, str], Callable[[bytes], bytes]]:
        table = {
            "State": (pb.StateRequest, self.state), "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start), "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids), "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill), "Exec": (pb.ExecProcessRequest, self.exec),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update), "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats), "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown_call),
        }
        return {(SERVICE, name): self._wrap(name, kind, fn) for name, (kind, fn) in table.items()}

    def _wrap(self, name: str, kind, fn) -> Callable[[bytes], bytes]:
        def call(payload: bytes) -> bytes:
            try:
                request = decode_request(name, kind, payload)
            except InvalidArgument as e:
                log.info("%s: %s", name, e)
                raise ttrpc_error(e) from None
            log.debug("%s %s", name, str(request).replace("\n", " "))
            try:
                return fn(request).SerializeToString()
            except TtrpcError as e:
                log.info("%s: %s", name, e.message)
                raise
            except (RunvError, OSError, ValueError) as e:
                log.info("%s failed: %s", name, e)
                raise ttrpc_error(e) from None
        return call

    # ---- lookups --------------------------------------------------------------------

    def task(self, cid: str, exec_id: str = "") -> Task:
        task = self.execs.get((cid, exec_id)) if exec_id else self.inits.get(cid)
        if task is None:
            what = f"process {exec_id} in container {cid}" if exec_id else f"container {cid}"
            raise NotFound(f"{what} does not exist")
        return task

    # ---- Create / Start / Wait / State ----------------------------------------------

    def create(self, req) -> pb.CreateTaskResponse:
        with self.lock:
            if req.id in self.inits:
                raise AlreadyExists(f"container {req.id} already exists")
            mount_rootfs(req.bundle, list(req.rootfs))
            task = Task(req.id, "", req.stdin, req.stdout, req.stderr, req.terminal, req.bundle)
            try:
                bundle = oci.load(req.bundle)
                io = stdio.process_io(req.stdin, req.stdout, req.stderr, req.terminal,
                                      task.relays)
                # The task's pid is the VM's: CRI points a pod's containers' namespaces
                # at the sandbox task's pid, and the VM is what runs them all.
                container = self.pod.restore(req.id, bundle, req.checkpoint, io) \
                    if req.checkpoint else \
                    self.pod.create(req.id, bundle, io, lambda sandbox: sandbox.vm.pid)
                task.pid = container.host_pid
            except BaseException:
                task.finished(VM_DIED_STATUS)
                self.end_sandbox_if_empty()
                syscalls.unmount_below(os.path.join(req.bundle, "rootfs"))
                raise
            task.process, task.restored = container.init, bool(req.checkpoint)
            self.inits[req.id] = task
        with open(os.path.join(self.workdir, TASK_FILE), "w") as f:
            json.dump({"pid": task.pid}, f)
        self.events.publish("/tasks/create", pb.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=req.rootfs, pid=task.pid,
            io=pb.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal)))
        return pb.CreateTaskResponse(pid=task.pid)

    def on_exit(self, container: Container, proc: Process) -> None:
        """A process of the sandbox ended (its output has drained)."""
        if proc is container.init:
            if container.id == self.sandbox.id:  # the sandbox's own container: its VM goes
                threading.Thread(target=self.pod.end, name="end-vm", daemon=True).start()
            task = self.inits.get(container.id)
            if task is None or not task.finished(proc.exit.status, proc.exit.at):
                return
            if proc.exit.oom:
                self.events.publish("/tasks/oom", pb.TaskOOM(container_id=container.id))
        else:
            task = self.execs.get((container.id, proc.id))
            if task is None or not task.finished(proc.exit.status, proc.exit.at):
                return
        self.publish_exit(task)

    def publish_exit(self, task: Task) -> None:
        event = pb.TaskExit(container_id=task.cid, id=task.id, pid=task.pid,
                            exit_status=task.exit_status)
        timestamp(event.exited_at, task.exited_at)
        self.events.publish("/tasks/exit", event)

    def start(self, req) -> pb.StartResponse:
        task = self.task(req.id, req.exec_id)
        if req.exec_id:
            return pb.StartResponse(pid=self.start_exec(task))
        if not task.restored:  # a restored task runs from its Create on
            self.sandbox.start_container(req.id)
        self.events.publish("/tasks/start", pb.TaskStart(container_id=req.id, pid=task.pid))
        return pb.StartResponse(pid=task.pid)

    def wait(self, req) -> pb.WaitResponse:
        task = self.task(req.id, req.exec_id)
        task.done.wait()  # containerd's Wait blocks until the process exits
        response = pb.WaitResponse(exit_status=task.exit_status)
        timestamp(response.exited_at, task.exited_at)
        return response

    def state(self, req) -> pb.StateResponse:
        task = self.task(req.id, req.exec_id)
        status = task.status
        response = pb.StateResponse(
            id=req.exec_id or req.id, bundle=task.bundle, pid=task.pid, status=STATUS[status],
            stdin=task.stdin, stdout=task.stdout, stderr=task.stderr, terminal=task.terminal,
            exit_status=task.exit_status, exec_id=req.exec_id)
        timestamp(response.exited_at, task.exited_at)
        return response

    # ---- Kill / Delete ----------------------------------------------------------------

    def kill(self, req) -> pb.Empty:
        task = self.task(req.id, req.exec_id)
        if task.done.is_set():
            raise NotFound(f"process {task.id} already finished")
        if req.exec_id:
            if task.process is None:
                raise NotFound(f"process {req.exec_id} is not started")
            self.sandbox.signal(req.id, req.exec_id, req.signal)
        else:
            self.sandbox.kill(req.id, req.signal, req.all)
        return pb.Empty()

    def delete(self, req) -> pb.DeleteResponse:
        task = self.task(req.id, req.exec_id)
        if req.exec_id:
            if not task.done.is_set() and task.process is not None:
                raise FailedPrecondition(f"process {req.exec_id} is still running")
            task.finished(0)  # never started: release its waiters
            del self.execs[(req.id, req.exec_id)]
        else:
            if task.status in (states.RUNNING, states.PAUSED):
                raise FailedPrecondition(f"container {req.id} is still running")
            self.pod.remove(req.id)  # a created one is killed; poststop runs
            task.finished(VM_DIED_STATUS)
            with self.lock:
                del self.inits[req.id]
                for key in [k for k in self.execs if k[0] == req.id]:
                    del self.execs[key]
            syscalls.unmount_below(os.path.join(task.bundle, "rootfs"))
            self.end_sandbox_if_empty()
        response = pb.DeleteResponse(pid=task.pid, exit_status=task.exit_status)
        timestamp(response.exited_at, task.exited_at)
        if not req.exec_id:
            event = pb.TaskDelete(container_id=req.id, pid=task.pid, exit_status=task.exit_status)
            timestamp(event.exited_at, task.exited_at)
            self.events.publish("/tasks/delete", event)
        return response

    def end_sandbox_if_empty(self) -> None:
        if self.inits or self.sandbox is None and not os.path.exists(self.workdir):
            return
        self.pod.end()
        self.pod.sandbox = None
        statedir.remove(self.workdir)
        try:
            os.rmdir(os.path.dirname(self.workdir))
        except OSError:
            pass

    # ---- exec -------------------------------------------------------------------------

    def exec(self, req) -> pb.Empty:
        init = self.task(req.id)
        if init.done.is_set():
            raise FailedPrecondition(f"container {req.id} is not running")
        try:
            spec = json.loads(req.spec.value or b"{}")
            oci.check_process(spec)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"bad process spec: {e}") from None
        with self.lock:
            if (req.id, req.exec_id) in self.execs:
                raise AlreadyExists(f"process {req.exec_id} already exists")
            self.execs[(req.id, req.exec_id)] = Task(req.id, req.exec_id, req.stdin, req.stdout,
                                                     req.stderr, req.terminal, init.bundle, spec)
        self.events.publish("/tasks/exec-added",
                            pb.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return pb.Empty()

    def start_exec(self, task: Task) -> int:
        task.require_created("start")
        try:
            io = stdio.process_io(task.stdin, task.stdout, task.stderr, task.terminal,
                                  task.relays, task.stdin_closed)
            task.process = self.sandbox.exec(task.cid, task.exec_id,
                                             dict(task.spec, terminal=task.terminal), io)
        except BaseException:
            task.finished(255)  # containerd's client already waits on it
            raise
        task.pid = task.process.pid
        self.events.publish("/tasks/exec-started", pb.TaskExecStarted(
            container_id=task.cid, exec_id=task.exec_id, pid=task.pid))
        return task.pid

    # ---- the rest ---------------------------------------------------------------------

    def pids(self, req) -> pb.PidsResponse:
        self.task(req.id)
        procs = self.sandbox.processes(req.id)
        # Guest pids: the host has no process per container process.
        exec_ids = {t.pid: t.exec_id for (cid, _), t in list(self.execs.items())
                    if cid == req.id and t.pid}
        response = pb.PidsResponse()
        for info in procs:
            entry = response.processes.add(pid=info.pid)
            if info.pid in exec_ids:
                entry.info.type_url = "containerd.runc.v1.ProcessDetails"
                entry.info.value = pb.ProcessDetails(exec_id=exec_ids[info.pid]).SerializeToString()
        return response

    def pause(self, req) -> pb.Empty:
        self.task(req.id)
        self.sandbox.pause()
        self.events.publish("/tasks/paused", pb.TaskPaused(container_id=req.id))
        return pb.Empty()

    def resume(self, req) -> pb.Empty:
        self.task(req.id)
        self.sandbox.resume()
        self.events.publish("/tasks/resumed", pb.TaskResumed(container_id=req.id))
        return pb.Empty()

    def checkpoint(self, req) -> pb.Empty:
        """`ctr task checkpoint`: the VM saved in ``req.path`` (sandbox/checkpoint.py);
        containerd paused the task first and resumes it (the options are runc's)."""
        from ..sandbox import checkpoint
        self.task(req.id)
        if req.id != self.sandbox.id or len(self.inits) != 1:
            raise FailedPrecondition("a pod's VM holds other containers: it cannot be "
                                     "checkpointed for one of them")
        checkpoint.save_to_dir(self.sandbox, req.path, leave_running=True)
        return pb.Empty()

    def resize_pty(self, req) -> pb.Empty:
        task = self.task(req.id, req.exec_id)
        if not task.terminal:
            raise FailedPrecondition("the process has no terminal")
        self.sandbox.resize(req.id, req.exec_id, req.height, req.width)
        return pb.Empty()

    def close_io(self, req) -> pb.Empty:
        """The process's stdin ends with what the client wrote (the relay takes what
        the FIFO holds, then closes it): nothing is lost, as with runc's shim."""
        task = self.task(req.id, req.exec_id)
        if req.stdin:
            task.stdin_closed = True
            for relay in task.relays:
                relay.close_stdin()
        return pb.Empty()

    def update(self, req) -> pb.Empty:
        self.task(req.id)
        try:
            resources = json.loads(req.resources.value or b"{}")
        except (ValueError, RecursionError):
            raise InvalidArgument("resources are not OCI JSON") from None
        self.sandbox.update(req.id, resources)
        return pb.Empty()

    def stats(self, req) -> pb.StatsResponse:
        self.task(req.id)
        response = pb.StatsResponse()
        # The guest runs cgroup v2: containerd's v2 Metrics type, which ctr can decode.
        response.stats.type_url = metrics.TYPE_URL
        response.stats.value = metrics.metrics(self.sandbox.stats(req.id)).SerializeToString()
        return response

    def connect(self, req) -> pb.ConnectResponse:
        task = self.inits.get(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task.pid if task else 0,
                                  version="runv-py")

    def shutdown_call(self, req) -> pb.Empty:
        # As containerd's shims: keep serving while a task still lives.
        if self.inits and not req.now:
            return pb.Empty()
        threading.Thread(target=self.stop_serving, daemon=True).start()
        return pb.Empty()

    def stop_serving(self) -> None:
        time.sleep(0.1)  # let the Shutdown answer go out first
        self.pod.end()
        try:
            path = self.listener.getsockname()
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            if isinstance(path, str) and path:
                os.unlink(path)
        except OSError:
            pass
        self.shutdown.set()  # last: the daemon exits when it is set

    def wait_shutdown(self, timeout: float) -> None:
        self.events.drain(timeout)
