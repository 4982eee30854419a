"""The supervisor behind `runv-py containerd`: containers, processes, the event log.

Containers live in their shims (the same ones the CLI uses, under the daemon's state
dir), so the daemon holds no VM itself and can be stopped, killed and restarted without
losing one: at start it reads what it knew from the containerd dir, asks each shim's
state.json what happened meanwhile, and logs the exits it missed.
"""
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time

from .. import bundle as oci
from .. import cgroupfiles
from .. import lifecycle
from .. import state as st

log = logging.getLogger("runv_py.containerd")

WATCH_INTERVAL = 0.1


class SupervisorError(Exception):
    """An error with the gRPC status code it maps to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def not_found(message):
    return SupervisorError("NOT_FOUND", message)


class EventLog:
    """Events in memory and appended to events.log (newline-delimited JSON)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.events = []
        self.subscribers = []
        try:
            with open(path) as f:
                for line in f:
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut short by a crash
        except FileNotFoundError:
            pass
        self.file = open(path, "a")

    def append(self, kind: str, cid: str, pid: str = "", status: int = 0) -> dict:
        event = {"id": cid, "type": kind, "timestamp": time.time(), "pid": pid, "status": status}
        with self.lock:
            self.events.append(event)
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()
            for q in list(self.subscribers):
                q.put(event)
        log.info("event %s %s %s %s", kind, cid, pid, status)
        return event

    def subscribe(self, since: float = None, cid: str = ""):
        """(stored events after ``since``, a queue of the live ones)."""
        q = queue.Queue()
        with self.lock:
            stored = [] if since is None else [e for e in self.events if e["timestamp"] > since]
            self.subscribers.append(q)
        if cid:
            stored = [e for e in stored if e["id"] == cid]
        return stored, q

    def unsubscribe(self, q) -> None:
        with self.lock:
            if q in self.subscribers:
                self.subscribers.remove(q)

    def seen(self, cid: str, kind: str, pid: str = "") -> bool:
        with self.lock:
            return any(e["id"] == cid and e["type"] == kind and (not pid or e["pid"] == pid)
                       for e in self.events)

    def close(self) -> None:
        self.file.close()


