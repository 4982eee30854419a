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
from .cli_manage import factory_maker, factory_options, factory_settings, manage


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


def _ctr():
    from .containerd.ctr import ctr as group
    return group


class LazyGroup(click.Group):
    """Loads `ctr` (and grpc) only when it is used."""

    def get_command(self, ctx, name):
        if name == "ctr":
            return _ctr()
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        return sorted(super().list_commands(ctx) + ["ctr"])



@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@factory_options
@click.pass_context
def main(ctx, kernel, initrd, driver, default_cpus, default_memory, root, debug, log_file,
         log_format):
    """runv-py: run OCI containers, each in its own virtual machine."""
    setup_logging(debug, log_file, log_format)
    ctx.obj = Options(kernel=kernel, initrd=initrd, driver=driver, default_cpus=default_cpus,
                      default_memory=default_memory, root=root, debug=debug)


def lifecycle_errors(fn):
    """Turn the runtime's expected errors into runc-style messages and exit status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .bundle import BundleError
        from .lifecycle import LifecycleError
        from .state import NotFound
        from .statedir import StateError
        errors = (BundleError, LifecycleError, NotFound, StateError, ValueError, TimeoutError)
        try:
            from .drivers import DriverError
            from .run import RunError
            from .shim import ShimError
            errors += (DriverError, RunError, ShimError)
        except ImportError:
            pass
        try:
            return fn(*args, **kwargs)
        except errors as e:
            fail(str(e))
    return wrapper


@main.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.option("-d", "--detach", is_flag=True, help="Detach: create and start, then return.")
@click.option("--pid-file", default="", help="Write the container's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def run(opts, bundle, detach, pid_file, console_socket, container_id):
    """Create and run a container in a new VM (foreground unless -d)."""
    if detach:
        from . import lifecycle
        lifecycle.create(opts.root, container_id, bundle, opts.boot_config(), opts.driver,
                         pid_file, console_socket, factory_maker=factory_maker())
        lifecycle.start(opts.root, container_id)
        return
    from .run import run as run_container
    sys.exit(run_container(bundle, container_id, opts.root, opts.boot_config(), opts.driver,
                           **factory_settings()))


@main.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.option("--pid-file", default="", help="Write the container's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--no-new-keyring", is_flag=True, hidden=True)
@click.option("--stdio", default="", hidden=True, help="IN,OUT,ERR paths for the container's stdio.")
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def create(opts, bundle, pid_file, console_socket, no_pivot, no_new_keyring, stdio, container_id):
    """Create a container in a new VM; its process waits for `start`."""
    from . import lifecycle
    lifecycle.create(opts.root, container_id, bundle, opts.boot_config(), opts.driver,
                     pid_file, console_socket, stdio_paths=split_stdio(stdio),
                     factory_maker=factory_maker())


def split_stdio(value: str) -> tuple:
    if not value:
        return ()
    parts = value.split(",")
    if len(parts) != 3:
        raise ValueError("--stdio takes IN,OUT,ERR")
    return tuple(parts)


@main.command()
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def start(opts, container_id):
    """Start a created container's process."""
    from . import lifecycle
    lifecycle.start(opts.root, container_id)


@main.command()
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def state(opts, container_id):
    """Print the container's state as JSON (runc's format)."""
    from . import lifecycle
    from .state import oci_state
    click.echo(json.dumps(oci_state(lifecycle.load(opts.root, container_id)), indent=2))


@main.command()
@click.option("-a", "--all", "all_processes", is_flag=True, help="Signal every process.")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@click.pass_obj
@lifecycle_errors
def kill(opts, all_processes, container_id, signal):
    """Send a signal (name or number, default SIGTERM) to the container."""
    from . import lifecycle
    from .bundle import parse_signal
    lifecycle.kill(opts.root, container_id, parse_signal(signal), all_processes)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Kill the container if it is running.")
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def delete(opts, force, container_id):
    """Delete a stopped (or, with --force, any) container and its VM."""
    from . import lifecycle
    lifecycle.delete(opts.root, container_id, force)


