"""Lifecycle states of containers and processes, with guarded transitions.

One definition for every place that keeps a status: the guest agent's process model, the
host's sandbox, the per-sandbox shim, the shim v2 and the 0.2 daemon. The statuses are
the OCI runtime's (``creating``, ``created``, ``running``, ``stopped``) plus runc's
``paused``. A ``Status`` is a ``str`` (it is written to state.json and JSON messages as
itself) with a closed set of values, not an ``enum.Enum``: this module runs in the guest
too, where importing ``enum`` (and what it imports) costs boot time under TCG.
"""
from .errors import FailedPrecondition, InvalidArgument


class Status(str):
    """One of the lifecycle statuses below; ``Status.parse`` checks a value read back."""

    __slots__ = ()
    _values: dict = {}

    def __repr__(self) -> str:
        return f"Status.{self.upper()}"

    @classmethod
    def _define(cls, value: str) -> "Status":
        status = cls._values[value] = str.__new__(cls, value)
        return status

    @classmethod
    def parse(cls, value: str) -> "Status":
        try:
            return cls._values[value]
        except (KeyError, TypeError):
            raise InvalidArgument(f"unknown status {value!r}") from None


CREATING = Status._define("creating")
CREATED = Status._define("created")
RUNNING = Status._define("running")
PAUSED = Status._define("paused")
STOPPED = Status._define("stopped")
Status.CREATING, Status.CREATED, Status.RUNNING = CREATING, CREATED, RUNNING
Status.PAUSED, Status.STOPPED = PAUSED, STOPPED

# The moves a status may make. A paused container resumes to the status it was paused
# in (runc lets a created container be paused); stopped is final.
TRANSITIONS = {
    CREATING: (CREATED, STOPPED),
    CREATED: (RUNNING, PAUSED, STOPPED),
    RUNNING: (PAUSED, STOPPED),
    PAUSED: (RUNNING, CREATED, STOPPED),
    STOPPED: (),
}
# Statuses in which something still runs (or waits to) in the VM.
ALIVE = (CREATED, RUNNING, PAUSED)


class StateError(FailedPrecondition):
    """An operation asked of an object in a status that does not allow it."""

    def __init__(self, what: str, action: str, current: Status, required: tuple):
        wanted = " or ".join(required) if required else "nothing"
        super().__init__(f"cannot {action} {what}: it is {current} (needs {wanted})")
        self.what = what
        self.action = action
        self.current = current
        self.required = tuple(required)


class StateMachine:
    """The status of one container or process; every change goes through ``to``."""

    __slots__ = ("what", "status", "resume_to", "listeners")

    def __init__(self, what: str, status: Status = CREATED):
        self.what = what              # "container c1", "process exec-1 of c1"
        self.status = status
        self.resume_to = None         # the status a paused object goes back to
        self.listeners = []           # callables(old, new), told after each change

    def __repr__(self) -> str:
        return f"<{self.what}: {self.status}>"

    def is_(self, *statuses: Status) -> bool:
        return self.status in statuses

    def require(self, action: str, *statuses: Status) -> None:
        """Raise StateError unless the status is one of ``statuses``."""
        if self.status not in statuses:
            raise StateError(self.what, action, self.status, statuses)

    def to(self, new: Status, action: str = "") -> Status:
        """Move to ``new``; raises StateError if that move is not allowed. Returns the
        old status."""
        old = self.status
        if new not in TRANSITIONS[old]:
            raise StateError(self.what, action or f"make {new}", old,
                             tuple(s for s in TRANSITIONS if new in TRANSITIONS[s]))
        self.status = new
        if new != PAUSED:
            self.resume_to = None
        for listener in list(self.listeners):
            listener(old, new)
        return old

    def pause(self) -> None:
        self.require("pause", CREATED, RUNNING)
        resume_to = self.status
        self.to(PAUSED, "pause")
        self.resume_to = resume_to

    def resume(self) -> None:
        self.require("resume", PAUSED)
        self.to(self.resume_to or RUNNING, "resume")

    def stop(self) -> bool:
        """Move to stopped from wherever it is; False if it was stopped already."""
        if self.status == STOPPED:
            return False
        self.to(STOPPED, "stop")
        return True
