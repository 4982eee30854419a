"""The ``containerd.task.v2.Task`` service of containerd-shim-runvpy-v2.

One daemon serves one task (the VM container) and its exec'd processes. The container is
run by runv-py's own per-container shim (runv_py/shim.py), forked by this daemon: its exit
status is the task's, and requests go to it over its JSON socket, as the CLI does.
"""
import itertools
import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from . import lifecycle
from . import state as st
from . import cgroupfiles, statedir
from .cgroupfiles import MAX_UINT64
from .shimv2_pb import shimv2_pb2 as pb
from .shimv2_console import Console
from .shimv2_events import Publisher
from .shimv2_stdio import open_stdio
from .ttrpc import (ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND,
                    UNIMPLEMENTED, UNKNOWN, TtrpcError)

log = logging.getLogger("runv_py.shimv2")

SERVICE = "containerd.task.v2.Task"
VM_DIED_STATUS = 137
STATUS = {"created": pb.CREATED, "running": pb.RUNNING, "paused": pb.PAUSED,
          "stopped": pb.STOPPED}


class Proc:
    """The init process or one exec'd process, as containerd sees it."""

    def __init__(self, exec_id: str, stdin: str, stdout: str, stderr: str, terminal: bool):
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.pid = 0
        self.status = "created"
        self.exit_status = 0
        self.exited_at = 0.0
        self.done = threading.Event()
        self.spec: dict = {}
        self.console: Optional[Console] = None
        self.relays: list = []  # StdinRelay: the stdin FIFO copied into the process

    def exited(self, status: int) -> None:
        for relay in self.relays:
            relay.stop()
        if self.console is not None:
            self.console.finish()  # the terminal's last output reaches the FIFO first
        self.exit_status = status
        self.exited_at = time.time()
        self.status = "stopped"
        self.done.set()


def timestamp(field, when: float) -> None:
    if when:
        field.FromNanoseconds(int(when * 1e9))


