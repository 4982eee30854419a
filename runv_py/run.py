"""`runv-py run` in the foreground: boot, run the container, wire stdio, tear down."""
import logging
import os
import signal
import sys
import threading

from . import bundle as oci
from . import statedir
from .agent_client import AgentError, fd_sink, pump_stdin
from .drivers import DriverError, probe
from .factory import BootConfig, boot_one
from .sandbox import Sandbox, private_mount_namespace

log = logging.getLogger("runv_py.run")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class RunError(Exception):
    """The container could not be run; the text says why."""


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


def terminal_size(fd: int = 0):
    """(rows, columns) of the terminal on ``fd``; None if unknown (a 0x0 pty too)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return (size.lines, size.columns) if size.lines and size.columns else None


def run(bundle_path: str, cid: str, root: str, config: BootConfig, driver_name: str = "",
        factory_policy=None, template_dir: str = "") -> int:
    """Run the bundle's process to completion; returns its exit status."""
    cid = oci.check_id(cid)
    bundle = oci.load(bundle_path)
    from .lifecycle import sized_config
    config = sized_config(bundle, config)
    driver = probe(driver_name)
    state = statedir.create(root, cid)
    sandbox = None
    try:
        private_mount_namespace()
        booted = boot_one(driver, config, state, cid, factory_policy, template_dir)
        sandbox = Sandbox(cid, booted)
        sandbox.start_pod(bundle.hostname)
        agent = sandbox.agent
        terminal = bundle.terminal and os.isatty(0)
        seq_out = agent.new_seq()
        seq_err = 0 if bundle.terminal else agent.new_seq()
        agent.attach(seq_out, fd_sink(1))
        if seq_err:
            agent.attach(seq_err, fd_sink(2))
        process = oci.process_message(bundle.process, "init", seq_out, seq_err)
        if terminal and not process["consoleSize"]:
            size = terminal_size()
            if size:
                process["consoleSize"] = {"height": size[0], "width": size[1]}
        sandbox.create_container(cid, bundle, process)
        with RawTerminal(enabled=terminal):
            pump_stdin(agent, seq_out, 0, close=False)
            install_signal_forwarding(sandbox, cid, seq_out if terminal else 0)
            event = agent.wait_exit(cid, "init", (seq_out, seq_err))
        if event is None:
            raise RunError(f"the VM stopped before the container exited: {sandbox.vm.failure()}")
        return int(event["status"])
    except (DriverError, oci.BundleError, AgentError) as e:
        raise RunError(str(e)) from None
    finally:
        for sig in FORWARDED_SIGNALS + (signal.SIGWINCH,):
            signal.signal(sig, signal.SIG_DFL)
        if sandbox is not None:
            sandbox.destroy()
        statedir.remove(state)


def install_signal_forwarding(sandbox: Sandbox, cid: str, tty_seq: int) -> None:
    def forward(signum, _frame):
        threading.Thread(target=_safe, args=(sandbox.kill, cid, signum), daemon=True).start()

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    if tty_seq:
        def resize(_signum, _frame):
            size = terminal_size()
            if size:
                threading.Thread(target=_safe, args=(sandbox.winsize, tty_seq, *size),
                                 daemon=True).start()
        signal.signal(signal.SIGWINCH, resize)


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # the container may be exiting already
        print(f"runv-py: {e}", file=sys.stderr)
