"""The per-sandbox shim: the process that owns one sandbox, the part containerd-shim
plays for runc.

It boots the VM (which dies with it: QEMU's parent-death signal), creates the container
through the sandbox API, forwards the container's stdio to the fds it was started with
(or a pty handed to --console-socket), keeps the container's record (state.json) and
answers requests on ``shim.sock`` (protocol.py). It is also the container's host pid: it
lives as long as the container's init and exits with its status.
"""
import logging
import os
import select
import signal
import socket
import threading

from ..hyperstart import states, syscalls
from ..hyperstart.errors import FailedPrecondition, NotFound, RunvError, Unavailable
from ..oci import bundle as oci
from ..oci.state import now_rfc3339
from ..host import proc as hostproc
from ..sandbox import checkpoint
from ..sandbox import VM_DIED_STATUS, Container, ProcessIO, Sandbox
from . import member
from .checkpoint import op_checkpoint, restore
from .namespaces import enter_namespaces
from . import protocol as p
from .params import ShimParams
from .records import SHIM_SOCKET, Record
from .terminal import host_pty, terminal_size

log = logging.getLogger("runv_py.shim")

# A request is one JSON line sent at once: one larger than this, or one not complete
# within the timeout (a client that stalls half-way), gets an error and frees its thread.
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 5.0
# Requests served at once (an exec or wait holds its thread until the process exits);
# one over the bound is refused at once, so a flood cannot exhaust the shim's threads.
MAX_REQUESTS = 128

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
# While the shim boots there is no container to forward to: these stop the start-up.
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class StoppedWhileBooting(Unavailable):
    """A stopping signal came before the container was reported created."""


