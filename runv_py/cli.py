"""The runv-py command line, shaped like runc's.

Only click is imported at start-up; each command imports what it needs, so `state` or
`list` do not pay for QEMU, QMP or gRPC modules.
"""
import json
import logging
import os
import sys

import click

from . import __version__


class Options:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def boot_config(self, cpus=None, memory=None):
        from .factory import BootConfig
        return BootConfig(cpus=cpus or self.default_cpus, memory_mib=memory or self.default_memory,
                          kernel=self.kernel, initrd=self.initrd, debug=self.debug)


def setup_logging(debug: bool, log_file: str, log_format: str) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    if log_format == "json":
        class JsonFormatter(logging.Formatter):
            def format(self, record):
                return json.dumps({"level": record.levelname.lower(), "msg": record.getMessage(),
                                   "time": self.formatTime(record), "logger": record.name})
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if log_file else logging.WARNING,
                        handlers=[handler])


def fail(message: str, code: int = 1):
    click.echo(f"runv-py: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runv-py")
@click.option("--kernel", default="/var/lib/runv-py/kernel", show_default=True,
              envvar="RUNV_KERNEL", help="Guest kernel (uncompressed vmlinux).")
@click.option("--initrd", default="/var/lib/runv-py/initrd.img", show_default=True,
              envvar="RUNV_INITRD", help="Guest initrd holding the hyperstart agent.")
@click.option("--driver", default="", envvar="RUNV_DRIVER",
              help="Hypervisor driver: kvm, qemu-tcg or namespace (default: best available).")
@click.option("--default-cpus", default=1, show_default=True, type=click.IntRange(1, 16),
              help="vCPUs of a VM when the bundle sets no cpu limit.")
@click.option("--default-memory", default=256, show_default=True, type=click.IntRange(64, 65536),
              help="Memory of a VM in MiB when the bundle sets no memory limit.")
@click.option("--root", default="/run/runv-py", show_default=True, envvar="RUNV_ROOT",
              help="Directory for container state.")
@click.option("--debug", is_flag=True, help="Verbose logging and guest kernel messages.")
@click.option("--log", "log_file", default="", help="Log to this file instead of stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def main(ctx, kernel, initrd, driver, default_cpus, default_memory, root, debug, log_file,
         log_format):
    """runv-py: run OCI containers, each in its own virtual machine."""
    setup_logging(debug, log_file, log_format)
    ctx.obj = Options(kernel=kernel, initrd=initrd, driver=driver, default_cpus=default_cpus,
                      default_memory=default_memory, root=root, debug=debug)


@main.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.argument("container_id")
@click.pass_obj
def run(opts, bundle, container_id):
    """Create and run a container in a new VM, in the foreground."""
    from .bundle import BundleError
    from .run import RunError, run as run_container
    from .statedir import StateError
    try:
        status = run_container(bundle, container_id, opts.root, opts.boot_config(), opts.driver)
    except (RunError, BundleError, StateError, ValueError) as e:
        fail(str(e))
    sys.exit(status)


@main.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Where to write config.json.")
@click.option("--rootless", is_flag=True, help="Accepted for runc compatibility; ignored.")
def spec(bundle, rootless):
    """Write a default config.json (runc's default)."""
    from .spec import default_spec
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        fail(f"File {path} exists. Remove it first")
    with open(path, "w") as f:
        json.dump(default_spec(), f, indent=2)


@main.command()
@click.pass_obj
def probe(opts):
    """Say which driver and accelerator would be used, and why."""
    from .drivers import DriverError, probe as probe_driver
    try:
        driver = probe_driver(opts.driver)
    except DriverError as e:
        fail(str(e))
    info = driver.describe()
    info.update(kernel=opts.kernel, kernel_present=os.path.isfile(opts.kernel),
                initrd=opts.initrd, initrd_present=os.path.isfile(opts.initrd))
    click.echo(json.dumps(info, indent=2))


@main.command("make-bundle", hidden=True)
@click.argument("path")
@click.argument("args", nargs=-1)
@click.option("--terminal", is_flag=True)
def make_bundle(path, args, terminal):
    """Create a busybox OCI bundle at PATH (for demos and tests)."""
    from .busybox_bundle import make_bundle as make
    make(path, list(args) or ["sh"], terminal=terminal)
    click.echo(path)


if __name__ == "__main__":
    main()
