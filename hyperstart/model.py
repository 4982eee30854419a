"""The agent's model of what it runs: containers and their processes, each with a
lifecycle state machine (states.py) and the plumbing of its stdio."""
from . import messages as m
from . import states


class Process:
    """A process the host asked for: its pipes, stream sequences and exit status."""

    def __init__(self, container: "Container", spec: m.ProcessSpec):
        self.container = container
        self.id = spec.id
        self.spec = spec
        self.state = states.StateMachine(f"process {spec.id} of {container.id}")
        self.terminal = spec.terminal
        self.seq_out = spec.stdio
        self.seq_err = spec.stderr
        self.pid = 0
        self.stdin_fd = -1        # pipe write end, or the pty master
        self.pty_master = -1
        self.out_fds = {}         # fd -> sequence number of its stream
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.status = None        # exit status once it has exited
        self.signal = 0           # the signal that ended it, if one did
        self.exited_at = 0.0
        self.eof_position = 0     # stream bytes that must be sent before the exit event
        self.start_gate = -1      # write end that releases a created-but-not-started init
        self.pty_channel = None   # socket on which the process sends its pty master
        self.forwarder = False    # a forwarded port's connection (FORWARDPORT), not a process

    @property
    def exited(self) -> bool:
        return self.status is not None

    def exit(self, status: int, when: float, signal: int = 0) -> None:
        self.status = status
        self.signal = signal
        self.exited_at = when
        self.state.stop()


class Container:
    def __init__(self, request: m.NewContainer, root: str):
        self.id = request.id
        self.request = request
        self.root = root
        self.state = states.StateMachine(f"container {request.id}")
        self.processes = {}       # process id -> Process
        self.init = None

    def process(self, process_id: str) -> Process:
        from .errors import NotFound
        proc = self.processes.get(process_id)
        if proc is None:
            raise NotFound(f"no process {process_id!r} in container {self.id}")
        return proc

    def root_path(self) -> str:
        """The container's root as the agent reaches it: through its init while that
        runs (the init pivoted into it), else the directory it was made from."""
        if self.init is not None and not self.init.exited:
            return f"/proc/{self.init.pid}/root"
        return self.root
