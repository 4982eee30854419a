"""Checkpoint and restore of a container's VM (runv_py/sandbox/checkpoint.py): runc's
CLI contract, and podman's checkpoint/restore (with --export/--import) through conmon.

A counter loop in the container proves that the restored one goes on from where it was:
a fresh start would count from 1 again."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import Runv, gone, qemu_pids, wait_vms_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

CHECKPOINTABLE = {"io.github.runv-py.checkpoint": "true"}
COUNTER = ["sh", "-c", "echo made-before > /kept; i=0; "
           "while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done"]


def count(runv, cid: str) -> int:
    return int(runv("exec", cid, "cat", "/count", check=True).stdout)


def wait_count(read, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = read()
            if value >= at_least:
                return value
        except (AssertionError, ValueError, OSError):
            pass  # the file may be half-written
        assert time.monotonic() < deadline, f"the counter did not reach {at_least}"
        time.sleep(0.2)


def started_counter(runv, bundle, cid: str, **changes) -> str:
    path = bundle(COUNTER, annotations=CHECKPOINTABLE, **changes)
    runv.detached("run", "-d", "-b", path, cid)
    wait_count(lambda: count(runv, cid), 10)
    return path


def files_of(path: str) -> dict:
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def test_the_counter_goes_on_in_a_new_vm_restored_into_another_root(runv, bundle, tmp_path):
    cid = runv.id()
    path = started_counter(runv, bundle, cid)
    shim = runv.state(cid)["pid"]
    image = str(tmp_path / "image")
    before = count(runv, cid)
    runv("checkpoint", "--image-path", image, "--work-path", str(tmp_path / "work"), cid,
         check=True)
    assert runv.state(cid)["status"] == "stopped"
    assert not qemu_pids(cid) and gone(shim)
    assert {"inventory.img", "runv-py.json", "vm.state"} <= set(os.listdir(image))
    assert os.path.isfile(tmp_path / "work" / "dump.log")
    runv("delete", cid, check=True)

    # Another --root stands in for another machine with the same kernel and initrd.
    other = Runv(str(tmp_path / "other-root"), runv.tag)
    try:
        other.detached("restore", "-d", "--image-path", image, "-b", path, cid)
        state = other.state(cid)
        assert state["status"] == "running" and os.path.exists(f"/proc/{state['pid']}")
        after = count(other, cid)
        assert after >= before, (before, after)
        assert wait_count(lambda: count(other, cid), after + 5) > after
        assert other("exec", cid, "cat", "/kept", check=True).stdout == b"made-before\n"
        other("kill", cid, "KILL", check=True)
        deadline = time.monotonic() + 30
        while other.state(cid)["status"] != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        other("delete", cid, check=True)
    finally:
        for left in os.listdir(other.root) if os.path.isdir(other.root) else []:
            other("delete", "--force", left, timeout=60)
    assert not wait_vms_gone(cid)


def test_left_running_and_a_second_copy_from_the_same_checkpoint(runv, bundle, tmp_path):
    cid, copy = runv.id("first"), runv.id("copy")
    path = started_counter(runv, bundle, cid)
    image = str(tmp_path / "image")
    before = count(runv, cid)
    runv("checkpoint", "--leave-running", "--image-path", image, cid, check=True)
    assert runv.state(cid)["status"] == "running"
    assert wait_count(lambda: count(runv, cid), before + 5) > before

    runv.detached("restore", "-d", "--image-path", image, "-b", path, copy)
    assert count(runv, copy) >= before
    assert runv.state(copy)["status"] == "running"
    # Two VMs now: what one writes, the other does not see.
    runv("exec", copy, "sh", "-c", "echo mine > /only-in-copy", check=True)
    assert runv("exec", cid, "test", "-e", "/only-in-copy").returncode == 1
    assert runv.state(copy)["pid"] != runv.state(cid)["pid"]
    boot_ids = {runv("exec", c, "cat", "/proc/sys/kernel/random/boot_id", check=True).stdout
                for c in (cid, copy)}
    assert len(boot_ids) == 2   # the copy's guest kernel is the same boot: its id is not
    for name in (cid, copy):
        runv("delete", "--force", name, check=True)


def test_bad_checkpoints_and_requests_fail_clearly_and_leave_nothing(runv, bundle, tmp_path):
    plain, cid = runv.id("plain"), runv.id("ck")
    runv.detached("run", "-d", "-b", bundle(["sleep", "600"]), plain)
    refused = runv("checkpoint", "--image-path", str(tmp_path / "no"), plain)
    assert refused.returncode != 0 and b"io.github.runv-py.checkpoint" in refused.stderr
    assert runv.state(plain)["status"] == "running"   # a refused checkpoint stops nothing
    assert b"--pre-dump" in runv("checkpoint", "--pre-dump", plain).stderr

    path = started_counter(runv, bundle, cid)
    # A full disk: the checkpoint fails with the reason, leaves no half-written files,
    # and the container runs on.
    full = str(tmp_path / "full")
    os.mkdir(full)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", full], check=True)
    try:
        for leave in ((), ("--leave-running",)):
            r = runv("checkpoint", *leave, "--image-path", f"{full}/image", cid)
            assert r.returncode != 0 and b"No space left" in r.stderr, r.stderr
            assert os.listdir(f"{full}/image") == []
            assert runv.state(cid)["status"] == "running"
    finally:
        subprocess.run(["umount", full], check=True)
    before = count(runv, cid)
    assert wait_count(lambda: count(runv, cid), before + 3) > before

    image = str(tmp_path / "image")
    runv("checkpoint", "--leave-running", "--image-path", image, cid, check=True)
    sizes = files_of(image)

    # An id that exists: refused, and the running container is untouched.
    taken = runv.detached("restore", "-d", "--image-path", image, "-b", path, cid, check=False)
    assert taken.returncode != 0 and b"exists" in taken.stderr
    assert runv.state(cid)["status"] == "running"

    def refused_restore(source: str, words: bytes) -> None:
        new = runv.id("bad")
        r = runv.detached("restore", "-d", "--image-path", source, "-b", path, new, check=False)
        assert r.returncode != 0 and words in r.stderr, r.stderr
        assert b"does not exist" in runv("state", new).stderr   # nothing half-restored
        assert not qemu_pids(new)

    refused_restore(str(tmp_path / "nothing-here"), b"no runv-py checkpoint")
    missing = bundle(COUNTER, annotations=CHECKPOINTABLE, mounts=[
        {"destination": "/data", "type": "bind", "source": str(tmp_path / "gone"),
         "options": ["rbind"]}])
    new = runv.id("nobind")
    r = runv.detached("restore", "-d", "--image-path", image, "-b", missing, new, check=False)
    assert r.returncode != 0 and b"does not exist" in r.stderr and not qemu_pids(new), r.stderr
    truncated = str(tmp_path / "truncated")
    shutil.copytree(image, truncated)
    with open(os.path.join(truncated, "vm.state"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(image, "vm.state")) // 2)
    refused_restore(truncated, b"truncated")
    other_kernel = str(tmp_path / "other-kernel")
    shutil.copytree(image, other_kernel)
    with open(os.path.join(other_kernel, "runv-py.json")) as f:
        meta = json.load(f)
    meta["kernel_sha256"] = "0" * 64
    with open(os.path.join(other_kernel, "runv-py.json"), "w") as f:
        json.dump(meta, f)
    refused_restore(other_kernel, b"another kernel")
    # The stream itself damaged (the sizes still agree): QEMU refuses it, nothing is left.
    damaged = str(tmp_path / "damaged")
    shutil.copytree(image, damaged)
    with open(os.path.join(damaged, "vm.state"), "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 64)
    refused_restore(damaged, b"restoring the VM")
    assert files_of(image) == sizes   # the checkpoint itself is unchanged
    for name in (cid, plain):
        runv("delete", "--force", name, check=True)


def smaps_rollup(pid: int) -> dict:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}


def test_warm_restores_share_the_checkpoint_s_memory_yet_differ(runv, bundle, tmp_path,
                                                                 cli_template):
    cid = runv.id("src")
    # A template's clone (as the node factory's VMs are): its RAM is a file's, which a
    # warm copy needs (a cold-booted VM's balloon reports free pages, and QEMU would
    # punch them out of a shared file).
    runv.detached("--template", cli_template, "run", "-d", "-b",
                  bundle(COUNTER, annotations=CHECKPOINTABLE), cid)
    wait_count(lambda: count(runv, cid), 10)
    image = str(tmp_path / "image")
    before = count(runv, cid)
    runv("checkpoint", "--image-path", image, cid, check=True)
    runv("delete", cid, check=True)
    made = json.loads(runv("manage", "warm-checkpoint", image, check=True).stdout)
    memory_file = made["memory_file"]
    try:
        warm_copies_run(runv, bundle, image, memory_file, before)
    finally:   # the memory file outlives every VM: a failed test must not leave it
        runv("manage", "cool-checkpoint", image)
    assert not os.path.exists(memory_file)


def warm_copies_run(runv, bundle, image: str, memory_file: str, before: int) -> None:
    assert os.stat(memory_file).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(memory_file)).st_mode & 0o777 == 0o700

    copies = [runv.id(f"warm{n}") for n in range(2)]
    for n, copy in enumerate(copies):
        runv.detached("restore", "-d", "--image-path", image, copy,
                      "-b", bundle(COUNTER, annotations=CHECKPOINTABLE, hostname=f"warm-{n}"))
    qemus = []
    for n, copy in enumerate(copies):
        assert count(runv, copy) >= before   # went on from the checkpoint
        assert runv("exec", copy, "hostname", check=True).stdout == f"warm-{n}\n".encode()
        with open(os.path.join(runv.root, copy, "state.json")) as f:
            qemus.append(json.load(f)["qemu_pid"])
    for source in ("/dev/urandom", "/proc/sys/kernel/random/boot_id"):
        seen = {runv("exec", c, "head", "-c", "16", source, check=True).stdout for c in copies}
        assert len(seen) == 2, source   # fresh entropy, a boot id each
    for pid in qemus:   # the RAM the clones have not written is one copy for both
        mem = smaps_rollup(pid)
        assert mem["Rss"] - mem["Pss"] > 10 * 1024, mem

    assert runv("manage", "cool-checkpoint", image).returncode == 0
    assert not os.path.exists(memory_file)
    assert wait_count(lambda: count(runv, copies[0]), before + 20) > before  # runs on
    cold = runv.id("whole")
    runv.detached("restore", "-d", "--image-path", image, "-b", bundle(COUNTER), cold)
    assert count(runv, cold) >= before   # the whole way again
    for name in (*copies, cold):
        runv("delete", "--force", name, check=True)


# ---- podman -------------------------------------------------------------------------------

from test_clients import podman  # noqa: E402,F401  (the module's podman fixture)


def test_podman_checkpoint_restore_export_and_import_under_a_new_name(podman, tmp_path):
    cid = podman.started("run", "-d", "--network", "none", "--annotation",
                         "io.github.runv-py.checkpoint=true", podman.image, *COUNTER)

    def read(name: str) -> int:
        return int(podman("exec", name, "cat", "/count", check=True).stdout)

    def status(name: str) -> str:
        return podman("inspect", "-f", "{{.State.Status}}", name, check=True).stdout.decode().strip()

    before = wait_count(lambda: read(cid), 10)
    stats = json.loads(podman("container", "checkpoint", "--print-stats", cid, check=True).stdout)
    assert status(cid) == "exited" and not qemu_pids(cid)
    dumped = stats["container_statistics"][0]["criu_statistics"]   # read from stats-dump
    assert dumped["frozen_time"] > 0 and dumped["pages_written"] > 1000, stats
    podman("container", "restore", cid, check=True)
    assert status(cid) == "running"
    after = read(cid)
    assert after >= before, (before, after)
    assert podman("exec", cid, "cat", "/kept", check=True).stdout == b"made-before\n"

    # Exported while it runs on; imported as a second container beside the first.
    archive = str(tmp_path / "exported.tar.gz")
    podman("container", "checkpoint", "--leave-running", "--export", archive, cid, check=True)
    assert status(cid) == "running"
    copy = f"copy-{cid[:12]}"
    podman("container", "restore", "--import", archive, "--name", copy, check=True)
    podman.ids.add(podman("inspect", "-f", "{{.Id}}", copy, check=True).stdout.decode().strip())
    assert status(copy) == "running" and status(cid) == "running"
    assert read(copy) >= after
    podman("exec", copy, "sh", "-c", "echo mine > /only-in-copy", check=True)
    assert podman("exec", cid, "test", "-e", "/only-in-copy").returncode == 1
    podman("rm", "-f", "-t", "0", copy, cid, check=True)


# ---- containerd -----------------------------------------------------------------------------

from test_containerd import IMAGE, NAMESPACE, RUNTIME, containerd, image_tar  # noqa: E402,F401


def test_ctr_checkpoint_of_a_running_task_and_its_live_restore(containerd):
    cid = f"ck-{containerd.tag}"
    containerd.check("run", "-d", "--runtime", RUNTIME, "--annotation",
                     "io.github.runv-py.checkpoint=true", IMAGE, cid, *COUNTER)
    reads = [0]

    def read() -> int:
        reads[0] += 1
        return int(containerd.check("task", "exec", "--exec-id", f"r{reads[0]}", cid, "cat", "/count"))

    before = wait_count(read, 10)
    ref = f"localhost/checkpoint/{cid}:1"
    containerd.check("containers", "checkpoint", "--task", cid, ref)
    assert wait_count(read, before + 5) > before   # containerd resumed it
    containerd.check("task", "kill", "-s", "KILL", cid)
    containerd.wait_status(cid, "STOPPED")
    containerd.check("task", "rm", cid)
    containerd.check("containers", "rm", cid)

    restorer = subprocess.Popen(["ctr", "-a", containerd.sock, "-n", NAMESPACE, "containers",
                                 "restore", "--live", cid, ref], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while containerd.task_status(cid) != "RUNNING":
            assert restorer.poll() in (None, 0), restorer.stderr.read()
            assert time.monotonic() < deadline, "the restored task did not run"
            time.sleep(0.2)
        after = read()
        assert after >= before, (before, after)
        assert containerd.check("task", "exec", "--exec-id", "kept", cid, "cat",
                                "/kept") == "made-before\n"
        containerd.check("task", "kill", "-s", "KILL", cid)
    finally:
        try:
            restorer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            restorer.kill()
            restorer.wait()


def test_podman_restores_a_container_with_a_terminal(podman):
    """conmon gives the restore a new console socket: the guest's terminal output (the
    pty is the guest's) goes on to it, and podman logs it."""
    script = "i=0; while true; do i=$((i+1)); echo $i > /count; echo tick $i; sleep 0.2; done"
    cid = podman.started("run", "-dt", "--network", "none", "--annotation",
                         "io.github.runv-py.checkpoint=true", podman.image, "sh", "-c", script)

    def read() -> int:
        return int(podman("exec", cid, "cat", "/count", check=True).stdout)

    before = wait_count(read, 5)
    podman("container", "checkpoint", cid, check=True)
    podman("container", "restore", cid, check=True)
    target = wait_count(read, before + 10)

    def logged() -> int:
        ticks = [int(w) for line in podman("logs", cid, check=True).stdout.decode().splitlines()
                 for w in line.split()[1:2] if line.startswith("tick") and w.isdigit()]
        return max(ticks, default=0)
    assert wait_count(logged, target) >= target   # printed after the restore, on the new tty
    podman("rm", "-f", "-t", "0", cid, check=True)


