"""`runv-py containerd`: the gRPC daemon in the shape of runV's containerd (types.API).

Serves on a unix socket only root can use, with gRPC reflection and the standard health
service; a pid file keeps a second daemon away; SIGTERM, SIGINT and SIGQUIT stop it
cleanly while the containers live on in their shims.
"""
import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import timestamp_pb2

from ..host import statedir
from ..hyperstart import errors
from ..sandbox import ContainerStats
from . import api_pb2 as pb
from . import api_pb2_grpc as pb_grpc
from .supervisor import Supervisor

log = logging.getLogger("runv_py.containerd02")

VERSION = (0, 2, 0)
# The one place where runv-py's error codes become gRPC status codes.
GRPC_CODES = {
    errors.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    errors.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    errors.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    errors.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    errors.INTERNAL: grpc.StatusCode.INTERNAL,
}


def timestamp(seconds: float):
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def event_message(event: dict):
    return pb.Event(type=event["type"], id=event["id"], status=event.get("status", 0),
                    pid=event.get("pid", ""), timestamp=timestamp(event["timestamp"]))


def memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class API(pb_grpc.APIServicer):
    def __init__(self, supervisor: Supervisor, stopping: threading.Event):
        self.sup = supervisor
        self.stopping = stopping

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except errors.RunvError as e:
            context.abort(GRPC_CODES[e.code], str(e))

    def GetServerVersion(self, request, context):
        return pb.GetServerVersionResponse(major=VERSION[0], minor=VERSION[1], patch=VERSION[2],
                                           revision="runv-py")

    def CreateContainer(self, request, context):
        stdio = (request.stdin, request.stdout, request.stderr)
        info = self._call(context, self.sup.create, request.id, request.bundlePath, stdio,
                          list(request.labels), request.mode)
        return pb.CreateContainerResponse(container=self.container(info))

    def Signal(self, request, context):
        self._call(context, self.sup.signal, request.id, request.pid, request.signal)
        return pb.SignalResponse()

    def AddProcess(self, request, context):
        process = {"args": list(request.args), "env": list(request.env), "cwd": request.cwd or "/",
                   "terminal": request.terminal, "noNewPrivileges": request.noNewPrivileges,
                   "user": {"uid": request.user.uid, "gid": request.user.gid,
                            "additionalGids": list(request.user.additionalGids)},
                   "rlimits": [{"type": r.type, "soft": r.soft, "hard": r.hard}
                               for r in request.rlimits]}
        if not process["args"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "args must not be empty")
        holder = self._call(context, self.sup.add_process, request.id, request.pid, process,
                            (request.stdin, request.stdout, request.stderr))
        return pb.AddProcessResponse(systemPid=holder)

    def UpdateProcess(self, request, context):
        self._call(context, self.sup.update_process, request.id, request.pid, request.closeStdin,
                   request.width, request.height)
        return pb.UpdateProcessResponse()

    def UpdateContainer(self, request, context):
        r = request.resources
        self._call(context, self.sup.update, request.id, request.status, r.memoryLimit,
                   r.cpuQuota, r.cpuPeriod)
        return pb.UpdateContainerResponse()

    def State(self, request, context):
        infos = self._call(context, self.sup.list, request.id)
        return pb.StateResponse(containers=[self.container(i) for i in infos],
                                machine=pb.Machine(cpus=os.cpu_count() or 1, memory=memory_bytes()))

    def Stats(self, request, context):
        st = ContainerStats.from_json(self._call(context, self.sup.stats, request.id))
        stats = pb.CgroupStats(
            cpu_stats=pb.CpuStats(cpu_usage=pb.CpuUsage(
                total_usage=st.cpu.get("usage_usec", 0) * 1000,
                usage_in_usermode=st.cpu.get("user_usec", 0) * 1000,
                usage_in_kernelmode=st.cpu.get("system_usec", 0) * 1000),
                throttling_data=pb.ThrottlingData(periods=st.cpu.get("nr_periods", 0),
                                                  throttled_periods=st.cpu.get("nr_throttled", 0),
                                                  throttled_time=st.cpu.get("throttled_usec", 0) * 1000)),
            memory_stats=pb.MemoryStats(cache=st.memory.get("file", 0), usage=pb.MemoryData(
                usage=st.memory_usage, limit=st.memory_limit or 0,
                failcnt=st.memory_events.get("oom_kill", 0)), stats=st.memory),
            pids_stats=pb.PidsStats(current=st.pids, limit=st.pids_limit or 0))
        return pb.StatsResponse(cgroup_stats=stats, timestamp=timestamp(time.time()))

    def Events(self, request, context):
        since = None
        if request.HasField("timestamp"):
            since = request.timestamp.ToNanoseconds() / 1e9
        stored, q = self.sup.events.subscribe(since, request.id)
        try:
            for event in stored:
                yield event_message(event)
            if request.storedOnly:
                return
            while context.is_active() and not self.stopping.is_set():
                try:
                    event = q.get(timeout=0.5)
                except Exception:
                    continue
                if not request.id or event["id"] == request.id:
                    yield event_message(event)
        finally:
            self.sup.events.unsubscribe(q)

    def container(self, info: dict):
        processes = [pb.Process(pid="init", systemPid=info.get("pid", 0),
                                stdin=info["stdio"][0] if info["stdio"] else "",
                                stdout=info["stdio"][1] if info["stdio"] else "",
                                stderr=info["stdio"][2] if info["stdio"] else "")]
        for name, p in sorted(info["processes"].items()):
            processes.append(pb.Process(pid=name, args=p["args"], systemPid=p.get("holder", 0),
                                        terminal=p.get("terminal", False)))
        return pb.Container(id=info["id"], bundlePath=info["bundle"], status=info["status"],
                            labels=info["labels"], processes=processes, runtime="runv-py",
                            pids=[info.get("pid", 0)] if info.get("pid") else [])


