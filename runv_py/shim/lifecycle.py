"""The OCI lifecycle of containers that live in per-sandbox shims, as runc's commands
mean it: create, start, kill, delete, pause, resume, exec, ps, stats, update.

The CLI and the 0.2 daemon both call these. Each call locks the container's state
directory, reads its record and talks to its shim (client.py). What a shim cannot do
because it is gone (it exits with its container) is done here: delete kills what is
left, runs the poststop hooks and removes the state.

`state`, `kill`, `ps` and `events` start here at every call of the tools that poll them:
what only some calls need (the shim's protocol and client, hooks, the VM's sizing) is
imported in the functions that use it; json, signal and typing (which import re and
enum) are not imported at all.
"""
from __future__ import annotations

import os

from ..host import proc as hostproc
from ..host import statedir
from ..hyperstart import states
from ..hyperstart.errors import FailedPrecondition, InvalidArgument
from ..oci import bundle as oci
from .records import Lock, Record, read

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from . import protocol as p

SPAWN_TIMEOUT = float(os.environ.get("RUNV_BOOT_TIMEOUT", "60")) + 30


def load(root: str, cid: str) -> Record:
    oci.check_id(cid)
    return read(root, cid)


def create(root: str, cid: str, bundle_path: str, config: dict, driver: str = "",
           console_socket: str = "", stdio_paths=(), tty_on_stdio: bool = False,
           factory_policy=None, template_dir: str = "", die_with_parent: bool = False,
           pid_file: str = "", log_file: str = "", log_format: str = "text",
           restore_from: str = "") -> int:
    """Start the container's shim (which boots its VM and creates it); returns the
    container's host pid. ``config`` holds BootConfig fields; the bundle's resources
    size the VM. With ``restore_from`` (a checkpoint's directory) the shim restores
    the container's VM from it instead, and the container runs."""
    from ..oci.resources import vm_size
    from .params import ShimParams
    oci.check_id(cid)
    bundle = oci.load(bundle_path)
    if bundle.terminal and not console_socket and not tty_on_stdio:
        raise FailedPrecondition("cannot allocate a tty without --console-socket "
                                 "(config.json has process.terminal: true)")
    cpus, memory = vm_size(bundle.resources, config["cpus"], config["memory_mib"])
    params = ShimParams(cid=cid, state_dir="", bundle=bundle.path,
                        config=dict(config, cpus=cpus, memory_mib=memory), driver=driver,
                        console_socket=console_socket, tty_on_stdio=tty_on_stdio,
                        factory_policy=factory_policy, template_dir=template_dir,
                        die_with_parent=die_with_parent, log_file=log_file,
                        log_format=log_format, restore_from=restore_from)
    stdio_fds = open_stdio(stdio_paths)
    try:
        params.state_dir = statedir.create(root, cid)
        try:
            with Lock(params.state_dir):
                from .spawn import spawn
                pid = spawn(params, SPAWN_TIMEOUT, stdio_fds)
                if pid_file:
                    write_pid_file(pid_file, pid)
                return pid
        except BaseException:
            remove_state(read(root, cid))
            raise
    finally:
        for fd in stdio_fds:
            os.close(fd)


def open_stdio(paths) -> tuple:
    """Open the stdin, stdout and stderr paths (FIFOs, files; '' is /dev/null).

    FIFOs are opened read-write so that opening never waits for the other end, and a
    reader or writer that comes and goes does not end the stream."""
    fds = []
    try:
        for path in paths:
            if not path:
                fds.append(os.open(os.devnull, os.O_RDWR))
            elif not os.path.exists(path):
                raise InvalidArgument(f"stdio path {path} does not exist")
            else:
                fds.append(os.open(path, os.O_RDWR))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


def write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


def _locked_call(root: str, cid: str, req: p.Request) -> dict:
    from .client import ShimClient
    record = load(root, cid)
    with Lock(record.path):
        return ShimClient(load(root, cid)).call(req)


def start(root: str, cid: str) -> None:
    from . import protocol as p
    from .client import ShimClient
    record = load(root, cid)
    with Lock(record.path):
        record = load(root, cid)
        if record.status != states.CREATED:
            raise FailedPrecondition(f"cannot start a container that is {record.status}")
        ShimClient(record).call(p.Start())


def kill(root: str, cid: str, sig: int, all_processes: bool = False) -> None:
    record = load(root, cid)
    with Lock(record.path):
        record = load(root, cid)
        if record.status == states.STOPPED:
            raise FailedPrecondition(f"container {cid} is not running")
        from . import protocol as p
        from .client import ShimClient
        ShimClient(record).call(p.Kill(signal=sig, all=all_processes))


def pause(root: str, cid: str) -> None:
    from . import protocol as p
    _locked_call(root, cid, p.Pause())


def resume(root: str, cid: str) -> None:
    from . import protocol as p
    _locked_call(root, cid, p.Resume())


