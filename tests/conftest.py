"""Shared fixtures: a private state root, busybox bundles, and leak checks.

VM tests drive the real `runv-py` command against real QEMU with the installed guest
kernel and initrd; every one of them carries a timeout and is checked for leaks (QEMU
processes, state directories, mounts) after it ends, failed or not.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from runv_py.oci.busybox import make_bundle

KERNEL = os.environ.get("RUNV_KERNEL", "/var/lib/runv-py/kernel")
INITRD = os.environ.get("RUNV_INITRD", "/var/lib/runv-py/initrd.img")


def qemu_pids(tag: str) -> list:
    """Pids of QEMU processes whose -name carries ``tag``."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*runv-py:[^ ]*{tag}"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


class Runv:
    """Runs the runv-py CLI with a private --root; ids carry a per-test tag."""

    def __init__(self, root: str, tag: str):
        self.root = root
        self.tag = tag

    def id(self, name: str = "c") -> str:
        return f"{name}-{self.tag}"

    def args(self, *args) -> list:
        return [sys.executable, "-m", "runv_py.cli", "--root", self.root,
                "--kernel", KERNEL, "--initrd", INITRD, *args]

    def __call__(self, *args, input=None, timeout=120, check=False, **kw):
        result = subprocess.run(self.args(*args), input=input, capture_output=True,
                                timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"runv-py {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result


    def detached(self, *args, stdin=None, timeout=120, check=True):
        """Run a command whose children keep its stdio (create, run -d, exec -d): the
        output goes to files, so nothing waits for a pipe the shim holds open."""
        out = tempfile.TemporaryFile()
        err = tempfile.TemporaryFile()
        result = subprocess.run(self.args(*args), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=out, stderr=err, timeout=timeout)
        out.seek(0)
        err.seek(0)
        result.stdout, result.stderr = out.read(), err.read()
        if check and result.returncode != 0:
            raise AssertionError(f"runv-py {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def state(self, cid: str) -> dict:
        return json.loads(self("state", cid, check=True).stdout)


@pytest.fixture
def runv(tmp_path):
    tag = uuid.uuid4().hex[:8]
    root = str(tmp_path / "state")
    r = Runv(root, tag)
    yield r
    # A test that failed half-way leaves containers behind: delete them as a user would,
    # then check that nothing leaked: no QEMU, no state directory, no mount.
    for cid in os.listdir(root) if os.path.isdir(root) else []:
        r("delete", "--force", cid, timeout=60)
    deadline = time.monotonic() + 5
    while qemu_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = qemu_pids(tag)
    for pid in leaked:
        os.kill(pid, 9)
    left = os.listdir(root) if os.path.isdir(root) else []
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if root in line]
    assert not leaked, f"QEMU processes leaked: {leaked}"
    assert not [d for d in left if tag in d], f"state directories leaked: {left}"
    assert not mounts, f"mounts leaked: {mounts}"


@pytest.fixture
def bundle(tmp_path):
    """make(args, **spec_changes) -> path of a busybox bundle running ``args``."""
    count = [0]

    def make(args, readonly=False, **changes):
        count[0] += 1
        path = str(tmp_path / f"bundle{count[0]}")
        make_bundle(path, args, readonly=readonly)
        if changes:
            config = os.path.join(path, "config.json")
            with open(config) as f:
                spec = json.load(f)
            for key, value in changes.items():
                target = spec
                parts = key.split("__")
                for part in parts[:-1]:
                    target = target.setdefault(part, {})
                target[parts[-1]] = value
            with open(config, "w") as f:
                json.dump(spec, f)
        return path
    return make
