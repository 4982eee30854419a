"""The supervisor behind `runv-py containerd`: containers, processes, the event log.

Containers live in their per-sandbox shims (the ones the CLI uses, under the daemon's
state dir), reached through runv_py.shim's lifecycle functions, so the daemon holds no
VM itself and can be stopped, killed and restarted without losing one: at start it
reads what it knew from the containerd dir, asks each shim's record what happened
meanwhile, and logs the exits it missed.

A container's status is its shim's record (state.json), the one the CLI reads too; the
daemon's own entry holds only what the shim does not know: its id is taken while the
shim starts (not listed yet), and once its exit is logged the entry goes. A
container's lock is held while a start or exec is under way, so the watcher never logs
an exit before the start it follows.
"""
import json
import logging
import os
import threading

from ..hyperstart import states
from ..hyperstart.errors import AlreadyExists, InvalidArgument, NotFound, RunvError
from ..oci import bundle as oci
from ..shim import lifecycle
from ..shim import protocol as p
from ..shim.client import ShimClient
from ..shim.records import read as read_record
from .events import EventLog

log = logging.getLogger("runv_py.containerd02")

WATCH_INTERVAL = 0.1


class Entry:
    """What the daemon keeps of one container (persisted as containers/ID.json): what
    only the daemon knows (labels, stdio, processes, whether it logged the exit). The
    container's status is its shim's record, read where it is needed, never a copy."""

    def __init__(self, data: dict, creating: bool = False):
        data = dict(data)
        if data.pop("status", None) == states.STOPPED:
            data["exit_logged"] = True  # an entry written before the status went
        self.data = data
        self.creating = creating  # its id is taken, the shim not started yet: unlisted
        self.lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def exit_logged(self) -> bool:
        return bool(self.data.get("exit_logged"))

    def to_json(self) -> dict:
        return dict(self.data)


