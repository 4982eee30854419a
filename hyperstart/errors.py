"""The one error root of runv-py, with codes that cross every process boundary.

Every error the runtime means to report is a ``RunvError`` whose class carries a code.
The code, not the text, travels: in the agent's ERROR frames, on the per-sandbox shim's
socket, and it is mapped to an exit status, a gRPC or a ttrpc status once, at each edge.
Nothing anywhere classifies an error by its message.

This module lives in ``hyperstart`` because the guest agent raises these errors too, and
the agent can import nothing but its own package and the standard library.
"""

NOT_FOUND = "NOT_FOUND"
ALREADY_EXISTS = "ALREADY_EXISTS"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
CODES = (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, UNAVAILABLE, INTERNAL)


class RunvError(Exception):
    """An error of the runtime, with the code its class names."""

    code = INTERNAL

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(RunvError):
    """No such container, process, sandbox, file or template."""
    code = NOT_FOUND


class AlreadyExists(RunvError):
    """An id that is taken."""
    code = ALREADY_EXISTS


class FailedPrecondition(RunvError):
    """The object is in the wrong state for the operation (see states.StateError)."""
    code = FAILED_PRECONDITION


class InvalidArgument(RunvError):
    """The request itself is wrong: a bad id, config.json, signal, process or option."""
    code = INVALID_ARGUMENT


class Unavailable(RunvError):
    """A peer is gone or not answering: the VM, its agent, a shim, QEMU."""
    code = UNAVAILABLE


class Internal(RunvError):
    """Something failed that the caller could not have prevented."""
    code = INTERNAL


_BY_CODE = {cls.code: cls for cls in (NotFound, AlreadyExists, FailedPrecondition,
                                        InvalidArgument, Unavailable, Internal)}


def from_code(code: str, message: str) -> RunvError:
    """The error a peer reported as ``code`` and ``message`` (unknown codes: Internal)."""
    return _BY_CODE.get(code, Internal)(message)


def code_of(error: BaseException) -> str:
    """The code of any exception: a RunvError's own, INTERNAL for anything else."""
    return error.code if isinstance(error, RunvError) else INTERNAL