def checkpoint(root: str, cid: str, image_path: str, leave_running: bool = False) -> dict:
    """Save the running container's VM in ``image_path`` (sandbox/checkpoint.py); it
    stops, and its shim is gone on return, unless ``leave_running``. Returns the
    checkpoint's metadata."""
    from . import protocol as p
    from .client import ShimClient
    record = load(root, cid)
    with Lock(record.path):
        record = load(root, cid)
        if record.status != states.RUNNING:
            raise FailedPrecondition(f"cannot checkpoint a container that is {record.status}")
        from ..oci import checkpoint_dir as image
        # Opened here: the shim lives in a mount namespace of its own, which may not
        # see the caller's path (a disk mounted since the container started).
        meta = image.write_checkpoint(image_path, lambda fd: ShimClient(
            record, timeout=SPAWN_TIMEOUT).call(p.Checkpoint(leave_running=leave_running),
                                                fds=(fd,))["meta"])
        if not leave_running:
            hostproc.wait_gone(record.shim_pid, 10.0)
    return meta


def kill_shim(record: Record, timeout: float = 5.0) -> None:
    """End the shim (and with it QEMU, through its parent-death signal)."""
    hostproc.kill_and_wait(record.shim_pid, record.shim_start, timeout)
    if record.qemu_pid and not record.sandbox:  # a pod member's QEMU is its infra's
        hostproc.wait_gone(record.qemu_pid, timeout)


def delete(root: str, cid: str, force: bool = False) -> None:
    """Delete a stopped or created container (any, with ``force``): end its shim, run
    the poststop hooks, remove its state."""
    from ..oci import hooks
    record = load(root, cid)
    with Lock(record.path):
        record = load(root, cid)
        if record.status in (states.RUNNING, states.PAUSED) and not force:
            raise FailedPrecondition(f"cannot delete container {cid} that is not stopped: "
                                     f"{record.status} (use --force)")
        spec = bundle_spec(record)
        remove_state(record)
    record.status = states.STOPPED
    hooks.run_hooks(spec.get("hooks"), hooks.POSTSTOP, record.oci_state())


def remove_state(record: Record) -> None:
    """Everything a container leaves on the host: its shim (and VM), the redirections
    in its pod's network namespace, its host cgroup, its state directory; a pod member's
    container leaves its pod's VM."""
    if record.sandbox:
        from .member import leave
        leave(record)
    kill_shim(record)
    if record.netns:
        from ..net import release
        release(record.netns, record.taps)
    if record.host_cgroups:
        from ..host.cgroups import HostCgroup
        HostCgroup(record.host_cgroups).remove()
    statedir.remove(record.path)


def bundle_spec(record: Record) -> dict:
    return oci.read_spec(record.bundle)


def processes(root: str, cid: str) -> list:
    from . import protocol as p
    from .client import ShimClient
    return ShimClient(load(root, cid)).call(p.Ps())["processes"]


def stats(root: str, cid: str) -> dict:
    from . import protocol as p
    from .client import ShimClient
    return ShimClient(load(root, cid)).call(p.Stats())["stats"]


def request(root: str, cid: str, req: p.Request) -> dict:
    """One more request to a container's shim (signal, close_stdin, winsize, update)."""
    from .client import ShimClient
    return ShimClient(load(root, cid)).call(req)


def exec_process(root: str, cid: str, process: dict, detach: bool, pid_file: str = "",
                 console_socket: str = "", exec_id: str = "", stdio_paths=(),
                 on_started=None) -> int | None:
    """Run ``process`` in the container. Foreground: forward stdio, call
    ``on_started(reply)`` once it runs, and return its exit status. Detached: fork a
    holder process that lives as long as the process and ends as it did (its status,
    or the signal that killed it; its pid goes to --pid-file), and return 0."""
    from . import protocol as p
    from .client import ShimClient
    record = load(root, cid)
    if record.status != states.RUNNING:
        raise FailedPrecondition(f"cannot exec in a container that is {record.status}")
    oci.check_process(process)
    fds = open_stdio(stdio_paths) if stdio_paths else (0, 1, 2)
    try:
        reply, conn = ShimClient(record).open(
            p.Exec(exec_id=exec_id, process=process, console_socket=console_socket),
            fds=() if console_socket and process.get("terminal") else fds)
    finally:
        if stdio_paths:
            for fd in fds:
                os.close(fd)
    conn.settimeout(None)
    if detach:
        holder = os.fork()
        if holder == 0:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            final = conn.read()
            if final and final.get("signal"):  # ended as the process did (spawn.py)
                from .spawn import end_by_signal
                end_by_signal(int(final["signal"]))
            os._exit(int(final["exit"]) if final and "exit" in final else 255)
        conn.close()
        if pid_file:
            write_pid_file(pid_file, holder)
        return 0
    if pid_file:
        write_pid_file(pid_file, os.getpid())
    stop = on_started(reply) if on_started else None
    try:
        final = conn.read()
    finally:
        if stop:
            stop()
    conn.close()
    return int(final["exit"]) if final and "exit" in final else 255


def forward_winsize(root: str, cid: str, exec_id: str):
    """Send this terminal's size to the process now and at every SIGWINCH; returns
    what undoes it."""
    import signal

    from ..hyperstart.errors import RunvError
    from . import protocol as p
    from .terminal import terminal_size

    def resize(*_):
        size = terminal_size(0)
        if size:
            try:
                request(root, cid, p.Winsize(exec_id=exec_id, rows=size[0], cols=size[1]))
            except RunvError:
                pass
    previous = signal.signal(signal.SIGWINCH, resize)
    resize()
    return lambda: signal.signal(signal.SIGWINCH, previous)
