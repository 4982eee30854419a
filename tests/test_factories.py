"""Fast start: VM templates and the VM cache, with real QEMU and a real guest.

The scenarios of test_run.py run again through the CLI with `--template DIR` and with
`--factory-policy`; the Python API tests check what only clones and caches can get wrong:
two clones sharing memory or random state, a template removed under running clones,
a cache's spare VMs and directories outliving it."""
import json
import os
import threading
import time
import uuid

import pytest

import test_lifecycle
import test_run
from conftest import gone, qemu_pids, shm_files, wait_vms_gone
from test_lifecycle import subreaper  # noqa: F401  (a fixture of the lifecycle scenarios)
from runv_py.oci import bundle as oci
from runv_py.vm import template
from runv_py.oci.busybox import make_bundle
from runv_py.drivers import DriverError, probe
from runv_py.sandbox import ProcessIO, Sandbox, private_mount_namespace
from runv_py.vm.boot import BootConfig, DirectFactory
from runv_py.vm.factory import CacheFactory, make_factory
from runv_py.vm.template import TemplateFactory

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


# ---- the CLI: test_run's scenarios from a template and from the cache -----------------

FACTORIES = {
    "template": lambda tdir: ["--template", tdir],
    "cache": lambda tdir: ["--factory-policy", '[{"cache": 1}]'],
    "cache-of-clones": lambda tdir: ["--template", tdir,
                                     "--factory-policy", '[{"cache": 1, "template": true}]'],
}


@pytest.fixture(params=list(FACTORIES))
def runv(request, runv, cli_template, tmp_path):
    """The conftest runner with a factory flag and a log that says where each VM came
    from; after the test, every VM must have come from that factory."""
    log = str(tmp_path / "runv.log")
    # Every shim logs to the CLI's --log too. The lifecycle scenarios are not checked:
    # some size their VMs beyond the template on purpose.
    lifecycle = request.node.function.__module__ == "test_lifecycle"
    flags = FACTORIES[request.param](cli_template) + ["--log", log]
    base = runv.args
    runv.args = lambda *args: base(*flags, *args)
    runv.driver = ""
    runv.factory = request.param
    runv.log = log
    runv.cold_boots_expected = False
    runv.check_log = True
    # A cache's VMs carry the container's id (so conftest's leak check sees them) and
    # live in its state directory (so they go with it).
    yield runv
    text = open(log).read() if os.path.exists(log) else ""
    # Detached containers log in their shim, whose log goes with their state directory.
    if lifecycle or not runv.check_log:
        return
    if not runv.cold_boots_expected:
        assert "cold boot" not in text and "not from the cache" not in text, text
    if request.param == "template" and not runv.cold_boots_expected:
        assert "started from the template" in text, text


test_runs_in_guest_kernel_with_hostname_and_pid1 = test_run.test_runs_in_guest_kernel_with_hostname_and_pid1
test_exit_codes = test_run.test_exit_codes
test_stdin_reaches_the_container = test_run.test_stdin_reaches_the_container
test_large_stdout_is_byte_identical_and_stderr_separate = \
    test_run.test_large_stdout_is_byte_identical_and_stderr_separate
test_env_cwd_args = test_run.test_env_cwd_args
test_readonly_root_tmpfs_and_bind_mount = test_run.test_readonly_root_tmpfs_and_bind_mount
test_full_cycle = test_lifecycle.test_full_cycle
test_exec_stdin_env_cwd_user_and_detached_pid = test_lifecycle.test_exec_stdin_env_cwd_user_and_detached_pid
test_pause_resume = test_lifecycle.test_pause_resume