class ShimServer:
    def __init__(self, params: ShimParams):
        self.params = params
        self.cid = params.cid
        self.path = params.state_dir
        self.bundle = oci.load(params.bundle)
        self.sandbox = None
        self.container: Container = None
        self.host_cgroup = None       # linux.cgroupsPath on the host (host/cgroups.py)
        self.record = Record(id=self.cid, status=states.CREATING, pid=os.getpid(),
                             bundle=self.bundle.path, rootfs=self.bundle.rootfs,
                             created=now_rfc3339(), owner="root",
                             annotations=self.bundle.annotations, shim_pid=os.getpid(),
                             shim_start=hostproc.start_time(os.getpid()), path=self.path)
        self.lock = threading.Lock()
        self.members = set()          # pod members' containers in our VM (member.py)
        self.infra = None             # a member's: the record of the VM's owner
        self.done = threading.Event()
        self.exit_status = VM_DIED_STATUS
        self.exit_signal = 0          # the signal that ended the container, if one did
        self.exec_count = 0
        self.tty_fd = -1
        self.listener = None
        self.in_flight = 0
        self.idle = threading.Condition()
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self.booting = True       # until the spawner has our report
        self.stop_signal = 0      # a stopping signal that came while booting

    # ---- start-up -------------------------------------------------------------------

    def boot(self) -> None:
        from ..vm.boot import BootConfig
        config = BootConfig(**self.params.config)
        if self.params.restore_from:
            return restore(self, config)
        infra = member.find_infra(os.path.dirname(self.path), self.bundle.spec, self.cid)
        if infra is not None:
            return member.join(self, infra)
        from ..drivers import probe
        from ..factory.client import for_shim
        params = self.params
        factory = for_shim(probe(params.driver), config, params.factory_policy, params.template_dir)
        network = enter_namespaces(self, getattr(factory, "late_network", False))
        self.sandbox = Sandbox.boot(self.cid, factory, config, self.path,
                                    hostname=self.bundle.hostname, network=network)
        self.took_sandbox(network)
        self.container = self.sandbox.create_container(
            self.cid, self.bundle, self.init_io(), host_pid=os.getpid(),
            console_size=terminal_size(0) if params.tty_on_stdio else None,
            rootfs_in_guest=checkpoint.wanted(self.bundle, self.sandbox))
        self.took_container()

    def took_sandbox(self, network) -> None:
        self.record.qemu_pid = self.sandbox.vm.pid
        if self.record.netns:
            self.update(taps=[i.tap for i in getattr(network, "attached", [])])
        if self.host_cgroup is not None:
            self.host_cgroup.pin(self.sandbox.vm)
        self.sandbox.listeners.append(self.on_exit)

    def took_container(self) -> None:
        self.container.state.listeners.append(lambda old, new: self.update(status=new))
        self.update(status=self.container.state.status)

    def init_io(self) -> ProcessIO:
        """The init's stdio: ours (inherited from create), or a pty for a terminal."""
        if not self.bundle.terminal or self.params.tty_on_stdio:
            return ProcessIO(0, 1, 2, owned=False)  # `run` in a terminal: ours is one
        if not self.params.console_socket:
            raise FailedPrecondition("terminal is true but no --console-socket was given")
        slave = host_pty(self.params.console_socket, controlling=True)
        self.tty_fd = slave
        signal.signal(signal.SIGWINCH, self.on_winch)
        return ProcessIO(slave, os.dup(slave), -1)

    def on_exit(self, container: Container, proc) -> None:
        if container.id != self.cid:
            return  # a pod member's: its own shim waits for it
        if proc is container.init:
            self.update(exit_status=proc.exit.status, oom_killed=proc.exit.oom,
                        finished=now_rfc3339())
            self.finish(proc.exit.status, proc.exit.signal)
        else:
            self.update(exec_exits=dict(self.record.exec_exits, **{proc.id: proc.exit.status}))

    def finish(self, status: int, sig: int = 0) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.exit_status, self.exit_signal = status, sig
            self.done.set()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def update(self, **changes) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self.record, name, value)
            self.record.write()

    # ---- serving --------------------------------------------------------------------

    def listen(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dirfd = os.open(self.path, os.O_PATH | os.O_DIRECTORY)
        listener.bind(f"/proc/self/fd/{dirfd}/{SHIM_SOCKET}")
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
            if not self.slots.acquire(blocking=False):
                p.refuse(conn, Unavailable(f"the shim serves at most {MAX_REQUESTS} requests "
                                         "at once; try again"))
                continue
            with self.idle:
                self.in_flight += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        listener.close()

    def handle(self, conn: socket.socket) -> None:
        fds = []
        try:
            req, fds = p.recv_request(conn, MAX_REQUEST, REQUEST_TIMEOUT)
            req.container = req.container or self.cid
            if req.container != self.cid and req.OP != "join" and req.container not in self.members:
                raise NotFound(f"container {req.container!r} does not exist in this sandbox")
            if self.infra is not None:
                reply = member.relay(self, req, fds, conn)
            else:
                reply = getattr(self, "op_" + req.OP)(req, fds, conn)
            if reply is not None:
                conn.sendall(p.ok(**reply))
        except Exception as e:  # every failure goes back to the caller, typed
            if not isinstance(e, RunvError):
                log.exception("request failed")
            try:
                conn.sendall(p.error(e))
            except OSError:
                pass
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()
            self.slots.release()
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Let requests under way send their answers (a `start` whose process exits at
        once must still hear that it started) before the shim exits."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    # ---- operations -----------------------------------------------------------------

    def op_start(self, req: p.Start, fds, conn) -> dict:
        from ..net.late import connect_to_guest
        own = req.container == self.cid
        if own:
            connect_to_guest(self.sandbox)
        self.sandbox.start_container(req.container)
        if own:
            self.update(started=now_rfc3339())
        return {}

    def op_kill(self, req: p.Kill, fds, conn) -> dict:
        self.sandbox.kill(req.container, req.signal, req.all)
        return {}

    def op_signal(self, req: p.Signal, fds, conn) -> dict:
        self.sandbox.signal(req.container, req.exec_id, req.signal)
        return {}

    def op_pause(self, req: p.Pause, fds, conn) -> dict:
        self.sandbox.pause()
        return {}

    def op_resume(self, req: p.Resume, fds, conn) -> dict:
        self.sandbox.resume()
        return {}

    def op_ps(self, req: p.Ps, fds, conn) -> dict:
        return {"processes": [i.to_wire() for i in self.sandbox.processes(req.container)]}

    def op_winsize(self, req: p.Winsize, fds, conn) -> dict:
        self.sandbox.resize(req.container, req.exec_id, req.rows, req.cols)
        return {}

    def op_close_stdin(self, req: p.CloseStdin, fds, conn) -> dict:
        self.sandbox.close_stdin(req.container, req.exec_id)
        return {}

    def op_stats(self, req: p.Stats, fds, conn) -> dict:
        return {"stats": self.sandbox.stats(req.container).to_json()}

    def op_update(self, req: p.Update, fds, conn) -> dict:
        self.sandbox.update(req.container, req.resources or {})
        if self.host_cgroup is not None and req.container == self.cid:  # runc's: the host's
            with self.sandbox.lock:           # one QMP user at a time (pause takes it too)
                self.host_cgroup.update(req.resources or {}, self.sandbox.vm)
        return {}

    op_checkpoint = op_checkpoint
    op_join = member.op_join      # a pod member's container into our VM
    op_leave = member.op_leave

    def op_shutdown(self, req: p.Shutdown, fds, conn) -> dict:
        self.finish(VM_DIED_STATUS)
        return {}

    def op_exec(self, req: p.Exec, fds, conn):
        """Run a process in the container; answers its pid, then (later) its exit."""
        process = dict(req.process or {})
        terminal = bool(process.get("terminal"))
        if terminal and req.console_socket:
            slave = host_pty(req.console_socket)
            io = ProcessIO(slave, os.dup(slave), -1)
        elif len(fds) == 3:
            io = ProcessIO(*(os.dup(fd) for fd in fds))
        else:
            raise FailedPrecondition("exec needs the caller's stdin, stdout and stderr")
        with self.lock:
            self.exec_count += 1
            exec_id = req.exec_id or f"exec-{self.exec_count}"
        proc = self.sandbox.exec(req.container, exec_id, process, io)
        if req.container == self.cid:
            self.update(execs=dict(self.record.execs, **{exec_id: proc.pid}))
        conn.sendall(p.ok(pid=proc.pid, exec_id=exec_id))
        return self.op_wait(p.Wait(req.container, exec_id), fds, conn)

    def op_wait(self, req: p.Wait, fds, conn):
        exit = self.sandbox.wait(req.container, req.exec_id)
        try:
            conn.sendall(p.ok(exit=exit.status, signal=exit.signal))
        except OSError:
            pass  # the caller went away; the record keeps the exit
        return None

    # ---- the whole life -------------------------------------------------------------

    def run(self, report_fd: int) -> int:
        """Boot, report to the spawner through ``report_fd``, serve until the container
        exits; returns its exit status."""
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self.forward_signal)
        try:
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
            self.record.write()
            self.boot()
            if self.stop_signal:
                raise self.stopped()  # a clean-up on the way caught it and went on
            self.listen()
            threading.Thread(target=self.serve, name="serve", daemon=True).start()
            self.booting = False  # from here a signal is the container's
            os.write(report_fd, p.ok(pid=os.getpid()))
            os.close(report_fd)
        except BaseException as e:
            self.booting = False  # a second signal must not break the clean-up
            log.exception("shim start-up failed")
            try:
                os.write(report_fd, p.error(e))
            except OSError:
                pass
            self.teardown()
            return 1
        while not self.done.wait(1.0):
            pass
        if self.members:  # their shims' waits hold requests open: the VM ends them now
            self.sandbox.destroy()
        self.wait_idle(5.0)
        self.teardown()
        return self.exit_status

    def stopped(self) -> StoppedWhileBooting:
        return StoppedWhileBooting(f"the shim got signal {self.stop_signal} while starting "
                                   "the container: stopped")

    def on_winch(self, _signum, _frame) -> None:
        def resize():
            size = terminal_size(self.tty_fd)
            if size:
                try:
                    self.sandbox.resize(self.cid, "", *size)
                except RunvError:
                    pass
        threading.Thread(target=resize, daemon=True).start()

    def forward_signal(self, signum, _frame) -> None:
        """Signals sent to the container's host pid (us) go to the container. One that
        stops a process, sent while we boot, ends the start-up instead: raised in the
        main thread wherever the boot is, it unwinds through the boot's clean-ups (the
        VM is stopped, the spawner is told and removes the state)."""
        if self.booting and signum in STOPPING_SIGNALS:
            self.booting = False
            self.stop_signal = signum
            raise self.stopped()

        def kill():
            try:
                if self.infra is not None:
                    return member.kill(self, signum)
                self.sandbox.kill(self.cid, signum)
            except RunvError:
                pass
        if self.infra is not None or self.container is not None and self.container.state.is_(states.RUNNING):
            threading.Thread(target=kill, daemon=True).start()

    def teardown(self) -> None:
        if self.sandbox is not None:
            self.sandbox.destroy()
        try:
            os.unlink(os.path.join(self.path, SHIM_SOCKET))
        except OSError:
            pass
