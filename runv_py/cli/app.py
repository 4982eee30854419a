"""The click CLI: every command, the global flags, help and usage errors.

``runv_py.cli.main`` runs the commands tools poll with (fast.py) without loading this
module when it can; it parses the same flags as this group (tests/test_units.py checks
that the two agree)."""
import click

from .. import __version__, paths
from . import make_options, setup_logging
from .manage import factory_options, manage


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
@click.option("--share", type=click.Choice(["9p", "virtiofs"]), default=paths.DEFAULT_SHARE,
              show_default=True, envvar="RUNV_SHARE",
              help="How the rootfs and bind mounts reach the guest (a template's clones: 9p).")
@click.option("--systemd-cgroup", is_flag=True, expose_value=False,
              help="Accepted for runc compatibility: a slice:prefix:name cgroupsPath is "
                   "always read as systemd's form.")
@factory_options
@click.pass_context
def main(ctx, kernel, initrd, driver, default_cpus, default_memory, root, debug, log_file,
         log_format, share):
    """runv-py: run OCI containers, each in its own virtual machine."""
    setup_logging(debug, log_file, log_format)
    ctx.obj = make_options(kernel, initrd, driver, default_cpus, default_memory, root, debug,
                           log_file, log_format, share)


cli = main

from . import commands as _commands  # noqa: E402  (they register themselves on main)
from . import more as _more  # noqa: E402
from ..compare import compare as _compare  # noqa: E402  (imports only click at start-up)
main.add_command(_compare)
main.add_command(manage)
from .factory import factory as _factory  # noqa: E402
main.add_command(_factory)
_commands.register(main)
_more.register(main)
