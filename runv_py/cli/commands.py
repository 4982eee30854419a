"""runc's commands: create, start, run, state, kill, delete, list, ps, exec, pause,
resume, spec; and runv-py's probe, containerd and make-bundle. Each imports what it
uses when it runs. The bodies of state, kill, list and ps are hot.py's, which the fast
path (fast.py) runs too."""
import json
import os
import sys

import click

from . import hot, runtime_errors
from .manage import factory_settings


def shim_args(opts) -> dict:
    """What every container's shim is started with, from the global flags."""
    return dict(config=opts.boot_config(), driver=opts.driver, log_file=opts.log_file,
                log_format=opts.log_format, **factory_settings())


@click.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.option("-d", "--detach", is_flag=True, help="Detach: create and start, then return.")
@click.option("--pid-file", default="", help="Write the container's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--no-new-keyring", is_flag=True, hidden=True)
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def run(opts, bundle, detach, pid_file, console_socket, no_pivot, no_new_keyring, preserve_fds,
        container_id):
    """Create and run a container in a new VM (foreground unless -d)."""
    from ..shim import lifecycle
    no_preserved_fds(preserve_fds)
    if detach:
        lifecycle.create(opts.root, container_id, bundle, console_socket=console_socket,
                         pid_file=pid_file, **shim_args(opts))
        lifecycle.start(opts.root, container_id)
        return
    from .run import run_foreground
    sys.exit(run_foreground(opts.root, container_id, bundle, shim_args(opts)))


@click.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Path to the OCI bundle.")
@click.option("--pid-file", default="", help="Write the container's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--no-new-keyring", is_flag=True, hidden=True)
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.option("--stdio", default="", hidden=True, help="IN,OUT,ERR paths for the container's stdio.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def create(opts, bundle, pid_file, console_socket, no_pivot, no_new_keyring, preserve_fds, stdio,
           container_id):
    """Create a container in a new VM; its process waits for `start`."""
    from ..shim import lifecycle
    no_preserved_fds(preserve_fds)
    lifecycle.create(opts.root, container_id, bundle, console_socket=console_socket,
                     stdio_paths=split_stdio(stdio), pid_file=pid_file, **shim_args(opts))


def no_preserved_fds(count: int) -> None:
    """runc's --preserve-fds hands host fds to the container: they cannot enter a VM."""
    if count:
        from ..hyperstart.errors import InvalidArgument
        raise InvalidArgument("--preserve-fds: host file descriptors cannot be passed into a VM")


def split_stdio(value: str) -> tuple:
    if not value:
        return ()
    parts = value.split(",")
    if len(parts) != 3:
        from ..hyperstart.errors import InvalidArgument
        raise InvalidArgument("--stdio takes IN,OUT,ERR")
    return tuple(parts)


@click.command()
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def start(opts, container_id):
    """Start a created container's process."""
    from ..shim import lifecycle
    lifecycle.start(opts.root, container_id)


@click.command()
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def state(opts, container_id):
    """Print the container's state as JSON (runc's format)."""
    hot.state(opts, container_id)


@click.command()
@click.option("-a", "--all", "all_processes", is_flag=True, help="Signal every process.")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@click.pass_obj
@runtime_errors
def kill(opts, all_processes, container_id, signal):
    """Send a signal (name or number, default SIGTERM) to the container."""
    hot.kill(opts, all_processes, container_id, signal)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill the container if it is running.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def delete(opts, force, container_id):
    """Delete a stopped (or, with --force, any) container and its VM."""
    from ..shim import lifecycle
    lifecycle.delete(opts.root, container_id, force)


@click.command("list")
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids.")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def list_containers(opts, quiet, fmt):
    """List containers."""
    hot.list_containers(opts, quiet, fmt)


@click.command()
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@click.pass_obj
@runtime_errors
def ps(opts, fmt, container_id, ps_args):
    """List the processes in a container (pids as seen in its VM)."""
    hot.ps(opts, fmt, container_id, ps_args)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-p", "--process", "process_file", default="", help="process.json to run.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-d", "--detach", is_flag=True, help="Detach from the process.")