def test_detached_container_is_a_clone(runv, bundle):
    if runv.factory != "template":
        pytest.skip("--template alone")
    runv.check_log = False  # its shim logs, and the QEMU command line tells
    cid = runv.id()
    runv.detached("--log", "", "run", "-d", "-b", bundle(["sleep", "600"]), cid)
    (qemu,) = qemu_pids(runv.tag)
    assert b"-incoming\0defer" in open(f"/proc/{qemu}/cmdline", "rb").read()
    assert runv("exec", cid, "hostname", check=True).stdout.strip()
    runv("delete", "--force", cid, check=True)


def test_remove_template_under_a_running_container(runv, bundle, tmp_path):
    if runv.factory != "template":
        pytest.skip("--template alone")
    runv.check_log = False
    tdir = str(tmp_path / "own-template")
    runv("--template", tdir, "manage", "create-template", check=True)
    cid = runv.id()
    runv.detached("--log", "", "--template", tdir, "run", "-d", "-b", bundle(["sleep", "600"]), cid)
    runv("--template", tdir, "manage", "remove-template", check=True)
    assert not os.path.exists(tdir) and not shm_files(tdir)
    # The clone lives on its private copy of the unlinked memory file.
    r = runv("exec", cid, "sh", "-c", "head -c 40000000 /dev/zero > /dev/shm/f; ls -l /dev/shm/f; echo ok",
             check=True)
    assert r.stdout.decode().strip().endswith("ok") and b"40000000" in r.stdout
    r = runv("--template", tdir, "run", "-b", bundle(["true"]), runv.id("gone"))
    assert r.returncode != 0 and b"no VM template" in r.stderr
    runv("delete", "--force", cid, check=True)


def test_bigger_than_the_template_cold_boots(runv, bundle):
    if runv.factory != "template":
        pytest.skip("the template's own sizing rule")
    runv.cold_boots_expected = True
    # 512 MiB of memory limit: more than the 256 MiB template has.
    b = bundle(["sh", "-c", "grep MemTotal /proc/meminfo"],
               linux__resources={"memory": {"limit": 512 * 1024 * 1024}})
    r = runv("run", "-b", b, runv.id(), check=True)
    assert int(r.stdout.split()[1]) > 400 * 1024
    text = open(runv.log).read()
    assert "cold boot" in text and "MiB asked, the template has 256" in text


def test_missing_template_is_an_error(runv, bundle, tmp_path):
    if runv.factory != "template":
        pytest.skip("--template alone")
    runv.cold_boots_expected = True
    r = runv("--template", str(tmp_path / "none"), "run", "-b", bundle(["true"]), runv.id())
    assert r.returncode != 0 and b"no VM template" in r.stderr


# ---- the Python API: clones and caches -----------------------------------------------

@pytest.fixture(scope="module")
def api():
    """Sandboxes bind-mount rootfs into their share: keep those mounts in a private
    mount namespace of this process (before any launcher thread exists)."""
    private_mount_namespace()
    return probe("")


class Box:
    """One container in a VM from a factory, driven through the sandbox API."""

    def __init__(self, factory, workdir: str, name: str, bundle_path: str, config=None):
        self.name = name
        self.sandbox = Sandbox.boot(name, factory, config or BootConfig(), workdir)
        self.booted = self.sandbox.booted
        self.bundle = oci.load(bundle_path)
        self.count = 0
        try:
            self.sandbox.create_container(name, self.bundle, ProcessIO())
            self.sandbox.start_container(name)
        except BaseException:
            self.destroy()
            raise

    def run(self, args: list):
        """Run ``args`` in the container; returns (status, output)."""
        self.count += 1
        read_end, write_end = os.pipe()
        proc = self.sandbox.exec(self.name, f"p{self.count}", dict(self.bundle.process, args=args),
                                 ProcessIO(stdout=write_end, stderr=os.dup(write_end)))
        out = b""
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            out += chunk
        os.close(read_end)
        exit = proc.wait(60)
        assert exit is not None, f"{args} did not finish: {self.sandbox.vm.failure()}"
        return exit.status, out.decode()

    def sh(self, script: str) -> str:
        status, out = self.run(["sh", "-c", script])
        assert status == 0, out
        return out.strip()

    def destroy(self) -> None:
        self.sandbox.destroy()