class TaskService:
    def __init__(self, namespace: str, cid: str, bundle: str, ttrpc_address: str,
                 listener: socket.socket):
        self.namespace = namespace
        self.cid = cid
        self.bundle = bundle
        self.root = os.path.join(bundle, "runv")
        self.listener = listener
        # Console sockets live next to the shim's socket: bundle paths can be too long.
        self.console_base = listener.getsockname() or os.path.join(bundle, "console")
        self.consoles = itertools.count(1)  # next() is atomic under the GIL
        self.events = Publisher(ttrpc_address, namespace)
        self.lock = threading.Lock()
        self.init: Optional[Proc] = None
        self.execs: Dict[str, Proc] = {}
        self.deleted = False
        self.shutdown = threading.Event()
        self.main_jobs: "queue.Queue" = queue.Queue()

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
            request = kind.FromString(payload)
            log.debug("%s %s", name, str(request).replace("\n", " "))
            try:
                return fn(request).SerializeToString()
            except TtrpcError as e:
                log.info("%s: %s", name, e.message)
                raise
            except (lifecycle.LifecycleError, st.NotFound, ValueError, OSError) as e:
                log.warning("%s failed: %s", name, e)
                raise TtrpcError(UNKNOWN, str(e)) from None
        return call

    # ---- helpers --------------------------------------------------------------------

    def proc(self, exec_id: str) -> Proc:
        if not exec_id:
            if self.init is None:
                raise TtrpcError(NOT_FOUND, f"container {self.cid} is not created")
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise TtrpcError(NOT_FOUND, f"process {exec_id} does not exist in {self.cid}")
        return p

    def record(self) -> dict:
        return st.read(self.root, self.cid)

    def record_status(self) -> str:
        try:
            return self.record().get("status", "")
        except st.NotFound:
            return ""

    def request(self, message: dict) -> dict:
        return lifecycle.simple_request(self.record(), message)

    # ---- Create / Start / Wait / State ----------------------------------------------

    def create(self, req) -> pb.CreateTaskResponse:
        from . import bundle as oci
        from . import shim
        from .factory import BOOT_TIMEOUT, BootConfig
        with self.lock:
            if self.init is not None:
                raise TtrpcError(ALREADY_EXISTS, f"task {req.id} already exists")
            if req.checkpoint:
                raise TtrpcError(UNIMPLEMENTED, "runv-py cannot restore checkpoints")
            mount_rootfs(req.bundle, list(req.rootfs))
            try:
                spec = oci.load(req.bundle)
                console, stdio = None, (req.stdin, req.stdout, req.stderr)
                if req.terminal:
                    console = self.new_console(req.stdin, req.stdout)
                    stdio = ("", "", "")
                config = BootConfig(kernel=os.environ.get("RUNV_KERNEL", BootConfig.kernel),
                                    initrd=os.environ.get("RUNV_INITRD", BootConfig.initrd))
                path = statedir.create(self.root, self.cid)
                relays = []
                fds = open_stdio(stdio, relays)
                try:
                    pid = self.on_main(lambda: shim.spawn(
                        self.cid, path, spec, lifecycle.sized_config(spec, config),
                        os.environ.get("RUNV_DRIVER", ""), console.path if console else "",
                        BOOT_TIMEOUT + 30, None, fds))
                except BaseException:
                    statedir.remove(path)
                    for relay in relays:
                        relay.stop()
                    if console:
                        console.finish()
                    raise
                finally:
                    for fd in fds:
                        os.close(fd)
            except (oci.BundleError, shim.ShimError) as e:
                unmount(os.path.join(req.bundle, "rootfs"))
                raise TtrpcError(INVALID_ARGUMENT if isinstance(e, oci.BundleError) else UNKNOWN,
                                 str(e)) from None
            except BaseException:
                unmount(os.path.join(req.bundle, "rootfs"))
                raise
            p = Proc("", req.stdin, req.stdout, req.stderr, req.terminal)
            p.pid = pid
            p.console = console
            p.relays = relays
            self.init = p
        threading.Thread(target=self.reap_init, args=(p,), name="reap", daemon=True).start()
        self.events.publish("/tasks/create", pb.TaskCreate(
            container_id=self.cid, bundle=req.bundle, rootfs=req.rootfs, pid=pid,
            io=pb.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal)))
        return pb.CreateTaskResponse(pid=pid)

    def reap_init(self, p: Proc) -> None:
        """The runv-py shim is our child and exits with the container's status."""
        try:
            _, status = os.waitpid(p.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
        except ChildProcessError:
            code = VM_DIED_STATUS
        log.info("container %s exited with %d", self.cid, code)
        # Exec'd processes die with the VM: their waiters must hear it first.
        for e in list(self.execs.values()):
            if not e.done.is_set() and e.status == "running":
                e.done.wait(2.0)
                if not e.done.is_set():
                    e.exited(VM_DIED_STATUS)
                    self.publish_exit(e)
        if self.record_oom():
            self.events.publish("/tasks/oom", pb.TaskOOM(container_id=self.cid))
        p.exited(code)
        self.publish_exit(p)

    def record_oom(self) -> bool:
        """The guest agent reports an OOM kill with the exit; the runv-py shim records it."""
        try:
            return bool(self.record().get("oom_killed"))
        except st.NotFound:
            return False

    def publish_exit(self, p: Proc) -> None:
        event = pb.TaskExit(container_id=self.cid, id=p.exec_id or self.cid, pid=p.pid,
                            exit_status=p.exit_status)
        timestamp(event.exited_at, p.exited_at)
        self.events.publish("/tasks/exit", event)

    def start(self, req) -> pb.StartResponse:
        p = self.proc(req.exec_id)
        if not req.exec_id:
            if p.done.is_set() or p.status != "created":
                raise TtrpcError(FAILED_PRECONDITION, f"container {self.cid} is {p.status}")
            lifecycle.start(self.root, self.cid)
            p.status = "running"
            self.events.publish("/tasks/start", pb.TaskStart(container_id=self.cid, pid=p.pid))
            return pb.StartResponse(pid=p.pid)
        return pb.StartResponse(pid=self.start_exec(p))

    def wait(self, req) -> pb.WaitResponse:
        p = self.proc(req.exec_id)
        p.done.wait()  # containerd's Wait blocks until the process exits
        response = pb.WaitResponse(exit_status=p.exit_status)
        timestamp(response.exited_at, p.exited_at)
        return response

    def state(self, req) -> pb.StateResponse:
        p = self.proc(req.exec_id)
        status = p.status
        if not req.exec_id and not p.done.is_set():
            try:
                # "stopped" only once the exit is reaped, so that Wait and Delete agree.
                status = self.record().get("status", status)
                status = "running" if status == "stopped" else status
            except st.NotFound:
                pass
        response = pb.StateResponse(
            id=req.exec_id or self.cid, bundle=self.bundle, pid=p.pid, status=STATUS[status],
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status, exec_id=req.exec_id)
        timestamp(response.exited_at, p.exited_at)
        return response

    # ---- Kill / Delete ----------------------------------------------------------------

    def kill(self, req) -> pb.Empty:
        p = self.proc(req.exec_id)
        if p.done.is_set():
            raise TtrpcError(NOT_FOUND, f"process {req.exec_id or self.cid} already finished")
        if req.exec_id:
            if p.status == "created":
                raise TtrpcError(NOT_FOUND, f"process {req.exec_id} is not started")
            self.request({"op": "signal", "exec_id": req.exec_id, "signal": req.signal})
        else:
            self.request({"op": "kill", "signal": req.signal, "all": req.all})
        return pb.Empty()

    def delete(self, req) -> pb.DeleteResponse:
        p = self.proc(req.exec_id)
        if req.exec_id:
            if not p.done.is_set() and p.status != "created":
                raise TtrpcError(FAILED_PRECONDITION, f"process {req.exec_id} is still running")
            if not p.done.is_set():
                p.exited(0)  # never started: release its waiters
            del self.execs[req.exec_id]
        else:
            if self.record_status() == "stopped":
                p.done.wait(3.0)  # the exit is being reaped right now
            if not p.done.is_set():
                if p.status != "created":
                    raise TtrpcError(FAILED_PRECONDITION, f"container {self.cid} is still running")
                lifecycle.kill_shim(self.record())  # a task deleted before it started
                p.done.wait(10.0)
            self.cleanup()
        response = pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status)
        timestamp(response.exited_at, p.exited_at)
        if not req.exec_id:
            event = pb.TaskDelete(container_id=self.cid, pid=p.pid, exit_status=p.exit_status)
            timestamp(event.exited_at, p.exited_at)
            self.events.publish("/tasks/delete", event)
        return response

    def cleanup(self) -> None:
        with self.lock:
            if self.deleted:
                return
            self.deleted = True
            path = statedir.container_dir(self.root, self.cid)
            statedir.remove(path)
            try:
                os.rmdir(self.root)
            except OSError:
                pass
            unmount(os.path.join(self.bundle, "rootfs"))

    # ---- exec -------------------------------------------------------------------------

    def exec(self, req) -> pb.Empty:
        from . import bundle as oci
        if self.init is None or self.init.done.is_set():
            raise TtrpcError(FAILED_PRECONDITION, f"container {self.cid} is not running")
        try:
            spec = json.loads(req.spec.value or b"{}")
            oci.check_process(spec)
        except (ValueError, oci.BundleError) as e:
            raise TtrpcError(INVALID_ARGUMENT, f"bad process spec: {e}") from None
        with self.lock:
            if req.exec_id in self.execs:
                raise TtrpcError(ALREADY_EXISTS, f"process {req.exec_id} already exists")
            p = Proc(req.exec_id, req.stdin, req.stdout, req.stderr, req.terminal)
            p.spec = spec
            self.execs[req.exec_id] = p
        self.events.publish("/tasks/exec-added",
                            pb.TaskExecAdded(container_id=self.cid, exec_id=req.exec_id))
        return pb.Empty()

    def start_exec(self, p: Proc) -> int:
        if p.status != "created":
            raise TtrpcError(FAILED_PRECONDITION, f"process {p.exec_id} is {p.status}")
        request = {"op": "exec", "process": dict(p.spec, terminal=p.terminal),
                   "exec_id": p.exec_id}
        fds = ()
        if p.terminal:
            p.console = self.new_console(p.stdin, p.stdout)
            request["console_socket"] = p.console.path
        else:
            fds = open_stdio((p.stdin, p.stdout, p.stderr), p.relays)
        try:
            reply, conn = lifecycle.shim_request(self.record(), request, fds=fds)
        except BaseException:
            # containerd's client already waits on it (Wait comes before Start).
            p.exited(255)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        p.pid = int(reply.get("pid") or 0)
        p.status = "running"
        threading.Thread(target=self.reap_exec, args=(p, conn), daemon=True).start()
        self.events.publish("/tasks/exec-started", pb.TaskExecStarted(
            container_id=self.cid, exec_id=p.exec_id, pid=p.pid))
        return p.pid

    def new_console(self, stdin: str, stdout: str) -> Console:
        return Console(f"{self.console_base}.c{next(self.consoles)}", stdin, stdout)

    def reap_exec(self, p: Proc, conn) -> None:
        conn.settimeout(None)
        final = lifecycle.read_line(conn)
        conn.close()
        if p.done.is_set():
            return
        p.exited(int(final["exit"]) if final and "exit" in final else VM_DIED_STATUS)
        self.publish_exit(p)

    # ---- the rest ---------------------------------------------------------------------

    def pids(self, req) -> pb.PidsResponse:
        try:
            procs = self.request({"op": "ps"})["processes"]
        except lifecycle.LifecycleError as e:
            raise TtrpcError(FAILED_PRECONDITION, str(e)) from None
        # Guest pids: the host has no process per container process.
        exec_ids = {e.pid: e.exec_id for e in list(self.execs.values()) if e.pid}
        response = pb.PidsResponse()
        for x in procs:
            info = response.processes.add(pid=int(x["pid"]))
            if int(x["pid"]) in exec_ids:
                info.info.type_url = "containerd.runc.v1.ProcessDetails"
                info.info.value = pb.ProcessDetails(
                    exec_id=exec_ids[int(x["pid"])]).SerializeToString()
        return response

    def pause(self, req) -> pb.Empty:
        lifecycle.pause(self.root, self.cid)
        self.events.publish("/tasks/paused", pb.TaskPaused(container_id=self.cid))
        return pb.Empty()

    def resume(self, req) -> pb.Empty:
        lifecycle.resume(self.root, self.cid)
        self.events.publish("/tasks/resumed", pb.TaskResumed(container_id=self.cid))
        return pb.Empty()

    def checkpoint(self, req) -> pb.Empty:
        raise TtrpcError(UNIMPLEMENTED, "runv-py cannot checkpoint a VM container")

    def resize_pty(self, req) -> pb.Empty:
        p = self.proc(req.exec_id)
        if not p.terminal:
            raise TtrpcError(FAILED_PRECONDITION, "the process has no terminal")
        self.request({"op": "winsize", "exec_id": req.exec_id or "init",
                      "rows": req.height, "cols": req.width})
        return pb.Empty()

    def close_io(self, req) -> pb.Empty:
        self.proc(req.exec_id)
        if req.stdin:
            self.request({"op": "close_stdin", "exec_id": req.exec_id or "init"})
        return pb.Empty()

    def update(self, req) -> pb.Empty:
        try:
            resources = json.loads(req.resources.value or b"{}")
        except ValueError:
            raise TtrpcError(INVALID_ARGUMENT, "resources are not OCI JSON") from None
        self.request({"op": "update", "cgroup": cgroupfiles.limits(resources)})
        return pb.Empty()

    def stats(self, req) -> pb.StatsResponse:
        stats = self.request({"op": "stats"}).get("stats", {})
        response = pb.StatsResponse()
        # The guest runs cgroup v2: containerd's v2 Metrics type, which ctr can decode.
        response.stats.type_url = "io.containerd.cgroups.v2.Metrics"
        response.stats.value = guest_metrics(stats).SerializeToString()
        return response

    def connect(self, req) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(),
                                  task_pid=self.init.pid if self.init else 0,
                                  version="runv-py")

    def shutdown_call(self, req) -> pb.Empty:
        # As containerd's shims: keep serving while the task still lives.
        if self.init is not None and not self.deleted and not req.now:
            return pb.Empty()
        threading.Thread(target=self.stop_serving, daemon=True).start()
        return pb.Empty()

    def stop_serving(self) -> None:
        time.sleep(0.1)  # let the Shutdown answer go out first
        if self.init is not None and not self.init.done.is_set():
            try:
                lifecycle.kill_shim(self.record())
            except Exception:
                pass
        self.shutdown.set()
        try:
            path = self.listener.getsockname()
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            if isinstance(path, str) and path:
                os.unlink(path)
        except OSError:
            pass

    def run_main_jobs(self) -> None:
        """Run on_main() jobs on the main thread until Shutdown."""
        while not self.shutdown.is_set():
            try:
                fn, box, done = self.main_jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                box.append((fn(), None))
            except BaseException as e:
                box.append((None, e))
            done.set()

    def on_main(self, fn: Callable):
        """fn() on the main thread (forks there carry a parent-death signal that lasts
        as long as the daemon); its result or exception comes back here."""
        if threading.current_thread() is threading.main_thread():
            return fn()
        box, done = [], threading.Event()
        self.main_jobs.put((fn, box, done))
        done.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def wait_shutdown(self, timeout: float) -> None:
        self.events.drain(timeout)