class Supervisor:
    def __init__(self, state_root: str, containerd_dir: str, shim_args: dict):
        self.root = state_root
        self.dir = containerd_dir
        self.shim_args = shim_args        # boot config, driver, factory: for every shim
        self.records = os.path.join(containerd_dir, "containers")
        os.makedirs(self.records, exist_ok=True)
        os.makedirs(state_root, exist_ok=True)
        self.events = EventLog(os.path.join(containerd_dir, "events.log"))
        self.lock = threading.RLock()
        self.containers = {}              # id -> Entry
        self.shims = set()                # pids of the shims we started (our children)
        self.stop = threading.Event()
        self.solo_done = False
        self.recover()
        threading.Thread(target=self.watch, name="watch", daemon=True).start()

    # ---- persistence ----------------------------------------------------------------

    def save(self, entry: Entry) -> None:
        path = os.path.join(self.records, entry.id + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(entry.to_json(), f)
        os.replace(path + ".tmp", path)

    def recover(self) -> None:
        for name in sorted(os.listdir(self.records)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.records, name)) as f:
                    entry = Entry(json.load(f))
            except (OSError, ValueError, KeyError, RunvError):
                continue
            self.containers[entry.id] = entry
        log.info("recovered %d containers", len(self.containers))

    # ---- watching the shims ---------------------------------------------------------

    def watch(self) -> None:
        while not self.stop.wait(WATCH_INTERVAL):
            for entry in list(self.containers.values()):
                if not entry.lock.acquire(blocking=False):
                    continue  # a start or exec is under way: look again next round
                try:
                    self.check(entry)
                except Exception:
                    log.exception("watching %s", entry.id)
                finally:
                    entry.lock.release()

    def check(self, entry: Entry) -> None:
        if entry.creating or entry.exit_logged:
            return
        try:
            record = read_record(self.root, entry.id)
            status, code, execs = record.status, record.exit_status, record.exec_exits
            oom = record.oom_killed
        except NotFound:
            status, code, execs, oom = states.STOPPED, 255, {}, False
        processes = entry.data["processes"]
        for exec_id, exit_code in execs.items():
            if exec_id in processes and not self.events.seen(entry.id, "exit", exec_id):
                self.events.append("exit", entry.id, exec_id, int(exit_code))
            if processes.pop(exec_id, None) is not None:
                self.save(entry)
        if status == states.STOPPED:
            self.reap(entry, code, oom)

    def reap(self, entry: Entry, code, oom: bool) -> None:
        """The container's init exited: log it, remove the container and its VM."""
        if not self.events.seen(entry.id, "exit", "init"):
            if oom:
                self.events.append("oom", entry.id, "init")
            self.events.append("exit", entry.id, "init", 255 if code is None else int(code))
        entry.data["exit_logged"] = True
        self.save(entry)  # a daemon killed right here must not log the exit twice
        try:
            lifecycle.delete(self.root, entry.id, force=True)
        except RunvError:
            pass
        with self.lock:
            self.containers.pop(entry.id, None)
        try:
            os.unlink(os.path.join(self.records, entry.id + ".json"))
        except FileNotFoundError:
            pass

    # ---- operations -----------------------------------------------------------------

    def entry(self, cid: str) -> Entry:
        with self.lock:
            entry = self.containers.get(cid)
        if entry is None or entry.creating:
            raise NotFound(f"container {cid} does not exist")
        return entry

    def create(self, cid: str, bundle_path: str, stdio: tuple, labels: list, mode: str) -> dict:
        oci.check_id(cid)
        if mode == "start":
            self.start(self.entry(cid))
            return self.describe(cid)
        if mode not in ("", "create"):
            raise InvalidArgument(f"unknown mode {mode!r}")
        with self.lock:
            if cid in self.containers:
                raise AlreadyExists(f"container {cid} already exists")
            entry = self.containers[cid] = Entry({
                "id": cid, "bundle": bundle_path, "labels": list(labels), "stdio": list(stdio),
                "processes": {}}, creating=True)
        try:
            if not os.path.isdir(bundle_path):
                raise NotFound(f"bundle {bundle_path} does not exist")
            self.shims.add(lifecycle.create(self.root, cid, bundle_path, stdio_paths=stdio,
                                            **self.shim_args))
        except BaseException:
            with self.lock:
                self.containers.pop(cid, None)
            raise
        with entry.lock:
            entry.creating = False
            self.save(entry)
        if mode == "":
            self.start(entry)
        return self.describe(cid)

    def start(self, entry: Entry) -> None:
        with entry.lock:
            lifecycle.start(self.root, entry.id)  # refused unless the record says created
            # Logged before the watcher may log the exit of a process that ends at once.
            self.events.append("start-container", entry.id, "init")

    def add_process(self, cid: str, name: str, process: dict, stdio: tuple) -> int:
        entry = self.entry(cid)
        if not name or name == "init":
            raise InvalidArgument(f"invalid process name {name!r}")
        with entry.lock:
            if name in entry.data["processes"]:
                raise AlreadyExists(f"process {name} already exists in container {cid}")
            record = read_record(self.root, cid)
            fds = lifecycle.open_stdio(stdio)
            try:
                reply, conn = ShimClient(record).open(
                    p.Exec(exec_id=name, process=process), fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            conn.close()  # the shim keeps the exit in its record; the watcher logs it
            entry.data["processes"][name] = {"args": process.get("args", []),
                                             "pid": reply.get("pid", 0), "stdio": list(stdio),
                                             "terminal": bool(process.get("terminal"))}
            self.save(entry)
            self.events.append("start-process", cid, name)
        return record.pid

    def shim(self, cid: str, req: p.Request) -> dict:
        self.entry(cid)
        return lifecycle.request(self.root, cid, req)

    def signal(self, cid: str, name: str, sig: int) -> None:
        if not 0 < sig < 65:
            raise InvalidArgument(f"invalid signal {sig}")
        self.process_name(cid, name)
        self.shim(cid, p.Signal(exec_id="" if name in ("", "init") else name, signal=sig))

    def process_name(self, cid: str, name: str) -> str:
        entry = self.entry(cid)
        if name not in ("", "init") and name not in entry.data["processes"]:
            raise NotFound(f"process {name} does not exist in container {cid}")
        return "" if name in ("", "init") else name

    def update_process(self, cid: str, name: str, close_stdin: bool, width: int,
                       height: int) -> None:
        exec_id = self.process_name(cid, name)
        if close_stdin:
            self.shim(cid, p.CloseStdin(exec_id=exec_id))
        if width and height:
            self.shim(cid, p.Winsize(exec_id=exec_id, rows=height, cols=width))

    def update(self, cid: str, status: str, memory: int, cpu_quota: int, cpu_period: int) -> None:
        self.entry(cid)
        if status not in ("", "paused", "running"):
            raise InvalidArgument(f"unknown status {status!r}")
        resources = {"memory": {"limit": memory}, "cpu": {"quota": cpu_quota, "period": cpu_period}}
        if memory or cpu_quota:
            self.shim(cid, p.Update(resources=resources))
        if status == "paused":
            self.shim(cid, p.Pause())
            self.events.append("pause", cid)
        elif status == "running":
            self.shim(cid, p.Resume())
            self.events.append("resume", cid)

    def stats(self, cid: str) -> dict:
        return self.shim(cid, p.Stats())["stats"]

    def describe(self, cid: str) -> dict:
        entry = self.entry(cid)
        try:
            record = read_record(self.root, cid)
            status, pid = record.status, record.pid
        except NotFound:
            status, pid = states.STOPPED, 0
        return {"id": cid, "bundle": entry.data["bundle"], "labels": entry.data["labels"],
                "status": str(status), "pid": pid, "stdio": entry.data["stdio"],
                "processes": dict(entry.data["processes"])}

    def list(self, cid: str = "") -> list:
        with self.lock:
            ids = [c for c, e in self.containers.items() if not e.creating]
        if cid:
            if cid not in ids:
                raise NotFound(f"container {cid} does not exist")
            ids = [cid]
        out = []
        for c in sorted(ids):
            try:
                out.append(self.describe(c))
            except NotFound:
                continue
        return out

    def close(self) -> None:
        self.stop.set()
        self.events.close()