@main.command("list")
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids.")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def list_containers(opts, quiet, fmt):
    """List containers."""
    from . import state as st
    records = []
    for cid in st.list_ids(opts.root):
        try:
            records.append(st.read(opts.root, cid))
        except st.NotFound:
            continue
    if quiet:
        for r in records:
            click.echo(r["id"])
    elif fmt == "json":
        click.echo(json.dumps([st.oci_state(r) for r in records]))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        for r in records:
            s = st.oci_state(r)
            rows.append((s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            click.echo("   ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@main.command()
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@click.pass_obj
@lifecycle_errors
def ps(opts, fmt, container_id, ps_args):
    """List the processes in a container (pids as seen in its VM)."""
    from . import lifecycle
    procs = lifecycle.processes(opts.root, container_id)
    if fmt == "json":
        click.echo(json.dumps([p["pid"] for p in procs]))
        return
    click.echo(f"{'UID':<8} {'PID':>6} {'PPID':>6} {'STAT':<4} {'RSS':>8}  CMD")
    for p in procs:
        click.echo(f"{p['uid']:<8} {p['pid']:>6} {p['ppid']:>6} {p['state']:<4} "
                   f"{p['rss_kb']:>8}  {p['cmd']}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-p", "--process", "process_file", default="", help="process.json to run.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-d", "--detach", is_flag=True, help="Detach from the process.")
@click.option("--cwd", default="", help="Working directory in the container.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (K=V).")
@click.option("-u", "--user", default="", help="uid[:gid] to run as.")
@click.option("--pid-file", default="", help="Write the process's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.option("--exec-id", default="", hidden=True, help="Name of the process (daemon use).")
@click.option("--stdio", default="", hidden=True, help="IN,OUT,ERR paths for the process's stdio.")
@click.argument("container_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
@lifecycle_errors
def exec(opts, process_file, tty, detach, cwd, env, user, pid_file, console_socket, exec_id,
         stdio, container_id, command):
    """Run a process in a running container."""
    from . import lifecycle
    from .bundle import BundleError
    if process_file:
        try:
            with open(process_file) as f:
                process = json.load(f)
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {process_file}: {e}") from None
    else:
        if not command:
            raise BundleError("exec needs a command or --process")
        record = lifecycle.load(opts.root, container_id)
        base = lifecycle.read_bundle_spec(record).get("process") or {}
        process = {"args": list(command), "env": base.get("env") or [],
                   "cwd": base.get("cwd") or "/", "user": base.get("user") or {"uid": 0, "gid": 0},
                   "terminal": tty}
    if cwd:
        process["cwd"] = cwd
    if env:
        process["env"] = list(process.get("env") or []) + list(env)
    if user:
        uid, _, gid = user.partition(":")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if tty:
        process["terminal"] = True
    from .run import RawTerminal
    raw = process.get("terminal") and not detach and not console_socket and os.isatty(0)
    with RawTerminal(enabled=raw):
        status = lifecycle.exec_process(opts.root, container_id, process, detach, pid_file,
                                        console_socket, exec_id, split_stdio(stdio))
    sys.exit(status)


@main.command()
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def pause(opts, container_id):
    """Pause the container's VM (QMP stop)."""
    from . import lifecycle
    lifecycle.pause(opts.root, container_id)


@main.command()
@click.argument("container_id")
@click.pass_obj
@lifecycle_errors
def resume(opts, container_id):
    """Resume a paused container's VM (QMP cont)."""
    from . import lifecycle
    lifecycle.resume(opts.root, container_id)


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


@main.command()
@click.option("--state-dir", default="/run/runv-containerd/state", show_default=True,
              help="Where the containers' state directories (and shims) live.")
@click.option("--containerd-dir", default="/run/runv-containerd", show_default=True,
              help="Daemon files: pid file, events.log, container records.")
@click.option("--listen", default="", help="Unix socket (default: CONTAINERD_DIR/containerd.sock).")
@click.option("--solo-namespaced", is_flag=True,
              help="Stop when the last container has exited, removing the containerd dir.")
@click.pass_obj
def containerd(opts, state_dir, containerd_dir, listen, solo_namespaced):
    """Run the gRPC containerd daemon (runV's containerd API)."""
    from .containerd.server import serve
    cli_args = ["--kernel", opts.kernel, "--initrd", opts.initrd,
                "--default-cpus", str(opts.default_cpus), "--default-memory", str(opts.default_memory)]
    if opts.driver:
        cli_args += ["--driver", opts.driver]
    sys.exit(serve(cli_args, os.path.abspath(state_dir), os.path.abspath(containerd_dir),
                   listen or os.path.join(os.path.abspath(containerd_dir), "containerd.sock"),
                   solo_namespaced))


@main.command("make-bundle", hidden=True)
@click.argument("path")
@click.argument("args", nargs=-1)
@click.option("--terminal", is_flag=True)
def make_bundle(path, args, terminal):
    """Create a busybox OCI bundle at PATH (for demos and tests)."""
    from .busybox_bundle import make_bundle as make
    make(path, list(args) or ["sh"], terminal=terminal)
    click.echo(path)


from .compare import compare as _compare  # noqa: E402  (imports only click at start-up)
main.add_command(_compare)
main.add_command(manage)

if __name__ == "__main__":
    main()