class PidFile:
    """The daemon's pid file, with the rule dockerd used for containerd: a file naming a
    live daemon refuses the start, a stale one is replaced."""

    def __init__(self, path: str):
        self.path = path

    def acquire(self) -> None:
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and self._is_daemon(pid):
            raise SystemExit(f"runv-py: a containerd daemon (pid {pid}) already runs with "
                             f"pid file {self.path}")
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, self.path)

    @staticmethod
    def _is_daemon(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"containerd" in f.read()
        except OSError:
            return False

    def release(self) -> None:
        try:
            with open(self.path) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(self.path)
        except OSError:
            pass


def reap_children(stop: threading.Event, shims: set = frozenset()) -> None:
    """Collect the shims this daemon started (``shims``, its own children, by pid) once
    they exit, and nothing else: the status of any other child (a hook, nsenter) belongs
    to the subprocess call that waits for it, and waitpid on "any zombie" would steal it."""
    while not stop.wait(0.5):
        for pid in list(shims):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # reaped already (subprocess's own clean-up does, too)
            if done:
                shims.discard(pid)


def serve(shim_args: dict, state_dir: str, containerd_dir: str, listen: str,
          solo_namespaced: bool = False) -> int:
    os.makedirs(containerd_dir, mode=0o700, exist_ok=True)
    pid_file = PidFile(os.path.join(containerd_dir, "containerd.pid"))
    pid_file.acquire()
    stopping = threading.Event()
    supervisor = Supervisor(state_dir, containerd_dir, shim_args)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_APIServicer_to_server(API(supervisor, stopping), server)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("types.API", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["API"].full_name, reflection.SERVICE_NAME,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    if os.path.exists(listen):
        os.unlink(listen)
    old_umask = os.umask(0o077)  # the socket is root's alone from its first moment
    try:
        server.add_insecure_port(f"unix:{listen}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(listen, 0o600)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, lambda *_: stopping.set())
    threading.Thread(target=reap_children, args=(stopping, supervisor.shims), daemon=True).start()
    if solo_namespaced:
        threading.Thread(target=watch_solo, args=(supervisor, stopping), daemon=True).start()
    log.info("runv-py containerd listening on %s", listen)
    while not stopping.wait(0.5):
        pass
    server.stop(grace=1).wait(5)
    supervisor.close()
    pid_file.release()
    if solo_namespaced and supervisor.solo_done:
        # The thread that logged the last exit may still be writing its record: a file
        # written meanwhile leaves the directory behind, so try again for a while.
        deadline = time.monotonic() + 5
        statedir.remove(containerd_dir)
        while os.path.exists(containerd_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
            statedir.remove(containerd_dir)
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass
    return 0


def watch_solo(supervisor: Supervisor, stopping: threading.Event) -> None:
    """--solo-namespaced: once containers have run and the last one has exited, stop."""
    _stored, q = supervisor.events.subscribe()
    running = set(supervisor.containers)
    seen_any = bool(running)
    while not stopping.is_set():
        try:
            event = q.get(timeout=0.5)
        except Exception:
            continue
        if event["type"] == "start-container":
            running.add(event["id"])
            seen_any = True
        elif event["type"] == "exit" and event["pid"] == "init":
            running.discard(event["id"])
        if seen_any and not running:
            supervisor.solo_done = True
            stopping.set()
