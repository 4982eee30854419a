"""The host's view of the containers and processes in a sandbox: their state machines,
where their stdio goes, and how they ended."""
import dataclasses
import threading
import time
from typing import Callable, Dict, List, Optional

from ..hyperstart import messages as m
from ..hyperstart import states
from ..hyperstart.errors import NotFound
from ..oci.bundle import Bundle

# The exit status of every process of a VM that stopped under it (guest panic, QEMU
# killed, sandbox destroyed): as if SIGKILLed.
VM_DIED_STATUS = 137


@dataclasses.dataclass
class ProcessIO:
    """Host file descriptors for a process's stdio. ``stdin`` is read until end-of-file
    into the process; its output is written to ``stdout`` (and ``stderr``, unless it has a
    terminal). With ``owned`` the sandbox closes each fd when its stream ends."""
    stdin: int = -1
    stdout: int = -1
    stderr: int = -1
    owned: bool = True


@dataclasses.dataclass
class Exit:
    status: int
    at: float                 # time.time() of the exit
    oom: bool = False
    signal: int = 0           # the signal that ended it (0: it exited)


class Process:
    """One process in a container: ``init`` or an exec'd one."""

    def __init__(self, container: "Container", spec: m.ProcessSpec, io: ProcessIO):
        self.container = container
        self.id = spec.id
        self.spec = spec
        self.io = io
        self.pid = 0              # in the guest
        self.state = states.StateMachine(f"process {spec.id} of {container.id}")
        self.exit: Optional[Exit] = None
        self.done = threading.Event()
        self.on_end: Optional[Callable[[], None]] = None   # a forwarded port's (ports.py)

    @property
    def seqs(self) -> tuple:
        return tuple(s for s in (self.spec.stdio, self.spec.stderr) if s)

    def finish(self, exit: Exit) -> bool:
        """Record the exit (once); False if it was recorded already."""
        if self.done.is_set():
            return False
        self.exit = exit
        self.state.stop()
        self.done.set()
        return True

    def wait(self, timeout: Optional[float] = None) -> Optional[Exit]:
        return self.exit if self.done.wait(timeout) else None


class Container:
    """A container of the sandbox: its bundle, its init and exec'd processes."""

    def __init__(self, cid: str, bundle: Bundle, host_pid: int):
        self.id = cid
        self.bundle = bundle
        self.host_pid = host_pid  # what runc's state JSON calls its pid
        self.state = states.StateMachine(f"container {cid}")
        self.state.status = states.CREATING
        self.created = time.time()
        self.init: Optional[Process] = None
        self.processes: Dict[str, Process] = {}
        self.mounts: List[str] = []   # host bind mounts into the share, innermost last
        self.volumes: List[str] = []  # keys of the sandbox's volumes it holds
        self.rootfs_in_guest = False  # its files copied into guest memory: checkpointable

    def process(self, exec_id: str = "") -> Process:
        proc = self.processes.get(exec_id or "init")
        if proc is None:
            raise NotFound(f"process {exec_id!r} does not exist in container {self.id}")
        return proc


Listener = Callable[[Container, Process], None]