def test_podman_web_server_serves_on_after_restore_here_and_in_another_root(podman, tmp_path):
    """On podman's bridge network: the restored VM takes the new namespace's address
    and MAC, and its server, which never restarted, answers the host (the counter it
    serves goes on). Exported and imported into another storage root (a second
    machine's stand-in) with a new address and MAC, and restored in its own root too."""
    import tempfile
    import urllib.request
    import test_clients
    script = ("mkdir /www; httpd -p 8080 -h /www; i=0;"
              " while true; do i=$((i+1)); echo $i > /www/count; sleep 0.1; done")
    cid = podman.started("run", "-d", "--annotation", "io.github.runv-py.checkpoint=true",
                         podman.image, "sh", "-c", script)

    def inspect(client, name: str, field: str) -> str:
        return client("inspect", "-f", "{{.NetworkSettings.%s}}" % field, name,
                      check=True).stdout.decode().strip()

    def served(client, name: str) -> int:
        url = f"http://{inspect(client, name, 'IPAddress')}:8080/count"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.read())

    def guest_mac(client, name: str) -> str:
        return client("exec", name, "cat", "/sys/class/net/eth0/address",
                      check=True).stdout.decode().strip()

    before = wait_count(lambda: served(podman, cid), 10)
    address = inspect(podman, cid, "IPAddress")
    archive = str(tmp_path / "web.tar.gz")
    podman("container", "checkpoint", "--export", archive, cid, check=True)

    base = tempfile.mkdtemp(prefix="rvpm-", dir="/tmp")   # podman's runroot: under 50 chars
    other = test_clients.Client(["podman", "--root", f"{base}/root", "--runroot", f"{base}/run",
                                 "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                                 "--events-backend", "file", "--tmpdir", f"{base}/tmp",
                                 "--runtime", test_clients.RUNV])
    try:
        other("load", "-i", f"{os.path.dirname(podman.base[2])}/busybox.tar", check=True)
        # podman 4.3 keeps the exporter's conmon pid file path, so the import works
        # while the exported container exists (not removed) in the first root.
        other("container", "restore", "--import", archive, "--ignore-static-ip",
              "--ignore-static-mac", check=True)
        other.ids.add(cid)
        assert inspect(other, cid, "IPAddress") != address
        assert guest_mac(other, cid) == inspect(other, cid, "MacAddress")
        assert served(other, cid) >= before
        # One runtime state root for both (podman's default): the id is taken until then.
        other("rm", "-f", "-t", "0", cid, check=True)

        podman("container", "restore", cid, check=True)   # and at home, as it was
        assert inspect(podman, cid, "IPAddress") == address
        assert served(podman, cid) >= before
        assert guest_mac(podman, cid) == inspect(podman, cid, "MacAddress")
        podman("rm", "-f", "-t", "0", cid, check=True)
    finally:
        other("rm", "-af", "-t", "0", timeout=120)
        other.no_leaks()
        other("system", "reset", "-f", timeout=120)
        shutil.rmtree(base, ignore_errors=True)
