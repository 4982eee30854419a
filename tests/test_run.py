"""`runv-py run`: a container in a real VM (QEMU, guest kernel, hyperstart agent), and
the same bundles under the namespace driver (the same agent on the host)."""
import glob
import hashlib
import os
import platform
import signal
import subprocess
import time

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]


@pytest.fixture(params=[("", "9p"), ("", "virtiofs"), ("namespace", "")],
                ids=["qemu-9p", "qemu-virtiofs", "namespace"])
def driver(request) -> tuple:
    """('', share) is the default driver (QEMU, TCG on this host) with the rootfs shared
    over 9p or virtio-fs; 'namespace' runs no VM."""
    return request.param


def needs_vm(driver: str, why: str) -> None:
    if driver == "namespace":
        pytest.skip(f"needs a VM: {why}")


def namespace_leftovers(tag: str) -> list:
    agents = subprocess.run(["pgrep", "-f", f"hyperstart.hostagent.*runv-py:[^ ]*{tag}"],
                            capture_output=True, text=True).stdout.split()
    cgroups = [p for p in glob.glob("/sys/fs/cgroup/*/**/runv-py/*", recursive=True) if tag in p]
    return agents + cgroups


@pytest.fixture
def runv(runv, driver):
    """The conftest runner, with ``--driver`` set; also checks the namespace driver's
    agents and cgroups are gone afterwards."""
    name, share = driver
    flags = (["--driver", name] if name else []) + (["--share", share] if share else [])
    base = runv.args
    runv.args = lambda *args: base(*flags, *args)
    runv.driver = name
    yield runv
    deadline = time.monotonic() + 5
    while namespace_leftovers(runv.tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = namespace_leftovers(runv.tag)
    for pid in [int(x) for x in leaked if x.isdigit()]:
        try:
            os.kill(pid, signal.SIGTERM)  # the launcher then kills its agent, removes cgroups
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while namespace_leftovers(runv.tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leaked, f"namespace agents or cgroups leaked: {leaked}"


def out(result) -> str:
    return result.stdout.decode()


def test_runs_in_guest_kernel_with_hostname_and_pid1(runv, bundle):
    b = bundle(["sh", "-c", "uname -r; hostname; echo $$; cat /proc/1/cmdline | tr '\\0' ' '"],
               hostname="vmbox")
    r = runv("run", "-b", b, runv.id(), check=True)
    release, hostname, pid, cmdline = out(r).splitlines()
    if runv.driver == "namespace":
        assert release == platform.release()  # no VM: the host's kernel
    else:
        assert release != platform.release()
        assert release.startswith("6.1.")
    assert hostname == "vmbox"
    assert pid == "1"
    assert cmdline.startswith("sh -c uname -r")


def test_exit_codes(runv, bundle):
    assert runv("run", "-b", bundle(["sh", "-c", "exit 7"]), runv.id()).returncode == 7
    assert runv("run", "-b", bundle(["true"]), runv.id("t")).returncode == 0
    # PID 1 of a pid namespace ignores its own signals, so the signal death comes from
    # the guest's OOM killer: 32 MiB of memory, and tail buffering an endless line.
    b = bundle(["sh", "-c", "tail /dev/zero; echo survived"],
               linux__resources={"memory": {"limit": 32 * 1024 * 1024}})
    r = runv("run", "-b", b, runv.id("s"))
    assert r.returncode == 128 + signal.SIGKILL
    assert b"survived" not in r.stdout
    r = runv("run", "-b", bundle(["no-such-binary"]), runv.id("n"))
    assert r.returncode == 127
    assert b"no-such-binary" in r.stderr and b"not found" in r.stderr
    r = runv("run", "-b", bundle(["/etc/passwd"]), runv.id("x"))
    assert r.returncode == 126


def test_stdin_reaches_the_container(runv, bundle):
    r = runv("run", "-b", bundle(["cat"]), runv.id(), input=b"a\nb\n", check=True)
    assert r.stdout == b"a\nb\n"


def test_large_stdout_is_byte_identical_and_stderr_separate(runv, bundle, tmp_path):
    # 20 MB of pseudo-random bytes made in the guest; its sha256 goes to stderr.
    script = ("head -c 20971520 /dev/urandom > /dev/shm/data; "
              "sha256sum /dev/shm/data | cut -d' ' -f1 >&2; cat /dev/shm/data")
    r = runv("run", "-b", bundle(["sh", "-c", script]), runv.id(), check=True)
    assert len(r.stdout) == 20971520
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.decode().strip()


def test_flood_into_a_closed_pipe_ends(runv, bundle):
    # `runv-py run ... yes | head -c 1000`: once head has gone, yes must find its pipe
    # closed as it would under runc, instead of flooding into the void forever. As PID 1
    # of its pid namespace it ignores SIGPIPE (as under runc) and dies of EPIPE.
    cmd = " ".join(runv.args("run", "-b", bundle(["yes"]), runv.id()))
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 1000 | wc -c"],
                       capture_output=True, timeout=60)
    assert r.stdout.strip() == b"1000"
    assert r.returncode == 1 and b"Broken pipe" in r.stderr


def test_env_cwd_args(runv, bundle):
    b = bundle(["sh", "-c", 'echo "$GREETING|$(pwd)|$0|$1"', "zero", "one"],
               process__env=["PATH=/bin:/sbin", "GREETING=hi there"], process__cwd="/tmp")
    r = runv("run", "-b", b, runv.id(), check=True)
    assert out(r).strip() == "hi there|/tmp|zero|one"


def test_readonly_root_tmpfs_and_bind_mount(runv, bundle, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host data\n")
    b = bundle(["sh", "-c", "touch /x 2>&1; echo ro=$?; echo tmp > /scratch/f && cat /scratch/f; "
                            "grep -q ' /scratch tmpfs' /proc/mounts && echo tmpfs-ok; "
                            "cat /data/from-host; echo guest > /data/from-guest"],
               readonly=True)
    import json
    config = os.path.join(b, "config.json")
    spec = json.load(open(config))
    spec["mounts"] += [
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        {"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "rw"]},
    ]
    json.dump(spec, open(config, "w"))
    r = runv("run", "-b", b, runv.id(), check=True)
    lines = out(r).splitlines()
    assert "Read-only file system" in lines[0]
    assert lines[1] == "ro=1"
    assert lines[2:] == ["tmp", "tmpfs-ok", "host data"]
    assert (shared / "from-guest").read_text() == "guest\n"


def test_readonly_bind_mount(runv, bundle, tmp_path):
    shared = tmp_path / "ro"
    shared.mkdir()
    b = bundle(["sh", "-c", "echo x > /data/f"])
    import json
    config = os.path.join(b, "config.json")
    spec = json.load(open(config))
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(shared),
                           "options": ["bind", "ro"]})
    json.dump(spec, open(config, "w"))
    r = runv("run", "-b", b, runv.id())
    assert r.returncode != 0
    assert b"Read-only file system" in r.stderr
    assert not (shared / "f").exists()


@pytest.mark.parametrize("breakage,message", [
    ("no-config", "config.json not found"),
    ("bad-json", "invalid JSON at line"),
    ("no-rootfs", "rootfs"),
    ("no-args", "process.args"),
])
def test_bad_bundles(runv, bundle, breakage, message):
    b = bundle(["true"])
    config = os.path.join(b, "config.json")
    if breakage == "no-config":
        os.unlink(config)
    elif breakage == "bad-json":
        with open(config, "a") as f:
            f.write("{oops")
    elif breakage == "no-rootfs":
        os.rename(os.path.join(b, "rootfs"), os.path.join(b, "gone"))
    elif breakage == "no-args":
        import json
        spec = json.load(open(config))
        spec["process"]["args"] = []
        json.dump(spec, open(config, "w"))
    r = runv("run", "-b", b, runv.id())
    assert r.returncode != 0
    assert message in r.stderr.decode()
    assert not os.path.exists(os.path.join(runv.root, runv.id()))


def test_missing_kernel_and_qemu(runv, bundle, tmp_path):
    needs_vm(runv.driver, "the namespace driver uses no guest kernel and no QEMU")
    b = bundle(["true"])
    r = runv("--kernel", str(tmp_path / "nokernel"), "run", "-b", b, runv.id())
    assert r.returncode != 0 and b"guest kernel" in r.stderr and b"nokernel" in r.stderr
    env = dict(os.environ, RUNV_QEMU=str(tmp_path / "no-qemu"))
    r = runv("run", "-b", b, runv.id("q"), env=env)
    assert r.returncode != 0 and b"no-qemu" in r.stderr and b"not found" in r.stderr


@pytest.mark.parametrize("cid", ["../escape", "a/b", "", "x" * 1000, ".."])
def test_bad_container_ids(runv, bundle, cid):
    r = runv("run", "-b", bundle(["true"]), cid)
    assert r.returncode != 0
    assert b"container id" in r.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(runv.root), "escape"))


def test_guest_panic_is_reported(runv, bundle):
    needs_vm(runv.driver, "sysrq 'c' would panic the host's kernel, not a guest's")
    # Writing 'c' to sysrq-trigger panics the guest kernel; the run must end, not hang.
    # (runc's default spec makes it read-only: this container is allowed to.)
    b = bundle(["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 100"], linux__readonlyPaths=[])
    r = runv("run", "-b", b, runv.id(), timeout=60)
    assert r.returncode != 0


def test_terminal_run_in_the_foreground(runv, bundle):
    """`runv-py run` of a bundle with terminal: true, from a real terminal (a pty here)."""
    import pty
    import select
    b = bundle(["sh"], process__terminal=True)
    pid, master = pty.fork()
    if pid == 0:
        args = runv.args("run", "-b", b, runv.id())
        os.execv(args[0], args)
    out = b""
    deadline = time.monotonic() + 60
    sent = False
    while time.monotonic() < deadline:
        if not sent and b"# " in out:   # type only once the shell prompts, as a person would
            os.write(master, b"tty; exit 3\n")
            sent = True
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, out
    assert b"/dev/pts/0" in out