@pytest.fixture
def boxes(api, tmp_path):
    """make(factory, name, args) -> a running Box; all are destroyed afterwards and
    nothing may be left: QEMU processes, state or cache directories."""
    tag = uuid.uuid4().hex[:8]
    made = []
    bundle_path = str(tmp_path / "bundle")
    make_bundle(bundle_path, ["sleep", "1000"])
    config = os.path.join(bundle_path, "config.json")
    spec = json.load(open(config))
    spec.pop("hostname", None)  # the container then shows the VM's hostname
    json.dump(spec, open(config, "w"))

    def make(factory, name: str, config=None) -> Box:
        workdir = str(tmp_path / "state" / name)
        box = Box(factory, workdir, f"{name}-{tag}", bundle_path, config)
        made.append(box)
        return box
    make.tag = tag
    yield make
    for box in made:
        box.destroy()
    from runv_py.host import statedir
    statedir.remove(str(tmp_path / "state"))
    assert not wait_vms_gone(tag), "QEMU or virtiofsd processes leaked"


@pytest.fixture
def template_dir(api, tmp_path):
    tdir = str(tmp_path / "template")
    template.create(api, BootConfig(), tdir)
    yield tdir
    template.remove(tdir)
    assert not shm_files(tdir), "the template's memory file leaked"


