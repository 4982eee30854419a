"""The 0.2 daemon's events: kept in memory, appended to events.log (newline-delimited
JSON, replayed at start) and sent to every subscriber."""
import json
import logging
import queue
import threading
import time

log = logging.getLogger("runv_py.containerd02")


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
