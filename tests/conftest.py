"""Shared fixtures: a private state root, busybox bundles, and leak checks.

VM tests drive the real `runv-py` command against real QEMU with the installed guest
kernel and initrd; every one of them carries a timeout and is checked for leaks (QEMU
and virtiofsd processes, state directories, mounts) after it ends, failed or not.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from runv_py import paths
from runv_py.oci.busybox import make_bundle

# The node factory serves the default runv-py; the suite runs VMs the shims boot
# themselves (its leak checks find each QEMU by the container id in its -name), and
# test_node_factory.py runs private factories.
os.environ["RUNV_FACTORY"] = "off"

KERNEL = os.environ.get("RUNV_KERNEL", paths.KERNEL)
INITRD = os.environ.get("RUNV_INITRD", paths.INITRD)


def qemu_pids(tag: str) -> list:
    """Pids of QEMU processes whose -name carries ``tag``."""
    # QEMU itself, not the jail's tools whose command lines carry QEMU's (host/jail.py).
    out = subprocess.run(["pgrep", "-f", f"^[^ ]*qemu-system-x86_64 .*runv-py:[^ ]*{tag}"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def share_server_pids(tag: str) -> list:
    """Pids of virtiofsd or virtfs-proxy-helper processes serving a share whose path
    carries ``tag``."""
    out = subprocess.run(["pgrep", "-f", f"^[^ ]*(virtiofsd|virtfs-proxy-helper) .*{tag}"],
                         capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def vm_pids(tag: str) -> list:
    """What a VM whose name carries ``tag`` runs on the host: QEMU and its share's server."""
    return qemu_pids(tag) + share_server_pids(tag)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (its parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_vms_gone(*tags: str, timeout: float = 5) -> list:
    """Wait until no QEMU or virtiofsd of ``tags`` is left; returns the pids that are."""
    deadline = time.monotonic() + timeout
    while any(vm_pids(t) for t in tags) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for t in tags for pid in vm_pids(t)]


def mounts_under(path: str) -> list:
    """Mounts at or below ``path`` in every mount namespace on the host, each namespace
    read once ("PID: mountinfo line"). Not only ours: a shim mounts in a private
    namespace, which lives as long as any process in it, so that is where a leak is."""
    seen, found = set(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            with open(f"/proc/{pid}/mountinfo") as f:
                lines = f.read().splitlines()
        except OSError:
            continue  # gone, or a kernel thread
        seen.add(ns)
        for line in lines:
            point = line.split()[4].replace("\\040", " ")
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(f"{pid}: {line}")
    return found


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
    leaked = wait_vms_gone(tag)
    for pid in leaked:
        os.kill(pid, 9)
    left = os.listdir(root) if os.path.isdir(root) else []
    mounts = mounts_under(root)
    assert not leaked, f"QEMU or virtiofsd processes leaked: {leaked}"
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


def shm_files(template_dir: str) -> list:
    """The template's memory file in /dev/shm, if it is there."""
    from runv_py.vm import template
    memory = template.memory_file_for(template_dir)
    return [memory] if os.path.exists(memory) else []


@pytest.fixture(scope="module")
def cli_template(tmp_path_factory):
    """A template made with `runv-py manage create-template`, removed afterwards (and
    a second removal refused)."""
    tdir = str(tmp_path_factory.mktemp("tpl") / "template")
    base = [sys.executable, "-m", "runv_py.cli", "--kernel", KERNEL, "--initrd", INITRD,
            "--template", tdir, "manage"]
    r = subprocess.run(base + ["create-template", "--mem", "256"], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["memory_mib"] == 256
    assert shm_files(tdir)
    yield tdir
    r = subprocess.run(base + ["remove-template"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(tdir) and not shm_files(tdir)
    r = subprocess.run(base + ["remove-template"], capture_output=True, timeout=30)
    assert r.returncode == 1 and b"no template" in r.stderr


@pytest.fixture(scope="session", autouse=True)
def node_factory_stopped():
    """podman and docker start the runtime without our environment, so their containers
    come from the node's factory, which the first of them starts: stop it at the end if
    the suite started it (its pooled VMs would outlive the run)."""
    from runv_py.factory import left_as_found
    with left_as_found():
        yield
