"""The OCI lifecycle as CLI calls see it: create, start, state, kill, delete, exec...

Each call locks the container, reads state.json and talks to the container's shim over
its socket. Hooks run here, on the host, with the state JSON on stdin.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

from . import bundle as oci
from . import state as st
from . import statedir

VM_MEMORY_OVERHEAD_MIB = 96


class LifecycleError(Exception):
    pass


# ---- talking to the shim --------------------------------------------------------------

def shim_request(record: dict, message: dict, fds=(), timeout: float = 60.0):
    """Send one request to the container's shim; returns (reply, connection)."""
    path = os.path.join(record["path"], st.SHIM_SOCKET)
    try:
        sock = st.connect_unix(path, timeout=5)
    except OSError:
        raise LifecycleError(f"container {record['id']} is not running (its shim is gone)") from None
    sock.settimeout(timeout)
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)
    sock = Connection(sock)
    reply = read_line(sock)
    if reply is None:
        sock.close()
        raise LifecycleError(f"the shim of {record['id']} closed the connection")
    if not reply.get("ok"):
        sock.close()
        raise LifecycleError(reply.get("error", "unknown error"))
    return reply, sock


class Connection:
    """A connection to a shim; answers are JSON lines, and several may arrive at once."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def settimeout(self, timeout) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def read_line(conn: Connection):
    """The next JSON line from the shim, or None if it closed or went silent."""
    try:
        line = conn.reader.readline()
    except (socket.timeout, OSError):
        return None
    return json.loads(line) if line.endswith(b"\n") else None


def simple_request(record: dict, message: dict) -> dict:
    reply, sock = shim_request(record, message)
    sock.close()
    return reply


# ---- hooks ----------------------------------------------------------------------------

def run_hooks(bundle_spec: dict, kind: str, record: dict, fatal: bool) -> None:
    for hook in (bundle_spec.get("hooks") or {}).get(kind) or []:
        path = hook.get("path", "")
        args = hook.get("args") or [path]
        env = dict(e.split("=", 1) for e in hook.get("env") or [] if "=" in e)
        timeout = hook.get("timeout") or 60
        try:
            result = subprocess.run([path] + args[1:], executable=path, env=env,
                                    input=json.dumps(st.oci_state(record)).encode(),
                                    capture_output=True, timeout=timeout)
            failed = result.returncode != 0
            why = f"exit status {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
        except (OSError, subprocess.TimeoutExpired) as e:
            failed, why = True, str(e)
        if failed:
            message = f"{kind} hook {path} failed: {why}"
            if fatal:
                raise LifecycleError(message)
            print(f"runv-py: warning: {message}", file=sys.stderr)


# ---- commands -------------------------------------------------------------------------

def sized_config(bundle: oci.Bundle, config):
    """linux.resources sizes the VM: the memory limit plus a fixed overhead, and as many
    vCPUs as the cpu quota asks for."""
    import dataclasses
    res = bundle.resources
    changes = {}
    limit = (res.get("memory") or {}).get("limit")
    if limit and limit > 0:
        changes["memory_mib"] = max(64, math.ceil(limit / (1 << 20)) + VM_MEMORY_OVERHEAD_MIB)
    cpu = res.get("cpu") or {}
    if cpu.get("quota") and cpu["quota"] > 0:
        changes["cpus"] = max(1, min(16, math.ceil(cpu["quota"] / (cpu.get("period") or 100000))))
    return dataclasses.replace(config, **changes) if changes else config


def create(root: str, cid: str, bundle_path: str, config, driver_name: str,
           pid_file: str = "", console_socket: str = "", factory_maker=None,
           stdio_paths=()) -> int:
    from . import shim
    from .factory import BOOT_TIMEOUT
    oci.check_id(cid)
    bundle = oci.load(bundle_path)
    if bundle.terminal and not console_socket:
        raise LifecycleError("cannot allocate a tty without --console-socket "
                             "(config.json has process.terminal: true)")
    stdio_fds = open_stdio(stdio_paths)
    path = statedir.create(root, cid)
    try:
        with st.Lock(path):
            pid = shim.spawn(cid, path, bundle, sized_config(bundle, config), driver_name,
                             console_socket, BOOT_TIMEOUT + 30, factory_maker, stdio_fds)
            record = st.read(root, cid)
            try:
                run_hooks(bundle.spec, "prestart", record, fatal=True)
                run_hooks(bundle.spec, "createRuntime", record, fatal=True)
            except LifecycleError:
                kill_shim(record)
                raise
            if pid_file:
                write_pid_file(pid_file, pid)
            return pid
    except BaseException:
        statedir.remove(path)
        raise


def open_stdio(paths) -> tuple:
    """Open the stdin, stdout and stderr paths (FIFOs, files; '' is /dev/null).

    FIFOs are opened read-write so that opening never waits for the other end, and a
    reader or writer that comes and goes does not end the stream."""
    fds = []
    for path in paths:
        if not path:
            fds.append(os.open(os.devnull, os.O_RDWR))
            continue
        if not os.path.exists(path):
            raise LifecycleError(f"stdio path {path} does not exist")
        fds.append(os.open(path, os.O_RDWR))
    return tuple(fds)


def write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


def load(root: str, cid: str) -> dict:
    oci.check_id(cid)
    return st.read(root, cid)


def start(root: str, cid: str) -> None:
    record = load(root, cid)
    with st.Lock(record["path"]):
        record = load(root, cid)
        if record["status"] != "created":
            raise LifecycleError(f"cannot start a container that is {record['status']}")
        simple_request(record, {"op": "start"})
        spec = read_bundle_spec(record)
        run_hooks(spec, "poststart", load(root, cid), fatal=False)


def read_bundle_spec(record: dict) -> dict:
    try:
        with open(os.path.join(record.get("bundle", ""), "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def kill(root: str, cid: str, sig: int, all_processes: bool = False) -> None:
    record = load(root, cid)
    with st.Lock(record["path"]):
        record = load(root, cid)
        if record["status"] == "stopped":
            raise LifecycleError(f"container {cid} is not running")
        simple_request(record, {"op": "kill", "signal": sig, "all": all_processes})


def kill_shim(record: dict, timeout: float = 5.0) -> None:
    """End the shim (and with it QEMU, through PDEATHSIG)."""
    pid = record.get("shim_pid") or 0
    if pid and st.shim_alive(record):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while st.process_start_time(pid) and time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.02)
    qemu = record.get("qemu_pid") or 0
    deadline = time.monotonic() + timeout
    while qemu and os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.02)


def delete(root: str, cid: str, force: bool = False) -> None:
    record = load(root, cid)
    with st.Lock(record["path"]):
        record = load(root, cid)
        if record["status"] in ("running", "paused") and not force:
            raise LifecycleError(f"cannot delete container {cid} that is not stopped: "
                                 f"{record['status']} (use --force)")
        kill_shim(record)
        spec = read_bundle_spec(record)
        statedir.remove(record["path"])
    run_hooks(spec, "poststop", record, fatal=False)


def pause(root: str, cid: str) -> None:
    record = load(root, cid)
    with st.Lock(record["path"]):
        simple_request(load(root, cid), {"op": "pause"})


def resume(root: str, cid: str) -> None:
    record = load(root, cid)
    with st.Lock(record["path"]):
        simple_request(load(root, cid), {"op": "resume"})


def shim_op(root: str, cid: str, op: str, **args) -> dict:
    """One more request to a container's shim (signal, close_stdin, stats, update)."""
    return simple_request(load(root, cid), dict(args, op=op))


