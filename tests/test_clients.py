"""Real OCI clients driving runv-py as their runtime: podman 4.3 (through conmon) and
docker 20.10 (through its own containerd and containerd's runc shim, which calls runv-py
exactly as it calls runc). Images come from archives the tests build; networking is
`none` (pods bring networks)."""
import glob
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
import uuid

import pytest

import images
from conftest import wait_vms_gone

RUNV = shutil.which("runv-py")
DOCKER = "/usr/bin/docker"     # the daemon's own client (another may be on PATH)
pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SECCOMP_NO_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                  "errnoRet": 1}]}


def in_pty(args: list, timeout: float = 90) -> tuple:
    """Run ``args`` with a terminal; returns (exit status, what it printed)."""
    pid, master = pty.fork()
    if pid == 0:
        os.execvp(args[0], args)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    os.close(master)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def leaked_cgroups(ids) -> list:
    return [p for cid in ids for p in glob.glob(f"/sys/fs/cgroup/*/*/*{cid}*")]


class Client:
    """One client (podman or docker) with private storage; remembers its containers."""

    def __init__(self, base: list):
        self.base = base
        self.ids = set()

    def __call__(self, *args, input=None, timeout=120, check=False) -> subprocess.CompletedProcess:
        r = subprocess.run(self.base + list(args), input=input, capture_output=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def started(self, *args) -> str:
        """Run ``args`` (a `run -d`); returns the container id."""
        cid = self(*args, check=True).stdout.decode().strip().splitlines()[-1]
        self.ids.add(cid)
        return cid

    def no_leaks(self) -> None:
        assert not wait_vms_gone(*self.ids, timeout=20), "QEMU or virtiofsd processes leaked"
        assert not leaked_cgroups(self.ids), leaked_cgroups(self.ids)
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
        assert not [cid for cid in self.ids if cid in mounts], "mounts leaked"


# ---- podman -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    if not shutil.which("podman") or not shutil.which("conmon"):
        pytest.skip("podman is not installed (apt-get install podman)")
    base = str(tmp_path_factory.mktemp("podman"))
    client = Client(["podman", "--root", f"{base}/root", "--runroot", f"{base}/run",
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file", "--tmpdir", f"{base}/tmp", "--runtime", RUNV])
    archive = images.docker_archive(f"{base}/busybox.tar", base, "localhost/runvpy/busybox:test")
    client("load", "-i", archive, check=True)
    client.image = "localhost/runvpy/busybox:test"
    yield client
    client("rm", "-af", "-t", "0", timeout=120)
    client.no_leaks()
    left = client("ps", "-aq").stdout.split()
    assert not left, f"containers left behind: {left}"


def run_args(client, *extra):
    return ["run", "--network", "none", *extra]


def test_podman_runs_with_exit_code_stdin_and_a_terminal(podman):
    r = podman(*run_args(podman, "--rm"), podman.image, "sh", "-c", "uname -r; exit 3")
    assert r.returncode == 3 and r.stdout.decode().strip().startswith("6.1")  # the guest's
    r = podman(*run_args(podman, "--rm", "-i"), podman.image, "sh", "-c", "cat; echo end",
               input=b"from stdin\n")
    assert (r.returncode, r.stdout) == (0, b"from stdin\nend\n")
    status, out = in_pty(podman.base + run_args(podman, "--rm", "-t") +
                         [podman.image, "sh", "-c", "tty; exit 4"])
    assert status == 4 and "/dev/pts/0" in out, out


def test_podman_detached_exec_logs_pause_stop_kill_rm(podman):
    cid = podman.started(*run_args(podman, "-d"), podman.image, "sh", "-c",
                         "echo up; trap 'echo bye; exit 7' TERM; while true; do sleep 0.2; done")
    r = podman("exec", cid, "sh", "-c", "echo in-exec; exit 5")
    assert (r.returncode, r.stdout) == (5, b"in-exec\n")
    podman("pause", cid, check=True)
    assert podman("inspect", "-f", "{{.State.Status}}", cid).stdout.strip() == b"paused"
    podman("unpause", cid, check=True)
    podman("stop", "-t", "20", cid, check=True)
    assert podman("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip() == b"7"
    assert podman("logs", cid).stdout == b"up\nbye\n"
    podman("rm", cid, check=True)
    other = podman.started(*run_args(podman, "-d"), podman.image, "sleep", "600")
    podman("kill", other, check=True)
    podman("wait", other, check=True)
    assert podman("inspect", "-f", "{{.State.ExitCode}}", other).stdout.strip() == b"137"
    podman("rm", other, check=True)


def test_podman_limits_read_only_capabilities_user_and_seccomp(podman, tmp_path):
    r = podman(*run_args(podman, "--rm", "-m", "64m", "--cpus", "1.5"), podman.image, "sh", "-c",
               "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; nproc", check=True)
    assert r.stdout.decode().split("\n")[:3] == [str(64 << 20), "150000 100000", "2"]
    r = podman(*run_args(podman, "--rm", "--read-only"), podman.image, "sh", "-c",
               "touch /f; touch /tmp/f && echo tmp-ok")
    assert b"Read-only file system" in r.stderr and r.stdout == b"tmp-ok\n"
    r = podman(*run_args(podman, "--rm", "--cap-drop", "all", "--cap-add", "NET_ADMIN"),
               podman.image, "grep", "CapEff", "/proc/self/status", check=True)
    assert int(r.stdout.split()[1], 16) == 1 << 12
    r = podman(*run_args(podman, "--rm", "--user", "1000:1001"), podman.image, "id", check=True)
    assert r.stdout.startswith(b"uid=1000 gid=1001") or b"uid=1000(1000) gid=1001" in r.stdout
    profile = tmp_path / "seccomp.json"
    profile.write_text(json.dumps(SECCOMP_NO_MKDIR))
    r = podman(*run_args(podman, "--rm", "--security-opt", f"seccomp={profile}"), podman.image,
               "sh", "-c", "mkdir /tmp/d; echo mkdir=$?; touch /tmp/f && echo touch-ok")
    assert r.stdout == b"mkdir=1\ntouch-ok\n" and b"Operation not permitted" in r.stderr


# ---- docker -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    if not shutil.which("dockerd") or not os.path.exists(DOCKER):
        pytest.skip("docker is not installed (apt-get install docker.io)")
    base = str(tmp_path_factory.mktemp("docker"))
    sock = f"{base}/docker.sock"
    config = {"runtimes": {"runvpy": {"path": RUNV}}, "bridge": "none", "iptables": False,
              "ip-masq": False, "storage-driver": "vfs"}
    with open(f"{base}/daemon.json", "w") as f:
        json.dump(config, f)
    log = open(f"{base}/dockerd.log", "wb")
    daemon = subprocess.Popen(["dockerd", "--config-file", f"{base}/daemon.json", "--data-root",
                               f"{base}/data", "--exec-root", f"{base}/exec", "--pidfile",
                               f"{base}/docker.pid", "-H", f"unix://{sock}"],
                              stdout=log, stderr=log, start_new_session=True)
    client = Client([DOCKER, "-H", f"unix://{sock}"])
    try:
        deadline = time.monotonic() + 60
        while client("version").returncode != 0:
            assert daemon.poll() is None, open(f"{base}/dockerd.log").read()[-3000:]
            assert time.monotonic() < deadline, "dockerd did not come up"
            time.sleep(0.5)
        client("load", "-i", images.docker_archive(f"{base}/busybox.tar", base,
                                                   "runvpy/busybox:test"), check=True)
        client.image = "runvpy/busybox:test"
        yield client
        left = client("ps", "-aq").stdout.split()
        if left:
            client("rm", "-f", *[x.decode() for x in left], timeout=120)
        assert not left, f"containers left behind: {left}"
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)
        log.close()
    client.no_leaks()
    subprocess.run(["rm", "-rf", f"{base}/data", f"{base}/exec"], timeout=60)


def docker_run(*extra):
    return ["run", "--runtime", "runvpy", "--network", "none", *extra]


def test_docker_runs_with_exit_code_stdin_and_a_terminal(docker):
    r = docker(*docker_run("--rm"), docker.image, "sh", "-c", "uname -r; exit 3")
    assert r.returncode == 3 and r.stdout.decode().strip().startswith("6.1")
    r = docker(*docker_run("--rm", "-i"), docker.image, "sh", "-c", "cat; echo end",
               input=b"from stdin\n")
    assert (r.returncode, r.stdout) == (0, b"from stdin\nend\n")
    status, out = in_pty(docker.base + docker_run("--rm", "-t") +
                         [docker.image, "sh", "-c", "tty; exit 4"])
    assert status == 4 and "/dev/pts/0" in out, out


def test_docker_detached_exec_stop_rm_and_errors_reach_the_user(docker):
    cid = docker.started(*docker_run("-d"), docker.image, "sh", "-c",
                         "echo up; trap 'echo bye; exit 7' TERM; while true; do sleep 0.2; done")
    r = docker("exec", cid, "sh", "-c", "echo in-exec; exit 5")
    assert (r.returncode, r.stdout) == (5, b"in-exec\n")
    docker("stop", "-t", "20", cid, check=True)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip() == b"7"
    assert docker("logs", cid).stdout == b"up\nbye\n"
    docker("rm", cid, check=True)
    # A create that fails in the guest: docker shows runv-py's own words (read from the
    # runtime's JSON --log), not "exit status 1: unknown".
    name = f"bad-{uuid.uuid4().hex[:6]}"
    r = docker(*docker_run("--rm", "--name", name, "--sysctl", "kernel.shmmax=oops"),
               docker.image, "true")
    assert r.returncode != 0 and b"shmmax" in r.stderr and b"Invalid argument" in r.stderr, r.stderr
