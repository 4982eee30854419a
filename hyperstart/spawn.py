"""Starting container processes: stdio, namespaces, the fork/exec dance.

A helper child enters (or creates) the container's namespaces and cgroup and forks the
real process, whose pid it reports; it then exits, so the real process is reparented to
the agent, which reaps it. The real process sets itself up (rootfs for an init, user,
limits, terminal) and execs; a failure before the exec comes back through a pipe that
closes on exec, so the host hears it as the command's ERROR.
"""
import fcntl
import os
import resource
import struct
import warnings  # noqa: F401  os.execvpe imports it, after the chroot where it cannot

import _signal as signal
import _socket as socket

from . import rootfs, security
from . import seccomp as seccomp_filter
from . import syscalls as sc
from .errors import Internal, InvalidArgument
from .model import Process

PTY_MARKER = -2   # in a child's stdio tuple: "open a pty in the container"
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}


class Spawner:
    """Creates the processes of containers for the agent, on one platform."""

    def __init__(self, platform):
        self.platform = platform

    def spawn(self, proc: Process, init: bool, wait: bool = False, shared: dict = None) -> None:
        """Start ``proc`` in its container. Returns once it has exec'd, or (with ``wait``)
        once its set-up is done and it waits for StartContainer; sets ``proc.pid``.
        A set-up failure raises Internal with the child's reason."""
        if proc.container.request.seccomp is not None:
            seccomp_filter.preload()
        child_stdio = make_stdio(proc)
        pid_r, pid_w = os.pipe()
        err_r, err_w = os.pipe()
        gate_r = -1
        if wait:
            gate_r, proc.start_gate = os.pipe()
        helper = os.fork()
        if helper == 0:
            try:
                os.close(pid_r)
                os.close(err_r)
                if init:
                    self.enter_new(proc, shared or {})
                else:
                    self.enter_existing(proc)
                pid = os.fork()
                if pid == 0:
                    self.exec_child(proc, init, child_stdio, err_w, gate_r)
                os.write(pid_w, str(pid).encode())
                os._exit(0)
            except BaseException as e:  # report any failure, never return into the loop
                try:
                    os.write(err_w, f"{e}".encode())
                finally:
                    os._exit(1)
        for fd in (pid_w, err_w, gate_r, *child_stdio):
            if fd >= 0 and fd not in (proc.stdin_fd, *proc.out_fds):
                try:
                    os.close(fd)
                except OSError:
                    pass  # the pty slave appears three times
        pid_raw = read_all(pid_r)
        os.waitpid(helper, 0)
        if proc.terminal:
            receive_pty(proc)
        # The error pipe closes at exec (close-on-exec), when a gated process has finished
        # its set-up, or when set-up fails after writing why.
        error = read_all(err_r).decode(errors="replace")
        if not pid_raw or error:
            discard_stdio(proc)
            if proc.start_gate >= 0:
                os.close(proc.start_gate)
                proc.start_gate = -1
            raise Internal(error or "container process could not be created")
        proc.pid = int(pid_raw)

    # ---- in the helper child ----------------------------------------------------------

    def enter_new(self, proc: Process, shared: dict) -> None:
        """Join the container's cgroup and make its namespaces: a cgroup namespace too
        where the platform gives containers one, rooted at the cgroup just joined. The
        namespaces in ``shared`` (type -> pid of the init whose they are) are joined."""
        self.platform.cgroups.join(proc.container.id)
        flags = sc.CLONE_NEWNS
        for kind, flag in (("uts", sc.CLONE_NEWUTS), ("ipc", sc.CLONE_NEWIPC),
                           ("pid", sc.CLONE_NEWPID)):
            if kind in shared:
                fd = os.open(f"/proc/{shared[kind]}/ns/{kind}", os.O_RDONLY)
                sc.setns(fd, flag)
                os.close(fd)
            else:
                flags |= flag
        if self.platform.cgroup_namespace:
            flags |= sc.CLONE_NEWCGROUP
        sc.unshare(flags)

    def enter_existing(self, proc: Process) -> None:
        """Join the namespaces, cgroup and root of the container's init."""
        container = proc.container
        init_pid = container.init.pid
        self.platform.cgroups.join(container.id)
        root_fd = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY)
        namespaces = [("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS),
                      ("pid", sc.CLONE_NEWPID), ("mnt", sc.CLONE_NEWNS)]
        if self.platform.cgroup_namespace:
            namespaces.insert(0, ("cgroup", sc.CLONE_NEWCGROUP))
        fds = [(os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY), flag)
               for ns, flag in namespaces]
        for fd, flag in fds:
            sc.setns(fd, flag)
            os.close(fd)
        os.fchdir(root_fd)
        os.chroot(".")
        os.close(root_fd)

    # ---- in the container process -----------------------------------------------------

    def exec_child(self, proc: Process, init: bool, stdio: tuple, err_w: int, gate_r: int) -> None:
        """Finish set-up and exec, in runc's order. Never returns."""
        spec = proc.spec
        container = proc.container
        request = container.request
        caps = spec.capabilities
        if caps is None and not init and container.init is not None:
            caps = container.init.spec.capabilities  # an exec gets its container's
        profile = request.seccomp
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM,
                        signal.SIGHUP, signal.SIGQUIT, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            if init:
                rootfs.setup_rootfs(request, container.root, self.platform.share_dir,
                                    self.platform.guest_devices, self.platform.volumes_dir)
                if request.domainname:
                    sc.setdomainname(request.domainname)
                security.set_sysctls(request.sysctl)
                rootfs.protect_paths(request, self.platform)
            os.setsid()
            if stdio[0] == PTY_MARKER:
                stdio = open_container_pty(stdio[1], spec.console_size)
            for target, fd in enumerate(stdio):
                os.dup2(fd, target)
            if proc.terminal:
                fcntl.ioctl(0, TIOCSCTTY, 0)
            close_fds_except({err_w, gate_r})
            apply_rlimits(spec.rlimits)
            if spec.oom_score_adj is not None:
                security.set_oom_score_adj(spec.oom_score_adj)
            if spec.no_new_privileges:
                sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            if profile is not None:
                # Compiled here, where errors still reach the host. Without no_new_privs
                # the filter needs CAP_SYS_ADMIN: loaded at once, while still root; with
                # it, loaded last, before exec.
                seccomp_ctx = seccomp_filter.build(profile)
                if not spec.no_new_privileges:
                    seccomp_filter.install(seccomp_ctx)
            security.switch_user(spec.user, caps)
            os.chdir(spec.cwd or "/")
            env = dict(e.split("=", 1) for e in spec.env if "=" in e)
            env.setdefault("PATH", DEFAULT_PATH)
            env.setdefault("HOME", "/root" if spec.user.uid == 0 else "/")
            args = spec.args
            if not args:
                raise InvalidArgument("process has no args")
        except BaseException as e:
            os.write(err_w, f"container set-up failed: {e}".encode())
            os._exit(1)
        if gate_r >= 0:
            os.close(err_w)   # set-up is done; the host sees success now
            if os.read(gate_r, 1) != b"s":  # blocks until the host starts the container
                os._exit(1)  # the gate closed without a start: the container was removed
            os.close(gate_r)
        try:
            if profile is not None and spec.no_new_privileges:
                seccomp_filter.install(seccomp_ctx)  # the last thing before exec
            os.execvpe(args[0], args, env)
        except FileNotFoundError:
            code, why = 127, "executable file not found in $PATH" if "/" not in args[0] \
                else "no such file or directory"
        except PermissionError:
            code, why = 126, "permission denied"
        except OSError as e:
            code, why = 126, e.strerror
        except InvalidArgument as e:
            code, why = 1, str(e)
        os.write(2, f"runv-py: exec: {args[0]!r}: {why}\n".encode())
        os._exit(code)