def processes(root: str, cid: str) -> list:
    return simple_request(load(root, cid), {"op": "ps"})["processes"]


def exec_process(root: str, cid: str, process: dict, detach: bool, pid_file: str = "",
                 console_socket: str = "", exec_id: str = "", stdio_paths=()) -> int:
    """Run ``process`` in the container. Foreground: forward stdio and return its exit
    status. Detached: fork a holder process that lives as long as the process and exits
    with its status (its pid goes to --pid-file), and return 0."""
    record = load(root, cid)
    if record["status"] != "running":
        raise LifecycleError(f"cannot exec in a container that is {record['status']}")
    oci.check_process(process)
    request = {"op": "exec", "process": process, "console_socket": console_socket,
               "exec_id": exec_id}
    fds = open_stdio(stdio_paths) if stdio_paths else (0, 1, 2)
    try:
        reply, sock = shim_request(record, request, fds=fds)
    finally:
        if stdio_paths:
            for fd in fds:
                os.close(fd)
    sock.settimeout(None)
    if detach:
        holder = os.fork()
        if holder == 0:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            final = read_line(sock)
            os._exit(int(final["exit"]) if final and "exit" in final else 255)
        sock.close()
        if pid_file:
            write_pid_file(pid_file, holder)
        return 0
    if pid_file:
        write_pid_file(pid_file, os.getpid())
    stop_resize = forward_winsize(record, reply.get("seq", 0)) if process.get("terminal") else None
    try:
        final = read_line(sock)
    finally:
        if stop_resize:
            stop_resize()
    sock.close()
    return int(final["exit"]) if final and "exit" in final else 255


def forward_winsize(record: dict, seq: int):
    def resize(*_):
        try:
            size = os.get_terminal_size(0)
            simple_request(record, {"op": "winsize", "seq": seq, "rows": size.lines,
                                    "cols": size.columns})
        except (OSError, LifecycleError):
            pass
    previous = signal.signal(signal.SIGWINCH, resize)
    resize()
    return lambda: signal.signal(signal.SIGWINCH, previous)
