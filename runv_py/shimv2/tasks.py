"""containerd's tasks as the shim v2 keeps them: a container's init, or one of its execs.

containerd creates an exec in one call and starts it in another, and Waits on it in
between: a Task exists (status created) before its process does in the sandbox."""
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
        self.state = states.StateMachine(f"process {exec_id or 'init'} of {cid}")
        self.process: Optional[Process] = None
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0.0
        self.done = threading.Event()
        self.relays: list = []    # StdinRelay: the stdin FIFO copied into the process

    @property
    def id(self) -> str:
        return self.exec_id or self.cid

    def finished(self, status: int, at: float = 0.0) -> bool:
        """Record the end (once); False if it had ended already."""
        if self.done.is_set():
            return False
        for relay in self.relays:
            relay.stop()
        self.exit_status = status
        self.exited_at = at or time.time()
        self.state.stop()
        self.done.set()
        return True