# ---- stdio ------------------------------------------------------------------------------

def make_stdio(proc: Process) -> tuple:
    """Pipes or a pty for the process; returns the child's (stdin, stdout, stderr). The
    agent's ends go to ``proc.stdin_fd`` and ``proc.out_fds``."""
    if proc.terminal:
        # The pty is opened by the process itself, from its container's own devpts,
        # so that ttyname() works there; the master comes back over this socket.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc.pty_channel = ours
        return (PTY_MARKER, theirs.detach(), -1)
    if proc.seq_out:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        os.set_blocking(in_w, False)
        os.set_blocking(out_r, False)
        proc.stdin_fd = in_w
        proc.out_fds[out_r] = proc.seq_out
    else:
        in_r = out_w = os.open("/dev/null", os.O_RDWR)
    if proc.seq_err:
        err_r, err_w = os.pipe()
        os.set_blocking(err_r, False)
        proc.out_fds[err_r] = proc.seq_err
    else:
        err_w = out_w
    return (in_r, out_w, err_w)


def receive_pty(proc: Process) -> None:
    channel = proc.pty_channel
    proc.pty_channel = None
    channel.settimeout(30)
    try:
        fds = recv_fds(channel)
    except OSError:
        fds = []
    finally:
        channel.close()
    if not fds:
        return  # set-up failed before the pty: the error pipe says why
    master = fds[0]
    os.set_blocking(master, False)
    proc.pty_master = proc.stdin_fd = master
    proc.out_fds[master] = proc.seq_out


def discard_stdio(proc: Process) -> None:
    for fd in list(proc.out_fds):
        os.close(fd)
    proc.out_fds.clear()
    if proc.stdin_fd >= 0 and proc.stdin_fd != proc.pty_master:
        os.close(proc.stdin_fd)
    proc.stdin_fd = proc.pty_master = -1


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks)


def recv_fds(channel) -> list:
    """File descriptors passed over ``channel`` with SCM_RIGHTS (none at end-of-file)."""
    _msg, ancdata, _flags, _addr = channel.recvmsg(16, socket.CMSG_SPACE(4 * 4))
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    return fds


def open_container_pty(channel_fd: int, size) -> tuple:
    """In the container process: open a pty from the container's /dev/ptmx, send the
    master to the agent, and return the slave as stdin, stdout and stderr."""
    master, slave = os.openpty()
    if size is not None and size.height and size.width:
        set_winsize(master, size.height, size.width)
    channel = socket.socket(fileno=channel_fd)
    channel.sendmsg([b"pty"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", master))])
    channel.close()
    os.close(master)
    return (slave, slave, slave)


def close_fds_except(keep: set) -> None:
    """Close every fd above stderr but ``keep``: a process waiting at its start gate
    must not hold the agent's channels or other processes' pipes."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3) + [65536]:
        os.closerange(low, fd)
        low = fd + 1


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def apply_rlimits(rlimits: list) -> None:
    for r in rlimits:
        if r.type not in RLIMITS:
            raise InvalidArgument(f"unknown rlimit {r.type}")
        resource.setrlimit(RLIMITS[r.type], (r.soft, r.hard))
