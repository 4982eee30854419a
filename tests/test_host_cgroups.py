"""linux.cgroupsPath and linux.resources on the host: where the cgroup lands (runc's
path cleaning: ``..`` never leaves a hierarchy) and what it holds. The oracle is the spec
each test writes and runc's documented rules, with the VM's headroom the README states
(its "Host cgroups" section), never the code under test."""
import glob
import os
import subprocess

import pytest

from conftest import qemu_pids
from runv_py.hyperstart.errors import InvalidArgument

MOUNTS = "/sys/fs/cgroup"
# The README's rules: a pids limit gets 256 more for QEMU's, virtiofsd's and the shim's
# threads; a CPU quota gets a tenth of a CPU (10 ms per 100 ms) for QEMU's own threads.
PIDS_HEADROOM = 256
QUOTA_HEADROOM_PER_100MS = 10000


def own_cgroup(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return path
    raise AssertionError(f"no {controller} line in /proc/self/cgroup")


def test_cgroups_path_is_cleaned_under_the_hierarchy_as_runc_does(tmp_path):
    """runc's rules, by hand: an absolute path is cleaned as if rooted at "/" and joined
    to each hierarchy's mount point; a relative one goes under our own cgroup with its
    ".." cleaned away; systemd's slice:prefix:name expands the slice."""
    from runv_py.host.cgroups import HostCgroup
    if not os.path.isdir(f"{MOUNTS}/memory"):
        pytest.skip("cgroup v1 paths: this host runs cgroup v2")
    escape = HostCgroup.for_path("/../../../../../tmp/cgescape")
    assert escape.controllers["memory"] == f"{MOUNTS}/memory/tmp/cgescape"
    assert escape.controllers["pids"] == f"{MOUNTS}/pids/tmp/cgescape"
    assert all(d.startswith(MOUNTS + "/") for d in escape.dirs), escape.dirs
    relative = HostCgroup.for_path("../../../rel/./x/../y")
    assert relative.controllers["memory"] == \
        os.path.normpath(f"{MOUNTS}/memory/{own_cgroup('memory')}/rel/y")
    systemd = HostCgroup.for_path("machine-pods.slice:runv:abc")
    assert systemd.controllers["memory"] == \
        f"{MOUNTS}/memory/machine.slice/machine-pods.slice/runv-abc.scope"
    assert HostCgroup.for_path(":runv:abc").controllers["cpu"].endswith("/system.slice/runv-abc.scope")
    for bad in ("/", "..", "/../..", "system.slice:runv:../../../tmp/x", "a--b.slice:p:n",
                "../x.slice:p:n", "system.slice:p", "-x.slice:p:n"):
        with pytest.raises(InvalidArgument):
            HostCgroup.for_path(bad)


def test_resources_take_runcs_file_formats_and_conversions():
    """runc's formats ("major:minor value") and its documented v2 conversions (shares
    2..262144 -> cpu.weight 1..10000, 1024 -> 39; blkio weight 10..1000 -> io.weight
    1..10000); update takes runc update's fields only."""
    from runv_py.host import cglimits
    writes = cglimits.v1_writes({"blockIO": {
        "weightDevice": [{"major": 8, "minor": 0, "weight": 300, "leafWeight": 20}],
        "throttleWriteBpsDevice": [{"major": 8, "minor": 16, "rate": 4096}]},
        "network": {"priorities": [{"name": "eth0", "priority": 7}]}}, None)
    assert [(c, n if isinstance(n, str) else n[-1], v) for c, n, v in writes] == [
        ("blkio", "blkio.weight_device", "8:0 300"), ("blkio", "blkio.leaf_weight_device", "8:0 20"),
        ("blkio", "blkio.throttle.write_bps_device", "8:16 4096"),
        ("net_prio", "net_prio.ifpriomap", "eth0 7")]
    v2 = dict(cglimits.v2_writes({"cpu": {"shares": 1024}, "blockIO": {"weight": 10}}, None))
    assert (v2["cpu.weight"], v2["io.weight"]) == ("39", "1")
    v2 = dict(cglimits.v2_writes({"cpu": {"shares": 262144}, "blockIO": {"weight": 1000}}, None))
    assert (v2["cpu.weight"], v2["io.weight"]) == ("10000", "10000")
    assert dict(cglimits.v2_writes({"cpu": {"shares": 2}}, None))["cpu.weight"] == "1"
    assert cglimits.update_subset({"memory": {"limit": 1 << 30}, "hugepageLimits": [{}],
                                   "cpu": {"shares": 5, "cpus": "1", "realtimeRuntime": 9},
                                   "blockIO": {"weight": 20, "leafWeight": 30}}) == \
        {"cpu": {"shares": 5, "cpus": "1"}, "blockIO": {"weight": 20}}
    with pytest.raises(InvalidArgument):
        cglimits.v1_writes({"hugepageLimits": [{"pageSize": "3MB", "limit": 1}]}, None)
    # The guest's cpu.max as runc writes it: no period, no period in the file.
    from runv_py.oci.resources import cgroup_limits
    assert cgroup_limits({"cpu": {"quota": 150000}}) == {"cpu.max": "150000"}
    assert cgroup_limits({"cpu": {"period": 50000}}) == {"cpu.max": "max 50000"}
    # `runv-py features` states the README's rules.
    from runv_py.oci.features import features
    notes = features()["annotations"]
    assert f"limit + {PIDS_HEADROOM} " in notes["io.github.runv-py.hostCgroup.pids"]
    assert f"quota + {QUOTA_HEADROOM_PER_100MS} us per 100 ms" in notes["io.github.runv-py.hostCgroup.cpu"]


@pytest.fixture
def v1_hierarchies():
    """net_cls, net_prio and hugetlb mounted as systemd mounts them in hybrid mode (and
    setup.sh does where nothing did): this host's image mounts only some controllers."""
    if not os.path.isdir(f"{MOUNTS}/memory"):
        pytest.skip("these are cgroup v1 files: this host runs cgroup v2")
    with open("/proc/self/mountinfo") as f:
        mounted = {opt for line in f if " - cgroup " in line
                   for opt in line.split(" - cgroup ")[1].split()[1].split(",")}
    for group in ("net_cls,net_prio", "hugetlb"):
        if not set(group.split(",")) & mounted:
            os.makedirs(f"{MOUNTS}/{group}", exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", group, "cgroup", f"{MOUNTS}/{group}"],
                           check=True)
        for name in group.split(","):
            if not os.path.exists(f"{MOUNTS}/{name}"):
                os.symlink(group, f"{MOUNTS}/{name}")


def bfq_loop_device(tmp_path):
    """(major, minor, path) of a loop device of our own with the BFQ scheduler, or None
    where the kernel has no BFQ."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                         text=True)
    if dev.returncode != 0:
        return None
    name = os.path.basename(dev.stdout.strip())
    scheduler = f"/sys/block/{name}/queue/scheduler"
    was = open(scheduler).read().split("[")[1].split("]")[0]
    try:
        with open(scheduler, "w") as f:
            f.write("bfq")
    except OSError:
        subprocess.run(["losetup", "-d", dev.stdout.strip()])
        return None
    major, minor = open(f"/sys/block/{name}/dev").read().split(":")
    return int(major), int(minor), dev.stdout.strip(), was


def release_loop_device(loop) -> None:
    """The scheduler back as it was (the device is the next user's), then detached."""
    with open(f"/sys/block/{os.path.basename(loop[2])}/queue/scheduler", "w") as f:
        f.write(loop[3])
    subprocess.run(["losetup", "-d", loop[2]])


def cgroup_file(controller: str, path: str, name: str) -> str:
    with open(f"{MOUNTS}/{controller}{path}/{name}") as f:
        return f.read().strip()


def vcpu_affinities(qemu: int) -> list:
    """Cpus_allowed_list of each thread of ``qemu``."""
    lists = []
    for status in glob.glob(f"/proc/{qemu}/task/*/status"):
        with open(status) as f:
            lists += [line.split()[1] for line in f if line.startswith("Cpus_allowed_list")]
    return lists


@pytest.mark.vm
@pytest.mark.timeout(300)
def test_the_host_cgroup_holds_the_specs_resources_where_runc_puts_it(runv, bundle, tmp_path,
                                                                       v1_hierarchies):
    if os.cpu_count() < 2:
        pytest.skip("pins two vCPUs to two host CPUs")
    cid = runv.id()
    escape = f"/tmp/cgescape-{runv.tag}"
    path = escape                 # runc: "/../../.." cleaned as rooted at "/"
    block = sorted(glob.glob("/sys/block/*/dev"))[0]
    major, minor = (int(x) for x in open(block).read().split(":"))
    hugepage_kb = sorted(int(d.split("-")[1][:-2]) for d in os.listdir("/sys/kernel/mm/hugepages"))[0]
    page = f"{hugepage_kb // 1024}MB" if hugepage_kb % 1024 == 0 else f"{hugepage_kb}KB"
    resources = {
        "cpu": {"shares": 512, "period": 50000, "quota": 100000, "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 100},
        "blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}],
                    "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 100}]},
        "hugepageLimits": [{"pageSize": page, "limit": 4 << 20}],
        "network": {"classID": 0x100001, "priorities": [{"name": "lo", "priority": 5}]},
    }
    # A blkio weight needs a scheduler with weights (BFQ, or CFQ before Linux 5.0): where
    # the kernel has neither, runc's write of it fails, and so does ours.
    has_weight = any(os.path.exists(f"{MOUNTS}/blkio/{n}") for n in ("blkio.bfq.weight", "blkio.weight"))
    if has_weight:
        resources["blockIO"]["weight"] = 300
    loop = bfq_loop_device(tmp_path)
    if loop is not None:  # a weight for a device needs BFQ on it
        resources["blockIO"]["weightDevice"] = [{"major": loop[0], "minor": loop[1], "weight": 700}]
    b = bundle(["sleep", "600"], linux__cgroupsPath="/../../../../.." + escape,
               linux__resources=resources)
    try:
        # leafWeight is CFQ's, gone since Linux 5.0: refused as runc refuses it, and the
        # half-made cgroup is gone.
        if not glob.glob(f"{MOUNTS}/blkio/*/blkio.leaf_weight"):
            refused = runv.detached("create", "-b", bundle(["true"], linux__cgroupsPath=escape,
                                    linux__resources={"blockIO": {"leafWeight": 20}}),
                                    runv.id("leaf"), check=False)
            assert refused.returncode != 0 and b"leaf_weight" in refused.stderr, refused.stderr
            assert not [d for d in glob.glob(f"{MOUNTS}/*{path}")], "a refused create left its cgroup"
        runv.detached("run", "-d", "-b", b, cid)
        assert not os.path.exists(escape), "the cgroup path climbed out of the hierarchy"
        [qemu] = qemu_pids(cid)
        groups = dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{qemu}/cgroup"))
        for controller in ("memory", "cpu", "cpuset", "pids", "blkio", "hugetlb",
                           "net_cls,net_prio"):
            assert groups[controller] == path, (controller, groups)

        assert cgroup_file("cpu", path, "cpu.shares") == "512"
        assert cgroup_file("cpu", path, "cpu.cfs_period_us") == "50000"
        assert cgroup_file("cpu", path, "cpu.cfs_quota_us") == \
            str(100000 + QUOTA_HEADROOM_PER_100MS * 50000 // 100000)
        assert cgroup_file("cpuset", path, "cpuset.cpus") == "0-1"
        assert cgroup_file("cpuset", path, "cpuset.mems") == "0"
        assert cgroup_file("pids", path, "pids.max") == str(100 + PIDS_HEADROOM)
        weight = ([n for n in ("blkio.bfq.weight", "blkio.weight")
                   if os.path.exists(f"{MOUNTS}/blkio{path}/{n}")] or [""])[0]
        assert not has_weight or cgroup_file("blkio", path, weight) == "300"
        assert cgroup_file("blkio", path, "blkio.throttle.read_bps_device") == \
            f"{major}:{minor} {1 << 20}"
        assert cgroup_file("blkio", path, "blkio.throttle.write_iops_device") == f"{major}:{minor} 100"
        if loop is not None:
            device = [n for n in ("blkio.bfq.weight_device", "blkio.weight_device")
                      if os.path.exists(f"{MOUNTS}/blkio{path}/{n}")][0]
            assert f"{loop[0]}:{loop[1]} 700" in cgroup_file("blkio", path, device).splitlines()
        assert cgroup_file("hugetlb", path, f"hugetlb.{page}.limit_in_bytes") == str(4 << 20)
        assert cgroup_file("net_cls", path, "net_cls.classid") == str(0x100001)
        assert "lo 5" in cgroup_file("net_prio", path, "net_prio.ifpriomap").splitlines()
        # quota / period = 2 vCPUs on the 2 CPUs of cpus: one vCPU thread on each.
        pinned = sorted(a for a in vcpu_affinities(qemu) if a in ("0", "1"))
        assert pinned == ["0", "1"], vcpu_affinities(qemu)

        # A quota alone keeps the period the cgroups have (as runc writes it), on the
        # host (its headroom per that period) and in the guest.
        runv("update", "--cpu-quota", "150000", cid, check=True)
        assert cgroup_file("cpu", path, "cpu.cfs_quota_us") == \
            str(150000 + QUOTA_HEADROOM_PER_100MS * 50000 // 100000)
        guest = runv("exec", cid, "cat", "/sys/fs/cgroup/cpu.max", check=True)
        assert guest.stdout.decode().split() == ["150000", "50000"], guest.stdout

        # runc update's fields reach the host cgroup; a new cpuset re-pins the vCPUs.
        runv("update", "--cpu-share", "256", "--cpu-period", "100000", "--cpu-quota", "200000",
             "--cpuset-cpus", "1", "--pids-limit", "50",
             *(["--blkio-weight", "200"] if has_weight else []), cid, check=True)
        assert cgroup_file("cpu", path, "cpu.shares") == "256"
        assert (cgroup_file("cpu", path, "cpu.cfs_period_us"),
                cgroup_file("cpu", path, "cpu.cfs_quota_us")) == ("100000", str(200000 + 10000))
        assert cgroup_file("cpuset", path, "cpuset.cpus") == "1"
        assert cgroup_file("pids", path, "pids.max") == str(50 + PIDS_HEADROOM)
        assert not has_weight or cgroup_file("blkio", path, weight) == "200"
        assert set(vcpu_affinities(qemu)) == {"1"}
        runv("update", "--cpuset-cpus", "0-1", cid, check=True)
        assert sorted(a for a in vcpu_affinities(qemu) if a in ("0", "1")) == ["0", "1"]
        bad = runv("update", "--cpu-share", "1000000", cid)
        assert bad.returncode != 0 and b"cpu.shares" in bad.stderr, bad.stderr

        runv("delete", "-f", cid, check=True)
        left = [d for d in glob.glob(f"{MOUNTS}/*{path}") if os.path.exists(d)]
        assert not left, f"cgroups left after delete: {left}"
    finally:
        if loop is not None:
            release_loop_device(loop)
        leftover = os.path.exists(escape)
        subprocess.run(["rm", "-rf", escape])
        for d in glob.glob(f"{MOUNTS}/*{path}"):
            subprocess.run(["rmdir", d], capture_output=True)
        for d in glob.glob(f"{MOUNTS}/*/tmp"):     # the parent made for it, if now empty
            subprocess.run(["rmdir", d], capture_output=True)
    assert not leftover, "the cgroup path climbed out of the hierarchy"
