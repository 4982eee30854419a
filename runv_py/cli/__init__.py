"""The runv-py command line, shaped like runc's.

Only click is imported at start-up; each command imports what it needs, so `state` or
`list` do not pay for QEMU, QMP or gRPC modules. Containers are reached only through
their shims (runv_py.shim); errors of the runtime are mapped to runc's exit status 1 and
its messages here, once, in ``runtime_errors``.
"""
import functools
import logging
import os
import sys

import click

from .. import __version__, paths
from .manage import factory_options, manage

log = logging.getLogger("runv_py.cli")


class Options:
    """The global flags, for the commands (``ctx.obj``)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def boot_config(self, cpus=None, memory=None) -> dict:
        """A BootConfig's fields (a plain dict: the dataclass lives with the VMs)."""
        return {"cpus": cpus or self.default_cpus, "memory_mib": memory or self.default_memory,
                "kernel": self.kernel, "initrd": self.initrd, "debug": self.debug}


def setup_logging(debug: bool, log_file: str, log_format: str) -> None:
    """runc's --log and --log-format (see runv_py.logs)."""
    from ..logs import handler
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if log_file else logging.WARNING,
                        handlers=[handler(log_file, log_format)])


def fail(message: str, code: int = 1):
    if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        log.error("%s", message)  # --log: the caller (go-runc) reads the reason there
    click.echo(f"runv-py: {message}", err=True)
    sys.exit(code)


def runtime_errors(fn):
    """The edge of the CLI: any error of the runtime exits 1 with its message, as runc."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..hyperstart.errors import RunvError
        try:
            return fn(*args, **kwargs)
        except RunvError as e:
            fail(str(e))
    return wrapper


class LazyGroup(click.Group):
    """Loads `ctr` (and grpc) only when it is used."""

    def get_command(self, ctx, name):
        if name == "ctr":
            from ..containerd02.ctr import ctr
            return ctr
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        return sorted(super().list_commands(ctx) + ["ctr"])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runv-py")
@click.option("--kernel", default=paths.KERNEL, show_default=True,
              envvar="RUNV_KERNEL", help="Guest kernel (uncompressed vmlinux).")
@click.option("--initrd", default=paths.INITRD, show_default=True,
              envvar="RUNV_INITRD", help="Guest initrd holding the hyperstart agent.")
@click.option("--driver", default="", envvar="RUNV_DRIVER",
              help="Hypervisor driver: kvm, qemu-tcg or namespace (default: best available).")
@click.option("--default-cpus", default=1, show_default=True, type=click.IntRange(1, 16),
              help="vCPUs of a VM when the bundle sets no cpu limit.")
@click.option("--default-memory", default=256, show_default=True, type=click.IntRange(64, 65536),
              help="Memory of a VM in MiB when the bundle sets no memory limit.")
@click.option("--root", default=paths.STATE_ROOT, show_default=True, envvar="RUNV_ROOT",
              help="Directory for container state.")
@click.option("--debug", is_flag=True, help="Verbose logging and guest kernel messages.")
@click.option("--log", "log_file", default="", help="Log to this file instead of stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--systemd-cgroup", is_flag=True, expose_value=False,
              help="Accepted for runc compatibility: a slice:prefix:name cgroupsPath is "
                   "always read as systemd's form.")
@factory_options
@click.pass_context
def main(ctx, kernel, initrd, driver, default_cpus, default_memory, root, debug, log_file,
         log_format):
    """runv-py: run OCI containers, each in its own virtual machine."""
    setup_logging(debug, log_file, log_format)
    ctx.obj = Options(kernel=kernel, initrd=initrd, driver=driver, default_cpus=default_cpus,
                      default_memory=default_memory, root=root, debug=debug,
                      log_file=os.path.abspath(log_file) if log_file else "",
                      log_format=log_format)


from . import commands as _commands  # noqa: E402  (they register themselves on main)
from . import more as _more  # noqa: E402
from ..compare import compare as _compare  # noqa: E402  (imports only click at start-up)
main.add_command(_compare)
main.add_command(manage)
_commands.register(main)
_more.register(main)

if __name__ == "__main__":
    main()