def guest_metrics(files: Dict[str, str]) -> "pb.Metrics":
    """Metrics from the guest's cgroup v2 files (name -> text)."""
    cpu = cgroupfiles.table(files.get("cpu.stat", ""))
    mem = cgroupfiles.table(files.get("memory.stat", ""))
    metrics = pb.Metrics()
    metrics.pids.current = cgroupfiles.number(files.get("pids.current", ""))
    metrics.pids.limit = cgroupfiles.number(files.get("pids.max", ""), MAX_UINT64)
    for name in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                 "throttled_usec"):
        setattr(metrics.cpu, name, cpu.get(name, 0))
    for name in ("anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped",
                 "file_dirty", "file_writeback", "pgfault", "pgmajfault"):
        setattr(metrics.memory, name, mem.get(name, 0))
    metrics.memory.usage = cgroupfiles.number(files.get("memory.current", ""))
    metrics.memory.usage_limit = cgroupfiles.number(files.get("memory.max", ""), MAX_UINT64)
    return metrics


def mount_rootfs(bundle: str, mounts: list) -> None:
    """containerd's rootfs Mount list (an overlay from the image's snapshot) on
    <bundle>/rootfs; with no mounts the rootfs is already in place."""
    target = os.path.join(bundle, "rootfs")
    for m in mounts:
        os.makedirs(target, exist_ok=True)
        args = ["mount", "-t", m.type or "none"]
        if m.options:
            args += ["-o", ",".join(m.options)]
        result = subprocess.run(args + [m.source, target], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            unmount(target)
            raise TtrpcError(UNKNOWN, f"cannot mount the rootfs ({m.type}): {result.stderr.strip()}")


def unmount(target: str) -> None:
    from .hyperstart import syscalls
    for _ in range(8):
        if not os.path.ismount(target):
            return
        try:
            syscalls.umount(target, syscalls.MNT_DETACH)
        except OSError as e:
            log.warning("cannot unmount %s: %s", target, e)
            return
