"""The shim: one detached process per sandbox, the part containerd-shim plays for runc.

`create` forks it. It owns the QEMU process (which dies with it: PDEATHSIG) and the
agent's channels, forwards the container's stdio to the fds `create` was started with
(or a pty handed to --console-socket), records the exit status in state.json and answers
later CLI calls over ``shim.sock`` in the container's state directory. It is also the
container's host pid: it lives as long as the container's init and exits with its status.
"""
import json
import logging
import os
import select
import signal
import socket
import threading

from . import bundle as oci
from . import state as st
from .agent_client import AgentError, fd_sink, pump_stdin
from .drivers import DriverError, probe
from .hyperstart import syscalls
from .sandbox import Sandbox, private_mount_namespace

log = logging.getLogger("runv_py.shim")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
VM_DIED_STATUS = 137


class ShimError(Exception):
    pass


def send_json(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def host_pty(console_socket: str, controlling: bool = False) -> int:
    """A host pty whose master goes to ``console_socket`` (SCM_RIGHTS, as runc does);
    returns the slave, which the shim bridges to the guest's own pty. As the shim's
    controlling terminal, the slave brings it SIGWINCH when the caller resizes."""
    import fcntl
    import termios
    import tty
    master, slave = os.openpty()
    tty.setraw(slave)
    if controlling:
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    try:
        with st.connect_unix(console_socket) as sock:
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as e:
        os.close(slave)
        raise ShimError(f"cannot send the console to {console_socket}: {e}") from None
    finally:
        os.close(master)
    return slave


class Shim:
    def __init__(self, cid: str, path: str, bundle: oci.Bundle, config, driver_name: str,
                 console_socket: str, factory_maker=None):
        self.cid = cid
        self.path = path
        self.bundle = bundle
        self.config = config
        self.driver_name = driver_name
        self.console_socket = console_socket
        self.factory_maker = factory_maker
        self.sandbox = None
        self.record = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.exit_status = VM_DIED_STATUS
        self.exec_count = 0
        self.tty_seq = 0
        self.tty_fd = -1
        self.listener = None
        self.execs = {}          # exec id -> {"seq", "stdin"}
        self.in_flight = 0
        self.idle = threading.Condition()

    # ---- start-up -------------------------------------------------------------------

    def boot(self) -> None:
        driver = probe(self.driver_name)
        private_mount_namespace()
        if self.factory_maker is not None:
            factory = self.factory_maker(driver)
        else:
            from .factory import DirectFactory
            factory = DirectFactory(driver)
        booted = factory.get_vm(self.config, self.path, self.cid)
        self.sandbox = sandbox = Sandbox(self.cid, booted)
        sandbox.start_pod(self.bundle.hostname)
        agent = sandbox.agent
        agent.event_callbacks.append(self.on_exit_event)
        seq_out = agent.new_seq()
        seq_err = 0 if self.bundle.terminal else agent.new_seq()
        if self.bundle.terminal:
            if not self.console_socket:
                raise ShimError("terminal is true but no --console-socket was given")
            slave = host_pty(self.console_socket, controlling=True)
            agent.attach(seq_out, fd_sink(slave))
            stdin, close_stdin = os.dup(slave), True
            self.tty_seq = seq_out
            self.tty_fd = slave
            signal.signal(signal.SIGWINCH, self.on_winch)
        else:
            agent.attach(seq_out, fd_sink(1))
            agent.attach(seq_err, fd_sink(2))
            stdin, close_stdin = 0, False
        process = oci.process_message(self.bundle.process, "init", seq_out, seq_err)
        self.guest_pid = sandbox.create_container(self.cid, self.bundle, process, wait=True)
        self.init_seq = seq_out
        # Only now does the agent know the stream: earlier stdin would be dropped.
        pump_stdin(agent, seq_out, stdin, close=close_stdin)
        threading.Thread(target=self.watch_vm, name="vm-watch", daemon=True).start()

    def watch_vm(self) -> None:
        """The VM stopping (guest panic, QEMU killed) ends the container too."""
        self.sandbox.agent.closed.wait()
        if not self.done.is_set():
            log.warning("the VM stopped: %s", self.sandbox.vm.failure())
            self.finish(VM_DIED_STATUS)

    def on_exit_event(self, event: dict) -> None:
        if event.get("container") == self.cid and event.get("process") == "init":
            self.finish(int(event.get("status", VM_DIED_STATUS)), bool(event.get("oom")))

    def finish(self, status: int, oom: bool = False) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.exit_status = status
            self.update(status="stopped", exit_status=status, oom_killed=oom,
                        finished=st.now_rfc3339())
            self.done.set()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def update(self, **changes) -> None:
        self.record.update(changes)
        st.write(self.path, self.record)

    # ---- serving --------------------------------------------------------------------

    def listen(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dirfd = os.open(self.path, os.O_PATH | os.O_DIRECTORY)
        listener.bind(f"/proc/self/fd/{dirfd}/{st.SHIM_SOCKET}")
        os.close(dirfd)
        listener.listen(64)
        self.listener = listener

    def serve(self) -> None:
        listener = self.listener
        while not self.done.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except (OSError, ValueError):
                break
            if not ready or self.done.is_set():
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with self.idle:
                self.in_flight += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        listener.close()

    def handle(self, conn: socket.socket) -> None:
        fds = []
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
            while not data.endswith(b"\n"):
                more = conn.recv(1 << 20)
                if not more:
                    break
                data += more
            request = json.loads(data)
            op = request.get("op")
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise ShimError(f"unknown operation {op!r}")
            reply = handler(request, fds, conn)
            if reply is not None:
                send_json(conn, dict(reply, ok=True))
        except (ShimError, AgentError, DriverError, oci.BundleError, ValueError, KeyError) as e:
            try:
                send_json(conn, {"ok": False, "error": str(e)})
            except OSError:
                pass
        except OSError:
            pass
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Let requests under way send their answers (a `start` whose process exits at
        once must still hear that it started) before the shim exits."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    def require(self, *statuses) -> None:
        status = self.record.get("status")
        if status not in statuses:
            raise ShimError(f"container {self.cid} is {status}")

    def op_start(self, request, fds, conn) -> dict:
        with self.lock:
            if self.record.get("status") != "created":
                raise ShimError(f"cannot start a container that is {self.record.get('status')}")
            self.sandbox.start_container(self.cid)
            self.update(status="running", started=st.now_rfc3339())
        return {}

    def op_kill(self, request, fds, conn) -> dict:
        sig = int(request["signal"])
        status = self.record.get("status")
        if status == "paused" and sig == signal.SIGKILL:
            self.sandbox.vm.stop()  # a frozen guest cannot take signals: end the VM
            return {}
        self.require("created", "running")
        self.sandbox.kill(self.cid, sig, bool(request.get("all")))
        return {}

    def op_pause(self, request, fds, conn) -> dict:
        with self.lock:
            self.require("running", "created")
            self.record["paused_from"] = self.record["status"]
            self.sandbox.vm.pause()
            self.update(status="paused")
        return {}

    def op_resume(self, request, fds, conn) -> dict:
        with self.lock:
            self.require("paused")
            self.sandbox.vm.resume()
            self.update(status=self.record.pop("paused_from", "running"))
        return {}

    def op_ps(self, request, fds, conn) -> dict:
        self.require("created", "running")
        return {"processes": self.sandbox.processes(self.cid)}

    def op_winsize(self, request, fds, conn) -> dict:
        exec_id = request.get("exec_id")
        if exec_id and exec_id != "init":
            seq = self.execs.get(exec_id, {}).get("seq")
        else:
            seq = request.get("seq") or self.tty_seq
        if not seq:
            raise ShimError("that process has no terminal")
        self.sandbox.winsize(seq, request["rows"], request["cols"])
        return {}

    def op_signal(self, request, fds, conn) -> dict:
        """Signal one exec'd process (``init`` is the container's own)."""
        self.require("running")
        exec_id = request.get("exec_id") or "init"
        if exec_id != "init" and exec_id not in self.execs:
            raise ShimError(f"no such process {exec_id!r} in container {self.cid}")
        self.sandbox.signal_process(self.cid, exec_id, int(request["signal"]))
        return {}

    def op_close_stdin(self, request, fds, conn) -> dict:
        exec_id = request.get("exec_id") or "init"
        seq = self.record.get("init_seq") if exec_id == "init" else self.execs.get(exec_id, {}).get("seq")
        if not seq:
            raise ShimError(f"no such process {exec_id!r} in container {self.cid}")
        self.sandbox.agent.close_stdin(seq)
        return {}

    def op_stats(self, request, fds, conn) -> dict:
        """The container's cgroup figures, read inside the guest."""
        self.require("running", "created")
        stats = {}
        for name in ("memory.current", "memory.max", "memory.stat", "cpu.stat", "pids.current",
                     "pids.max", "memory.events"):
            try:
                stats[name] = self.sandbox.read_cgroup(self.cid, name)
            except AgentError:
                stats[name] = ""
        return {"stats": stats}

    def op_update(self, request, fds, conn) -> dict:
        """New resource limits, written into the container's cgroup in the guest."""
        self.require("running", "created", "paused")
        for name, value in (request.get("cgroup") or {}).items():
            self.sandbox.write_cgroup(self.cid, name, str(value))
        return {}

    def op_shutdown(self, request, fds, conn) -> dict:
        self.finish(VM_DIED_STATUS)
        return {}

    def op_exec(self, request, fds, conn):
        """Run a process in the container; answers its pid, then (later) its exit."""
        self.require("running")
        agent = self.sandbox.agent
        process = request["process"]
        oci.check_process(process)
        terminal = bool(process.get("terminal"))
        with self.lock:
            self.exec_count += 1
            exec_id = request.get("exec_id") or f"exec-{self.exec_count}"
            if exec_id in self.execs or exec_id == "init":
                raise ShimError(f"process {exec_id!r} already exists")
            self.execs[exec_id] = {"seq": 0}
        seq_out = agent.new_seq()
        seq_err = 0 if terminal else agent.new_seq()
        console = request.get("console_socket")
        if terminal and console:
            slave = host_pty(console)
            agent.attach(seq_out, fd_sink(slave))
            stdin = os.dup(slave)
            owned = [slave]
        else:
            if len(fds) != 3:
                raise ShimError("exec needs the caller's stdin, stdout and stderr")
            stdin, stdout, stderr = (os.dup(fd) for fd in fds)
            agent.attach(seq_out, fd_sink(stdout))
            if seq_err:
                agent.attach(seq_err, fd_sink(stderr))
            owned = [stdout, stderr]
        message = oci.process_message(process, exec_id, seq_out, seq_err)
        try:
            pid = self.sandbox.exec(self.cid, message)
        except Exception:
            for fd in owned + [stdin]:
                os.close(fd)
            self.execs.pop(exec_id, None)
            raise
        self.execs[exec_id] = {"seq": seq_out, "pid": pid}
        with self.lock:
            self.update(execs={k: v.get("pid", 0) for k, v in self.execs.items()})
        pump_stdin(agent, seq_out, stdin)
        send_json(conn, {"ok": True, "pid": pid, "exec_id": exec_id, "seq": seq_out})
        event = agent.wait_exit(self.cid, exec_id, (seq_out, seq_err))
        for fd in owned:
            os.close(fd)
        status = int(event["status"]) if event else VM_DIED_STATUS
        with self.lock:
            exits = dict(self.record.get("exec_exits") or {}, **{exec_id: status})
            self.update(exec_exits=exits)
        try:
            send_json(conn, {"exit": status})
        except OSError:
            pass
        return None

    # ---- the whole life -------------------------------------------------------------

    def run(self, report_fd: int) -> int:
        """Boot, report to `create` through ``report_fd``, serve until the container exits."""
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self.forward_signal)
        try:
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
            self.boot()
            self.record = {
                "id": self.cid, "status": "created", "pid": os.getpid(),
                "shim_pid": os.getpid(), "shim_start": st.process_start_time(os.getpid()),
                "guest_pid": self.guest_pid, "bundle": self.bundle.path,
                "rootfs": self.bundle.rootfs, "created": st.now_rfc3339(), "owner": "root",
                "annotations": self.bundle.annotations, "qemu_pid": self.sandbox.vm.pid,
                "tty_seq": self.tty_seq, "init_seq": self.init_seq,
            }
            st.write(self.path, self.record)
            self.listen()
            threading.Thread(target=self.serve, name="serve", daemon=True).start()
            os.write(report_fd, json.dumps({"ok": True, "pid": os.getpid()}).encode())
            os.close(report_fd)
        except BaseException as e:
            log.exception("shim start-up failed")
            message = str(e) or type(e).__name__
            try:
                os.write(report_fd, json.dumps({"ok": False, "error": message}).encode())
            except OSError:
                pass
            self.teardown()
            return 1
        while not self.done.wait(1.0):
            pass
        self.wait_idle(5.0)
        self.teardown()
        return self.exit_status

    def on_winch(self, _signum, _frame) -> None:
        def resize():
            try:
                import fcntl
                import struct
                import termios
                rows, cols = struct.unpack("HHHH", fcntl.ioctl(
                    self.tty_fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
                self.sandbox.winsize(self.tty_seq, rows, cols)
            except Exception:
                pass
        threading.Thread(target=resize, daemon=True).start()

    def forward_signal(self, signum, _frame) -> None:
        if self.sandbox is not None and self.record.get("status") == "running":
            threading.Thread(target=self._kill_quietly, args=(signum,), daemon=True).start()

    def _kill_quietly(self, signum: int) -> None:
        try:
            self.sandbox.kill(self.cid, signum)
        except Exception:
            pass

    def teardown(self) -> None:
        if self.sandbox is not None:
            self.sandbox.destroy()
        try:
            os.unlink(os.path.join(self.path, st.SHIM_SOCKET))
        except OSError:
            pass


def spawn(cid: str, path: str, bundle: oci.Bundle, config, driver_name: str,
          console_socket: str, timeout: float, factory_maker=None, stdio_fds=()) -> int:
    """Fork the shim and wait until it has created the container; returns its pid.

    The container's stdio are the caller's fds 0, 1, 2, or ``stdio_fds`` when given."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setsid()
            for target, fd in enumerate(stdio_fds):
                os.dup2(fd, target)
            # Close the CLI's log handlers properly first: a file object closed later by
            # the garbage collector would close whatever fd has taken its number by then.
            for old in logging.getLogger().handlers:
                old.close()
            logging.getLogger().handlers = []
            # Keep only stdio and the report pipe: an inherited lock or socket of the
            # CLI must not live on in the shim.
            os.closerange(3, write_end)
            os.closerange(write_end + 1, 65536)
            handler = logging.FileHandler(os.path.join(path, "shim.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().handlers = [handler]
            status = Shim(cid, path, bundle, config, driver_name, console_socket,
                          factory_maker).run(write_end)
        finally:
            os._exit(status)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], timeout)
    raw = os.read(read_end, 65536) if ready else b""
    os.close(read_end)
    try:
        reply = json.loads(raw) if raw else {"ok": False, "error": "the shim did not answer"}
    except ValueError:
        reply = {"ok": False, "error": "the shim sent garbage"}
    if not reply.get("ok"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        raise ShimError(reply.get("error") or "the shim failed")
    return pid
