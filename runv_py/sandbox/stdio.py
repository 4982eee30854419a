"""A process's host stdio in the sandbox: closing what a failed call owned, once."""
import os
from typing import Optional

from .container import Process, ProcessIO


def discard_sink(data: bytes) -> None:
    """Where the output of a stream nobody reads goes."""


def close_io(io: ProcessIO) -> None:
    """Close the fds of ``io`` if they are the sandbox's (a call that owns them failed)."""
    if io.owned:
        for fd in {io.stdin, io.stdout, io.stderr} - {-1}:
            try:
                os.close(fd)
            except OSError:
                pass


def drop_io(agent, proc: Optional[Process], io: ProcessIO, stdin_pumped: bool) -> None:
    """A create failed: the fds it was given close, once (an output sink closes its own
    fd, which it may have done at end-of-file already; a pumped stdin closes at the
    pump's end-of-file)."""
    for seq in proc.seqs if proc is not None else ():
        sink = agent.sinks.get(seq)
        agent.attach(seq, discard_sink)
        if hasattr(sink, "close"):
            sink.close()
    if proc is None:
        close_io(io)
    elif not stdin_pumped and io.owned and io.stdin >= 0:
        close_io(ProcessIO(io.stdin, -1, -1))
