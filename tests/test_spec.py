"""The OCI runtime spec applied inside the container, field by field, as runc applies it
(under the VM driver, and the same bundles under the namespace driver); and the host
side of linux.cgroupsPath."""
import json
import os
import re
import time

import pytest

from conftest import qemu_pids
from test_run import driver, needs_vm, out, runv  # noqa: F401  (fixtures)
from runv_py.hyperstart.security import CAPABILITIES

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

RUNC_DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                     "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                     "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def caps(names, ambient=()) -> dict:
    return {"bounding": list(names), "effective": list(names), "permitted": list(names),
            "inheritable": list(names), "ambient": list(ambient)}


def mask(names) -> int:
    return sum(1 << CAPABILITIES.index(n.removeprefix("CAP_")) for n in names)


def run(runv, b, check=True):
    r = runv("run", "-b", b, runv.id(f"r{time.monotonic_ns() % 100000}"))
    if check:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def test_capabilities_are_the_specs_and_bound_the_container(runv, bundle):
    script = "grep Cap /proc/self/status; mkdir -p /tmp/m; mount -t tmpfs t /tmp/m && echo MOUNTED"
    r = run(runv, bundle(["sh", "-c", script],
                         process__capabilities=caps(RUNC_DEFAULT_CAPS, ["CAP_KILL"])), check=False)
    status = dict(line.split(":") for line in out(r).splitlines() if line.startswith("Cap"))
    want = mask(RUNC_DEFAULT_CAPS)
    assert {k: int(v, 16) for k, v in status.items()} == {
        "CapInh": want, "CapPrm": want, "CapEff": want, "CapBnd": want,
        "CapAmb": mask(["CAP_KILL"])}
    assert "MOUNTED" not in out(r) and b"permission denied" in r.stderr.lower()
    with_admin = run(runv, bundle(["sh", "-c", script],
                                  process__capabilities=caps(RUNC_DEFAULT_CAPS + ["CAP_SYS_ADMIN"])))
    assert "MOUNTED" in out(with_admin)


def test_masked_and_readonly_paths(runv, bundle, tmp_path):
    script = ("echo version=$(wc -c < /proc/version) kcore=$(wc -c < /proc/kcore)"
              " secret=$(ls -A /secret | wc -l); echo x > /proc/sys/kernel/hostname; touch /ro/f")
    spec = {"linux__maskedPaths": ["/proc/version", "/proc/kcore", "/secret"],
            "linux__readonlyPaths": ["/proc/sys", "/ro"]}
    b = bundle(["sh", "-c", script], **spec)
    for d in ("secret", "ro"):
        os.makedirs(os.path.join(b, "rootfs", d), exist_ok=True)
    open(os.path.join(b, "rootfs", "secret", "key"), "w").write("s3cret")
    r = run(runv, b, check=False)
    seen = dict(word.split("=") for word in out(r).split())
    assert seen["version"] == "0"                  # a file: /dev/null over it
    assert seen["kcore"] in ("0", "")              # the same (the guest kernel has none)
    assert seen["secret"] == "0"                   # a directory: an empty tmpfs over it
    assert r.stderr.count(b"Read-only file system") == 2, r.stderr
    r = run(runv, bundle(["sh", "-c", "wc -c < /proc/version; ls /secret"],
                         linux__maskedPaths=[], linux__readonlyPaths=[]), check=False)
    assert int(out(r).split()[0]) > 0               # the same, unmasked


