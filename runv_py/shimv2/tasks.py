"""containerd's tasks as the shim v2 keeps them: a container's init, or one of its execs.

containerd creates an exec in one call and starts it in another, and Waits on it in
between: a Task exists (status created) before its process does in the sandbox. A
task's status is the sandbox's (its container's for an init, its process's for an
exec), not a copy; the task keeps only how it ended, which a task that never got a
process (never started, or its start failed) has too."""
import threading
import time
from typing import Optional

from ..hyperstart import states
from ..sandbox import Process


class Task:
    def __init__(self, cid: str, exec_id: str, stdin: str, stdout: str, stderr: str,
                 terminal: bool, bundle: str = "", spec: Optional[dict] = None):
        self.cid = cid
        self.bundle = bundle
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.spec = spec or {}    # an exec's OCI process
        self.process: Optional[Process] = None
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0.0
        self.done = threading.Event()
        self.relays: list = []    # StdinRelay: the stdin FIFO copied into the process
        self.restored = False      # Create restored it from a checkpoint: it runs
        self.stdin_closed = False  # CloseIO came (maybe before the process started)

    @property
    def id(self) -> str:
        return self.exec_id or self.cid

    @property
    def status(self) -> states.Status:
        if self.done.is_set():
            return states.STOPPED
        if self.process is None:
            return states.CREATED
        status = (self.process.state if self.exec_id else self.process.container.state).status
        return states.RUNNING if status == states.STOPPED else status  # being reaped

    def require_created(self, action: str) -> None:
        if self.status != states.CREATED:
            raise states.StateError(f"process {self.id} of {self.cid}", action, self.status,
                                    (states.CREATED,))

    def finished(self, status: int, at: float = 0.0) -> bool:
        """Record the end (once); False if it had ended already."""
        if self.done.is_set():
            return False
        for relay in self.relays:
            relay.stop()
        self.exit_status = status
        self.exited_at = at or time.time()
        self.done.set()
        return True
