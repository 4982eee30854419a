"""`runv-py run` in the foreground: create the container (its shim takes our stdio, and
our terminal if the bundle asks for one), start it, forward our signals and terminal
size to it, wait for it, delete it. Its exit status is ours.

The shim dies with us (a parent-death signal): a `run` killed with SIGKILL takes its VM
along, as the in-process runs it replaced did.
"""
import os
import signal
import threading

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class RawTerminal:
    """Puts the host terminal in raw mode for a container with ``terminal: true``."""

    def __init__(self, fd: int = 0, enabled: bool = True):
        self.fd = fd
        self.enabled = enabled
        self.saved = None

    def __enter__(self):
        if self.enabled and os.isatty(self.fd):
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def run_foreground(root: str, cid: str, bundle_path: str, shim_args: dict,
                   restore_from: str = "") -> int:
    """Run the bundle's process to completion (or, ``restore_from`` a checkpoint, the
    restored one); returns its exit status."""
    from ..oci import bundle as oci
    from ..shim import lifecycle
    bundle = oci.load(bundle_path)
    created = False
    try:
        with RawTerminal(enabled=bundle.terminal and os.isatty(0)):
            pid = lifecycle.create(root, cid, bundle_path, tty_on_stdio=bundle.terminal,
                                   die_with_parent=True, restore_from=restore_from,
                                   **shim_args)
            created = True
            forward_signals(root, cid, bundle.terminal)
            if not restore_from:
                lifecycle.start(root, cid)
            status = wait_child(pid)
    finally:
        for sig in FORWARDED_SIGNALS + (signal.SIGWINCH,):
            signal.signal(sig, signal.SIG_DFL)
        if created:
            lifecycle.delete(root, cid, force=True)
    return status


def wait_child(pid: int) -> int:
    """The shim's exit status, which is its container's (a signal N reads as 128+N)."""
    _, status = os.waitpid(pid, 0)  # retried on EINTR by Python itself (PEP 475)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def forward_signals(root: str, cid: str, terminal: bool) -> None:
    from ..hyperstart.errors import RunvError
    from ..shim import lifecycle
    from ..shim import protocol as p
    from ..shim.terminal import terminal_size

    def later(req):
        def send():
            try:
                lifecycle.request(root, cid, req)
            except RunvError:
                pass  # the container may be exiting already
        threading.Thread(target=send, daemon=True).start()

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: later(p.Kill(signal=signum)))
    if terminal:
        def resize(_signum, _frame):
            size = terminal_size(0)
            if size:
                later(p.Winsize(rows=size[0], cols=size[1]))
        signal.signal(signal.SIGWINCH, resize)