def test_sysctls_rlimits_user_umask_oom_score_and_names(runv, bundle):
    script = ("cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_forward; ulimit -n; ulimit -Hn;"
              " id -u; id -g; id -G; umask; cat /proc/self/oom_score_adj;"
              " cat /proc/sys/kernel/domainname; hostname; grep NoNewPrivs /proc/self/status")
    b = bundle(["sh", "-c", script], hostname="box1", domainname="example.org",
               linux__sysctl={"kernel.shmmax": "12345678", "net.ipv4.ip_forward": "1"},
               process__rlimits=[{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
               process__user={"uid": 1000, "gid": 1001, "additionalGids": [5, 27], "umask": 23},
               process__oomScoreAdj=300, process__noNewPrivileges=True)
    lines = out(run(runv, b)).splitlines()
    assert lines[:9] == ["12345678", "1", "123", "456", "1000", "1001", "1001 5 27", "0027", "300"]
    assert lines[9:11] == ["example.org", "box1"] and lines[11].split() == ["NoNewPrivs:", "1"]
    r = run(runv, bundle(["true"], linux__sysctl={"kernel.panic": "1"}), check=False)
    assert r.returncode != 0 and b"not in a separate kernel namespace" in r.stderr


def test_devices_exist_with_their_numbers_and_the_device_cgroup_holds(runv, bundle):
    script = ("stat -c '%t %T %a %g' /dev/mynull; echo hi > /dev/mynull && echo null-ok;"
              " head -c1 /dev/mymem >/dev/null; echo mem=$?")
    devices = [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640,
                "uid": 0, "gid": 5},
               {"path": "/dev/mymem", "type": "c", "major": 1, "minor": 1, "fileMode": 0o600}]
    r = run(runv, bundle(["sh", "-c", script], linux__devices=devices,
                         linux__resources={"devices": [{"allow": False, "access": "rwm"}]}))
    assert out(r).splitlines() == ["1 3 640 5", "null-ok", "mem=1"]
    assert b"Operation not permitted" in r.stderr   # /dev/mem (1:1) is not allowed


def test_a_shared_bind_mount_propagates_and_a_private_one_does_not(runv, bundle, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    script = ("grep -E ' /(vol|priv) ' /proc/self/mountinfo;"
              " mkdir -p /vol2 /priv2 /vol/x /priv/y;"
              " mount --bind /vol /vol2; mount --bind /priv /priv2;"
              " mount -t tmpfs t /vol/x; touch /vol/x/f; mount -t tmpfs t /priv/y; touch /priv/y/g;"
              " echo vol2: $(ls /vol2/x); echo priv2: $(ls /priv2/y)")
    mounts = [{"destination": "/vol", "type": "bind", "source": str(volume),
               "options": ["rbind", "rshared"]},
              {"destination": "/priv", "type": "bind", "source": str(volume),
               "options": ["rbind", "rprivate"]}]
    b = bundle(["sh", "-c", script],
               process__capabilities=caps(RUNC_DEFAULT_CAPS + ["CAP_SYS_ADMIN"]))
    spec = json.load(open(os.path.join(b, "config.json")))
    spec["mounts"] += mounts
    json.dump(spec, open(os.path.join(b, "config.json"), "w"))
    lines = out(run(runv, b)).splitlines()
    vol = [line for line in lines if " /vol " in line]
    priv = [line for line in lines if " /priv " in line]
    assert vol and re.search(r" shared:\d+", vol[0]), lines
    assert priv and "shared:" not in priv[0] and "master:" not in priv[0], lines
    assert "vol2: f" in lines and "priv2:" in lines and "priv2: g" not in lines


@pytest.mark.parametrize("nnp", [True, False], ids=["no-new-privs", "privileged-load"])
def test_seccomp_denies_mkdir_with_its_errno_and_compares_arguments(runv, bundle, nnp):
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
               "syscalls": [
                   {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                   {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                    "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]},
                   {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"}]}
    script = ("mkdir /tmp/d; echo mkdir=$?; touch /tmp/f && echo touch-ok;"
              " kill -0 $$; echo kill0=$?; kill -CONT $$; echo killcont=$?")
    r = run(runv, bundle(["sh", "-c", script], linux__seccomp=profile,
                         process__noNewPrivileges=nnp))
    assert out(r).splitlines() == ["mkdir=1", "touch-ok", "kill0=1", "killcont=0"]
    assert b"Operation not permitted" in r.stderr and b"Permission denied" in r.stderr
    bad = run(runv, bundle(["true"], linux__seccomp={"defaultAction": "SCMP_ACT_NOPE"}),
              check=False)
    assert bad.returncode != 0 and b"unsupported action" in bad.stderr


def test_the_cgroup_namespace_shows_the_containers_own_limit(runv, bundle):
    needs_vm(runv.driver, "the host's cgroups are v1; the guest's are v2")
    r = run(runv, bundle(["sh", "-c", "cat /sys/fs/cgroup/memory.max /proc/self/cgroup"],
                         linux__resources={"memory": {"limit": 64 << 20}}))
    lines = out(r).splitlines()
    assert lines[0] == str(64 << 20) and "0::/" in lines[1:], lines
    assert all(line.endswith(":/") for line in lines[1:]), lines  # every hierarchy: its own root


def test_cgroups_path_holds_the_vm_on_the_host_with_the_limits(runv, bundle):
    needs_vm(runv.driver, "QEMU is what the host cgroup holds")
    cid = runv.id()
    path = f"/runv-test-{runv.tag}"
    b = bundle(["sleep", "600"], linux__cgroupsPath=path,
               linux__resources={"memory": {"limit": 64 << 20},
                                 "cpu": {"quota": 50000, "period": 100000}})
    runv.detached("run", "-d", "-b", b, cid)
    [qemu] = qemu_pids(cid)
    groups = dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{qemu}/cgroup"))
    assert groups["memory"] == path and groups["pids"] == path
    shim = runv.state(cid)["pid"]
    assert dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{shim}/cgroup"))["memory"] == path
    memory = f"/sys/fs/cgroup/memory{path}"
    limit = int(open(f"{memory}/memory.limit_in_bytes").read())
    assert limit == (64 + 96 + 64) << 20     # the limit, the guest's own, QEMU's and the shim's
    cpu = [d for d in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct") if os.path.isdir(d)][0]
    assert open(f"{cpu}{path}/cpu.cfs_quota_us").read().strip() == "60000"
    runv("delete", "-f", cid, check=True)
    assert not os.path.exists(memory) and not os.path.exists(f"{cpu}{path}")