@click.option("--cwd", default="", help="Working directory in the container.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (K=V).")
@click.option("-u", "--user", default="", help="uid[:gid] to run as.")
@click.option("--pid-file", default="", help="Write the process's host pid here.")
@click.option("--console-socket", default="", help="Unix socket that receives the pty master.")
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.option("--exec-id", default="", hidden=True, help="Name of the process (daemon use).")
@click.option("--stdio", default="", hidden=True, help="IN,OUT,ERR paths for the process's stdio.")
@click.argument("container_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
@runtime_errors
def exec(opts, process_file, tty, detach, cwd, env, user, pid_file, console_socket, preserve_fds,
         exec_id, stdio, container_id, command):
    """Run a process in a running container."""
    no_preserved_fds(preserve_fds)
    from ..oci.bundle import BundleError
    from ..shim import lifecycle
    from .run import RawTerminal
    if process_file:
        try:
            with open(process_file) as f:
                process = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise BundleError(f"cannot read {process_file}: {e}") from None
        if not isinstance(process, dict):
            raise BundleError(f"{process_file}: a process must be a JSON object")
        from ..oci.bundle import check_process
        check_process(process, process_file)  # its types, before anything reads it
    else:
        if not command:
            raise BundleError("exec needs a command or --process")
        base = lifecycle.bundle_spec(lifecycle.load(opts.root, container_id)).get("process") or {}
        process = {"args": list(command), "env": base.get("env") or [],
                   "cwd": base.get("cwd") or "/", "user": base.get("user") or {"uid": 0, "gid": 0},
                   "terminal": tty}
    if cwd:
        process["cwd"] = cwd
    if env:
        process["env"] = list(process.get("env") or []) + list(env)
    if user:
        process["user"] = exec_user(process.get("user"), user)
    if tty:
        process["terminal"] = True
    raw = process.get("terminal") and not detach and not console_socket and os.isatty(0)

    def on_started(reply):
        if process.get("terminal") and not console_socket:
            return lifecycle.forward_winsize(opts.root, container_id, reply["exec_id"])
    with RawTerminal(enabled=raw):
        status = lifecycle.exec_process(opts.root, container_id, process, detach, pid_file,
                                        console_socket, exec_id, split_stdio(stdio), on_started)
    sys.exit(status)


def exec_user(current, value: str) -> dict:
    """``-u uid[:gid]`` as runc takes it: numbers only (runc resolves no names either:
    they are the container's), and a gid not given keeps the process's."""
    from ..oci.bundle import BundleError
    if current is not None and not isinstance(current, dict):
        raise BundleError("process.user must be an object")
    user = dict(current or {"gid": 0})
    uid, colon, gid = value.partition(":")
    for name, text in (("uid", uid), ("gid", gid)) if colon else (("uid", uid),):
        if not text.isdigit() or int(text) >= 1 << 32:
            raise BundleError(f"bad {name} {text!r} in --user {value!r}: "
                              "it takes uid[:gid], as numbers")
        user[name] = int(text)
    return user


@click.command()
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def pause(opts, container_id):
    """Pause the container's VM (QMP stop)."""
    from ..shim import lifecycle
    lifecycle.pause(opts.root, container_id)


@click.command()
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def resume(opts, container_id):
    """Resume a paused container's VM (QMP cont)."""
    from ..shim import lifecycle
    lifecycle.resume(opts.root, container_id)


@click.command()
@click.option("-b", "--bundle", default=".", show_default=True, help="Where to write config.json.")
@click.option("--rootless", is_flag=True, help="Accepted for runc compatibility; ignored.")
def spec(bundle, rootless):
    """Write a default config.json (runc's default)."""
    from ..oci.spec import default_spec
    from . import fail
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        fail(f"File {path} exists. Remove it first")
    with open(path, "w") as f:
        json.dump(default_spec(), f, indent=2)


@click.command()
@click.pass_obj
@runtime_errors
def probe(opts):
    """Say which driver and accelerator would be used, and why."""
    from ..drivers import probe as probe_driver
    info = probe_driver(opts.driver).describe()
    info.update(kernel=opts.kernel, kernel_present=os.path.isfile(opts.kernel),
                initrd=opts.initrd, initrd_present=os.path.isfile(opts.initrd))
    click.echo(json.dumps(info, indent=2))


@click.command()
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
    from ..containerd02.server import serve
    sys.exit(serve(dict(shim_args(opts), log_file="", log_format="text"), os.path.abspath(state_dir), os.path.abspath(containerd_dir),
                   listen or os.path.join(os.path.abspath(containerd_dir), "containerd.sock"),
                   solo_namespaced))


@click.command("make-bundle", hidden=True)
@click.argument("path")
@click.argument("args", nargs=-1)
@click.option("--terminal", is_flag=True)
def make_bundle(path, args, terminal):
    """Create a busybox OCI bundle at PATH (for demos and tests)."""
    from ..oci.busybox import make_bundle as make
    make(path, list(args) or ["sh"], terminal=terminal)
    click.echo(path)


def register(group: click.Group) -> None:
    for command in (run, create, start, state, kill, delete, list_containers, ps, exec, pause,
                    resume, spec, probe, containerd, make_bundle):
        group.add_command(command)
