"""What only the namespace driver has to get right: it runs on the host's kernel, so its
cgroups, mounts and agent processes are the host's, and must all go away."""
import glob
import os
import signal
import subprocess
import time

import pytest

pytestmark = [pytest.mark.timeout(120)]


def leftovers(tag: str) -> list:
    agents = subprocess.run(["pgrep", "-f", f"hyperstart.hostagent.*runv-py:[^ ]*{tag}"],
                            capture_output=True, text=True).stdout.split()
    cgroups = [p for p in glob.glob("/sys/fs/cgroup/*/**/runv-py/*", recursive=True) if tag in p]
    return agents + cgroups


def wait_gone(tag: str, timeout: float = 10) -> list:
    deadline = time.monotonic() + timeout
    while leftovers(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return leftovers(tag)


@pytest.mark.parametrize("stage", ["sandbox", "container"])
def test_sigkill_of_the_runtime_leaves_no_agent_cgroup_or_mount(runv, bundle, stage):
    """Kill `runv-py run` while the sandbox starts, or once its container runs."""
    cid = runv.id()
    pattern = "/sys/fs/cgroup/pids/runv-py/" + cid + ("/" + cid if stage == "container" else "")
    proc = subprocess.Popen(runv.args("--driver", "namespace", "run", "-b",
                                      bundle(["sleep", "600"]), cid),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.isdir(pattern) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.isdir(pattern), f"the {stage} never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not wait_gone(runv.tag), f"leaked: {leftovers(runv.tag)}"
    with open("/proc/self/mountinfo") as f:
        assert runv.tag not in f.read()
    # A killed `run` leaves its state directory, under either driver: remove it.
    from runv_py.host import statedir
    statedir.remove(os.path.join(runv.root, cid))


def test_limits_and_proc_protection(runv, bundle):
    script = ("cat /hostpids/$(grep :pids: /proc/self/cgroup | cut -d: -f3)/pids.max; "
              "echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo sys-writable || echo sys-ro; "
              "cat /proc/timer_list 2>/dev/null | wc -c; hostname; "
              "grep CapBnd /proc/self/status | cut -f2; dmesg >/dev/null 2>&1 && echo dmesg || echo no-dmesg")
    b = bundle(["sh", "-c", script], hostname="nsbox",
               linux__resources={"pids": {"limit": 42}, "memory": {"limit": 64 << 20}})
    import json
    config = os.path.join(b, "config.json")
    spec = json.load(open(config))
    # To read the limit back, the host's pids hierarchy, read-only.
    spec["mounts"].append({"destination": "/hostpids", "type": "bind",
                           "source": "/sys/fs/cgroup/pids", "options": ["rbind", "ro"]})
    json.dump(spec, open(config, "w"))
    r = runv("--driver", "namespace", "run", "-b", b, runv.id(), check=True)
    limit, sys_state, timer_list, hostname, bounding, dmesg = r.stdout.decode().split()
    assert limit == "42"
    assert sys_state == "sys-ro"
    assert timer_list == "0"
    assert hostname == "nsbox"
    # The spec's capabilities (runc's default: AUDIT_WRITE, KILL, NET_BIND_SERVICE) bound
    # the container, so it cannot read the host's kernel log.
    assert int(bounding, 16) == (1 << 29) | (1 << 5) | (1 << 10)
    assert dmesg == "no-dmesg"
    assert not wait_gone(runv.tag)


def test_pause_freezes_the_whole_sandbox(runv, bundle):
    cid = runv.id()
    runv.detached("--driver", "namespace", "run", "-d", "-b", bundle(["sleep", "600"]), cid)
    try:
        runv("pause", cid, check=True)
        assert runv.state(cid)["status"] == "paused"
        frozen = glob.glob(f"/sys/fs/cgroup/freezer/**/runv-py/{cid}/freezer.state", recursive=True)
        assert frozen and open(frozen[0]).read().strip() == "FROZEN"
        runv("resume", cid, check=True)
        assert runv.state(cid)["status"] == "running"
    finally:
        runv("delete", "--force", cid, timeout=60)
    assert not wait_gone(runv.tag)