class Supervisor:
    def __init__(self, state_root: str, containerd_dir: str, cli_args: list):
        self.root = state_root
        self.dir = containerd_dir
        self.cli_args = cli_args          # global flags handed to every runv-py call
        self.records = os.path.join(containerd_dir, "containers")
        os.makedirs(self.records, exist_ok=True)
        os.makedirs(state_root, exist_ok=True)
        self.events = EventLog(os.path.join(containerd_dir, "events.log"))
        self.lock = threading.RLock()
        self.containers = {}              # id -> record (bundle, labels, stdio, processes)
        self.known_exits = {}             # id -> exec ids whose exit is logged
        self.starting = set()             # (id, exec id) whose start is not logged yet
        self.stop = threading.Event()
        self.solo_done = False
        self.recover()
        threading.Thread(target=self.watch, name="watch", daemon=True).start()

    # ---- persistence ----------------------------------------------------------------

    def save(self, cid: str) -> None:
        path = os.path.join(self.records, cid + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.containers[cid], f)
        os.replace(path + ".tmp", path)

    def recover(self) -> None:
        for name in sorted(os.listdir(self.records)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.records, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            cid = record["id"]
            self.containers[cid] = record
            self.known_exits[cid] = {pid for pid in record.get("processes", {})
                                     if self.events.seen(cid, "exit", pid)}
        log.info("recovered %d containers", len(self.containers))

    # ---- watching the shims ---------------------------------------------------------

    def watch(self) -> None:
        while not self.stop.wait(WATCH_INTERVAL):
            for cid in list(self.containers):
                try:
                    self.check(cid)
                except Exception:
                    log.exception("watching %s", cid)

    def check(self, cid: str) -> None:
        try:
            record = st.read(self.root, cid)
        except st.NotFound:
            record = {"status": "stopped", "exit_status": 255}
        status = record.get("status")
        with self.lock:
            mine = self.containers.get(cid)
            if mine is None or mine.get("creating"):
                return
            for exec_id, code in (record.get("exec_exits") or {}).items():
                if (cid, exec_id) in self.starting:
                    continue  # its start-process event comes first; look again next round
                if exec_id not in self.known_exits.setdefault(cid, set()):
                    self.known_exits[cid].add(exec_id)
                    if not self.events.seen(cid, "exit", exec_id):
                        self.events.append("exit", cid, exec_id, int(code))
                    mine["processes"].pop(exec_id, None)
                    self.save(cid)
            if status == "stopped" and (cid, "init") not in self.starting:
                self.reap(cid, record)

    def reap(self, cid: str, record: dict) -> None:
        """The container's init exited: log it, remove the container and its VM."""
        mine = self.containers[cid]
        if not mine.get("exit_logged"):
            if record.get("oom_killed"):
                self.events.append("oom", cid, "init")
            self.events.append("exit", cid, "init", int(record.get("exit_status", 255)))
            mine["exit_logged"] = True
            self.save(cid)  # a daemon killed right here must not log the exit twice
        try:
            lifecycle.delete(self.root, cid, force=True)
        except (st.NotFound, lifecycle.LifecycleError, oci.BundleError):
            pass
        del self.containers[cid]
        self.known_exits.pop(cid, None)
        try:
            os.unlink(os.path.join(self.records, cid + ".json"))
        except FileNotFoundError:
            pass

    # ---- running runv-py ------------------------------------------------------------

    def cli(self, *args, timeout: float = 180) -> str:
        cmd = [sys.executable, "-m", "runv_py.cli", "--root", self.root, *self.cli_args, *args]
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout)
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().removeprefix("runv-py: ")
            raise SupervisorError(classify(message), message)
        return result.stdout.decode()

    # ---- operations -----------------------------------------------------------------

    def create(self, cid: str, bundle_path: str, stdio: tuple, labels: list, mode: str) -> dict:
        try:
            oci.check_id(cid)
        except oci.BundleError as e:
            raise SupervisorError("INVALID_ARGUMENT", str(e)) from None
        if mode == "start":
            with self.lock:
                if cid not in self.containers:
                    raise not_found(f"container {cid} does not exist")
            self.start(cid)
            return self.describe(cid)
        if mode not in ("", "create"):
            raise SupervisorError("INVALID_ARGUMENT", f"unknown mode {mode!r}")
        with self.lock:
            if cid in self.containers:
                raise SupervisorError("ALREADY_EXISTS", f"container {cid} already exists")
            self.containers[cid] = {"id": cid, "bundle": bundle_path, "labels": list(labels),
                                    "stdio": list(stdio), "processes": {}, "started": False,
                                    "creating": True}
        if not os.path.isdir(bundle_path):
            self.forget(cid)
            raise not_found(f"bundle {bundle_path} does not exist")
        for path in stdio:
            if path and not os.path.exists(path):
                self.forget(cid)
                raise SupervisorError("INVALID_ARGUMENT", f"stdio path {path} does not exist")
        try:
            self.cli("create", "-b", bundle_path, "--stdio", ",".join(stdio), cid)
        except SupervisorError:
            self.forget(cid)
            raise
        with self.lock:
            self.containers[cid].pop("creating", None)
            self.save(cid)
        if mode == "":
            self.start(cid)
        return self.describe(cid)

    def forget(self, cid: str) -> None:
        with self.lock:
            self.containers.pop(cid, None)

    def start(self, cid: str) -> None:
        with self.lock:
            self.starting.add((cid, "init"))
        try:
            lifecycle.start(self.root, cid)
        except (lifecycle.LifecycleError, st.NotFound) as e:
            with self.lock:
                self.starting.discard((cid, "init"))
            raise SupervisorError(classify(str(e)), str(e)) from None
        with self.lock:
            self.containers[cid]["started"] = True
            self.save(cid)
            # Logged before the watcher may log the exit of a process that ends at once.
            self.events.append("start-container", cid, "init")
            self.starting.discard((cid, "init"))

    def record(self, cid: str) -> dict:
        with self.lock:
            record = self.containers.get(cid)
            if record is None or record.get("creating"):
                raise not_found(f"container {cid} does not exist")
            return record

    def add_process(self, cid: str, pid_name: str, process: dict, stdio: tuple) -> int:
        record = self.record(cid)
        if not pid_name or pid_name == "init" or pid_name in record["processes"]:
            raise SupervisorError("ALREADY_EXISTS" if pid_name else "INVALID_ARGUMENT",
                                  f"process {pid_name!r} already exists or is invalid")
        for path in stdio:
            if path and not os.path.exists(path):
                raise SupervisorError("INVALID_ARGUMENT", f"stdio path {path} does not exist")
        spec_path = os.path.join(self.dir, f"process-{cid}-{pid_name}.json")
        with open(spec_path, "w") as f:
            json.dump(process, f)
        pid_file = spec_path + ".pid"
        with self.lock:
            self.starting.add((cid, pid_name))
        try:
            self.cli("exec", "-d", "--exec-id", pid_name, "--stdio", ",".join(stdio),
                     "--pid-file", pid_file, "-p", spec_path, cid)
            with open(pid_file) as f:
                holder = int(f.read())
        except BaseException:
            with self.lock:
                self.starting.discard((cid, pid_name))
            raise
        finally:
            for path in (spec_path, pid_file):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        with self.lock:
            record["processes"][pid_name] = {"args": process.get("args", []), "holder": holder,
                                             "stdio": list(stdio),
                                             "terminal": bool(process.get("terminal"))}
            self.save(cid)
            self.events.append("start-process", cid, pid_name)
            self.starting.discard((cid, pid_name))
        return holder

    def shim(self, cid: str, op: str, **args) -> dict:
        self.record(cid)
        try:
            return lifecycle.shim_op(self.root, cid, op, **args)
        except (lifecycle.LifecycleError, st.NotFound) as e:
            raise SupervisorError(classify(str(e)), str(e)) from None

    def signal(self, cid: str, pid_name: str, sig: int) -> None:
        if not 0 < sig < 65:
            raise SupervisorError("INVALID_ARGUMENT", f"invalid signal {sig}")
        record = self.record(cid)
        if pid_name not in ("", "init") and pid_name not in record["processes"]:
            raise not_found(f"process {pid_name} does not exist in container {cid}")
        self.shim(cid, "signal", exec_id=pid_name or "init", signal=sig)

    def update_process(self, cid: str, pid_name: str, close_stdin: bool, width: int,
                       height: int) -> None:
        record = self.record(cid)
        if pid_name not in ("", "init") and pid_name not in record["processes"]:
            raise not_found(f"process {pid_name} does not exist in container {cid}")
        if close_stdin:
            self.shim(cid, "close_stdin", exec_id=pid_name or "init")
        if width and height:
            self.shim(cid, "winsize", exec_id=pid_name or "init", rows=height, cols=width)

    def update(self, cid: str, status: str, memory: int, cpu_quota: int, cpu_period: int) -> None:
        self.record(cid)
        limits = cgroupfiles.limits({"memory": {"limit": memory},
                                     "cpu": {"quota": cpu_quota, "period": cpu_period}})
        if limits:
            self.shim(cid, "update", cgroup=limits)
        if status == "paused":
            self.shim(cid, "pause")
            self.events.append("pause", cid)
        elif status == "running":
            self.shim(cid, "resume")
            self.events.append("resume", cid)
        elif status:
            raise SupervisorError("INVALID_ARGUMENT", f"unknown status {status!r}")

    def stats(self, cid: str) -> dict:
        return self.shim(cid, "stats")["stats"]

    def describe(self, cid: str) -> dict:
        record = self.record(cid)
        try:
            state = st.read(self.root, cid)
        except st.NotFound:
            state = {"status": "stopped", "pid": 0}
        return {"id": cid, "bundle": record["bundle"], "labels": record["labels"],
                "status": state.get("status", "stopped"), "pid": state.get("pid", 0),
                "stdio": record["stdio"], "processes": dict(record["processes"])}

    def list(self, cid: str = "") -> list:
        with self.lock:
            ids = [c for c, r in self.containers.items() if not r.get("creating")]
        if cid:
            if cid not in ids:
                raise not_found(f"container {cid} does not exist")
            ids = [cid]
        out = []
        for c in sorted(ids):
            try:
                out.append(self.describe(c))
            except SupervisorError:
                continue
        return out

    def close(self) -> None:
        self.stop.set()
        self.events.close()


def classify(message: str) -> str:
    """The gRPC status code for an error message of the runtime."""
    text = message.lower()
    if "does not exist" in text or "not found" in text:
        return "NOT_FOUND"
    if "already exists" in text:
        return "ALREADY_EXISTS"
    if any(w in text for w in ("cannot start", "not running", "is stopped", "is running",
                               "is paused", "is created", "not stopped")):
        return "FAILED_PRECONDITION"
    if any(w in text for w in ("invalid", "must", "unknown", "config.json", "container id")):
        return "INVALID_ARGUMENT"
    return "INTERNAL"

