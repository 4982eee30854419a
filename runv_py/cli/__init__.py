"""The runv-py command line, shaped like runc's.

Tools call `state`, `list`, `kill`, `ps` and `events` in loops, so start-up counts. This
package imports only the standard library's ``os`` and ``sys`` when it loads; ``main``
hands those five commands, written the way click would parse them, to fast.py, which runs
them without importing click; everything else (and any of the five written some other
way: a help flag, an unknown option, a missing argument) goes to the click CLI in app.py,
which parses and reports exactly as it always has. Both run the same code for a command
(hot.py, the click commands in commands.py and more.py), with the global flags in the
same ``Options``. Each command imports what it needs, so none pays for QEMU, QMP or gRPC
modules. Containers are reached only through their shims (runv_py.shim); errors of the
runtime are mapped to runc's exit status 1 and its messages here, once, in
``runtime_errors``.
"""
import os
import sys


class Options:
    """The global flags, for the commands (``ctx.obj``)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def boot_config(self, cpus=None, memory=None) -> dict:
        """A BootConfig's fields (a plain dict: the dataclass lives with the VMs)."""
        return {"cpus": cpus or self.default_cpus, "memory_mib": memory or self.default_memory,
                "kernel": self.kernel, "initrd": self.initrd, "debug": self.debug,
                "share": self.share}


def make_options(kernel, initrd, driver, default_cpus, default_memory, root, debug, log_file,
                 log_format, share) -> Options:
    """The global flags' values as the commands see them (after logging is set up)."""
    return Options(kernel=kernel, initrd=initrd, driver=driver, default_cpus=default_cpus,
                   default_memory=default_memory, root=root, debug=debug,
                   log_file=os.path.abspath(log_file) if log_file else "",
                   log_format=log_format, share=share)


def setup_logging(debug: bool, log_file: str, log_format: str) -> None:
    """runc's --log and --log-format (see runv_py.logs)."""
    import logging

    from ..logs import handler
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if log_file else logging.WARNING,
                        handlers=[handler(log_file, log_format)])


def echo(message: str, err: bool = False) -> None:
    """``click.echo(message, err=err)``, without importing click where that writes plain
    text to a UTF-8 text stream (the common case, in which click does just this); click
    itself otherwise (ANSI escapes, which click strips from what is not a terminal;
    another encoding, for which click rewraps the stream)."""
    import io
    stream = sys.stderr if err else sys.stdout
    if (isinstance(stream, io.TextIOWrapper) and "\033" not in message
            and stream.encoding in ("utf-8", "UTF-8", "utf8") and stream.errors is not None):
        stream.write(message + "\n")
        stream.flush()
        return
    import click
    click.echo(message, err=err)


def fail(message: str, code: int = 1):
    if "logging" in sys.modules:  # else no handler can exist yet
        import logging
        if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
            # --log: the caller (go-runc) reads the reason there
            logging.getLogger("runv_py.cli").error("%s", message)
    echo(f"runv-py: {message}", err=True)
    sys.exit(code)


def runtime_errors(fn):
    """The edge of the CLI: any error of the runtime exits 1 with its message, as runc."""
    def wrapper(*args, **kwargs):
        from ..hyperstart.errors import RunvError
        try:
            return fn(*args, **kwargs)
        except RunvError as e:
            fail(str(e))
    # What functools.wraps copies (click takes the name and help), without importing
    # functools, and with it collections: the fast path's `state` comes through here.
    for name in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        setattr(wrapper, name, getattr(fn, name))
    wrapper.__dict__.update(fn.__dict__)
    wrapper.__wrapped__ = fn
    return wrapper


def main(args=None, **extra):
    """The `runv-py` command (the console script's entry point, and ``python3 -m
    runv_py.cli``): the fast path for the commands tools poll with, click for the rest.
    Keyword arguments are click's ``main``'s (they skip the fast path)."""
    if not extra:
        from .fast import dispatch
        dispatch(sys.argv[1:] if args is None else list(args))  # exits if it ran a command
    from .app import cli
    return cli(args, **extra)


def __getattr__(name):
    if name == "cli":  # the click group, loaded when it is asked for
        from .app import cli
        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