def file_digest(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_clones_are_not_twins(api, boxes, template_dir):
    factory = TemplateFactory(api, template_dir)
    saved = file_digest(factory.meta["memory_file"])
    a = boxes(factory, "a")
    b = boxes(factory, "b")
    assert a.booted.origin == b.booted.origin == "template"
    # Memory writes are private: what one clone writes into guest RAM (its tmpfs) the
    # other does not see, and the template's memory file is untouched.
    a.sh("echo from-a > /dev/shm/mine; head -c 30000000 /dev/urandom > /dev/shm/big")
    assert b.sh("ls /dev/shm") == ""
    b.sh("echo from-b > /dev/shm/mine")
    assert a.sh("cat /dev/shm/mine") == "from-a"
    assert b.sh("cat /dev/shm/mine") == "from-b"
    assert file_digest(factory.meta["memory_file"]) == saved
    # Reseeded: the same saved random state would otherwise give the same bytes.
    assert a.sh("head -c 16 /dev/urandom | od -x") != b.sh("head -c 16 /dev/urandom | od -x")
    # Each has the hostname it was given, not the template's.
    assert a.sh("hostname") == a.name and b.sh("hostname") == b.name
    # A third clone starts from the template as saved.
    c = boxes(factory, "c")
    assert c.sh("ls /dev/shm") == "" and c.sh("hostname") == c.name


def test_template_removed_under_running_clones(api, boxes, template_dir):
    factory = TemplateFactory(api, template_dir)
    a = boxes(factory, "a")
    memory_file = factory.meta["memory_file"]
    template.remove(template_dir)
    assert not os.path.exists(memory_file) and not os.path.exists(template_dir)
    # The clone keeps its private mapping of the (now unlinked) file: it touches much
    # of its memory, runs new programs and answers.
    a.sh("head -c 60000000 /dev/zero > /dev/shm/fill; sync; rm /dev/shm/fill")
    assert a.sh("echo alive; uname -r").startswith("alive\n6.1.")
    with pytest.raises(DriverError):
        TemplateFactory(api, template_dir)
    with pytest.raises(DriverError):  # a factory made before the removal fails cleanly
        boxes(factory, "b")
    assert a.sh("echo still") == "still"


def test_template_sizing_falls_back_to_cold_boot(api, boxes, template_dir, caplog):
    factory = TemplateFactory(api, template_dir)
    small = boxes(factory, "small", BootConfig(memory_mib=128))
    assert small.booted.origin == "template" and small.booted.config.memory_mib == 256
    with caplog.at_level("INFO", logger="runv_py.template"):
        big = boxes(factory, "big", BootConfig(cpus=2))
    assert big.booted.origin == "direct" and big.sh("nproc") == "2"
    assert "2 cpus asked, the template has 1" in caplog.text


def test_cache_hands_out_ready_vms_and_cleans_up(api, boxes):
    cache = CacheFactory(DirectFactory(api), 2, BootConfig())
    try:
        assert cache.wait_full(120)
        # Three takers at once: two get cached VMs, the third boots its own; thread-safe.
        got = {}

        def take(name):
            started = time.monotonic()
            got[name] = (boxes(cache, name), time.monotonic() - started)
        threads = [threading.Thread(target=take, args=(n,)) for n in ("x", "y", "z")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        origins = sorted(box.booted.origin for box, _ in got.values())
        assert origins in (["cache", "cache", "direct"], ["cache", "cache", "cache"]), origins
        for name, (box, _) in got.items():
            assert box.sh("hostname") == box.name
            box.sh(f"echo {name} > /dev/shm/who")
        for name, (box, _) in got.items():
            assert box.sh("cat /dev/shm/who") == name
        assert cache.wait_full(120)  # refilled in the background
        spare_pids = [b.vm.pid for b in cache.ready]
    finally:
        cache.close()
    # close() stopped the spare VMs; the handed-out ones still run.
    for pid in spare_pids:
        assert gone(pid)
    for box, _ in got.values():
        assert box.sh("echo ok") == "ok"
        box.destroy()
    assert not os.path.exists(cache.dir)


def test_cache_of_clones_from_policy(api, boxes, tmp_path):
    tdir = str(tmp_path / "policy-template")
    factory = make_factory(api, '[{"cache": 1, "template": true, "memory": 192}]', tdir,
                           BootConfig())
    try:
        assert template.load(tdir)["memory_mib"] == 192
        cache = factory.factories[0][0]
        assert cache.wait_full(60)
        box = boxes(factory, "p", BootConfig(memory_mib=128))
        assert box.booted.origin == "cache" and box.booted.config.memory_mib == 192
        assert box.sh("hostname") == box.name
        # Too big for the policy: cold boot.
        big = boxes(factory, "big", BootConfig(memory_mib=512))
        assert big.booted.origin == "direct"
    finally:
        factory.close()
        template.remove(tdir)
    assert not shm_files(tdir)


def test_closing_a_cache_stops_a_boot_under_way(api):
    cache = make_factory(api, '[{"cache": 1}]', "", BootConfig())
    inner = cache.factories[0][0]
    deadline = time.monotonic() + 10
    while inner.inflight is None and time.monotonic() < deadline:
        time.sleep(0.01)
    vm = inner.inflight
    assert vm is not None
    started = time.monotonic()
    cache.close()
    assert time.monotonic() - started < 5
    assert not vm.alive() and not os.path.exists(inner.dir)


def test_bad_policies():
    from runv_py.vm.factory import parse_policy
    assert parse_policy('{"cache": 2}') == [{"cache": 2, "template": False, "cpu": 0, "memory": 0}]
    from runv_py.hyperstart.errors import InvalidArgument
    for bad in ("nope", '[{"cache": -1}]', '[{"caches": 1}]', '[1]', '{"cpu": "2"}'):
        with pytest.raises(InvalidArgument):
            parse_policy(bad)


def test_templates_need_a_vm_driver(tmp_path):
    namespace = probe("namespace")
    with pytest.raises(DriverError, match="need a VM driver"):
        TemplateFactory(namespace, str(tmp_path / "t"))
    with pytest.raises(DriverError, match="need a VM driver"):
        template.create(namespace, BootConfig(), str(tmp_path / "t"))
    assert not os.path.exists(tmp_path / "t")
