"""Fuzzing the readers of config.json and an exec's process.json: whatever a user writes
there, runv-py answers with a typed error (BundleError, an InvalidArgument) or reads it
all, before any VM boots, without another exception."""
import json
import os
import tempfile

import pytest
from hypothesis import given, strategies as st

from fuzzing import fuzz, mutate, truncations
from runv_py.hyperstart import messages as m
from runv_py.hyperstart.errors import RunvError
from runv_py.net import netns_path, network_namespace
from runv_py.oci import bundle as oci
from runv_py.oci.linux import container_fields
from runv_py.oci.process import process_spec
from runv_py.oci.resources import asked, cgroup_limits, vm_size
from runv_py.oci.spec import default_spec
from runv_py.shimv2.pods import sandbox_of, sandbox_size, shared_namespaces

pytestmark = pytest.mark.timeout(120)


def rich_spec() -> dict:
    """runc's default spec with every part runv-py reads filled in."""
    spec = default_spec(["sh", "-c", "true"])
    spec["process"].update(consoleSize={"height": 24, "width": 80}, oomScoreAdj=5,
                           user={"uid": 1, "gid": 2, "umask": 18, "additionalGids": [3]})
    spec["linux"].update(
        devices=[{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}],
        sysctl={"net.ipv4.ip_forward": "1"}, cgroupsPath="/runv/x", rootfsPropagation="rslave",
        seccomp={"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
        namespaces=[{"type": "network", "path": "/run/netns/x"}, {"type": "ipc", "path": "/proc/1/ns/ipc"},
                    {"type": "pid"}, {"type": "mount"}])
    spec["linux"]["resources"].update(
        memory={"limit": 1 << 26}, cpu={"quota": 50000, "period": 100000, "shares": 512},
        pids={"limit": 10}, devices=[{"allow": False, "access": "rwm"},
                                     {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}])
    spec["hooks"] = {"prestart": [{"path": "/bin/true", "args": ["true"], "env": ["A=1"], "timeout": 5}]}
    spec["annotations"] = {"io.kubernetes.cri.container-type": "container",
                           "io.kubernetes.cri.sandbox-id": "pod1",
                           "io.kubernetes.cri.sandbox-memory": "1048576"}
    spec["domainname"] = "example"
    return spec


def read_everything(spec) -> None:
    """What runv-py reads of a bundle's spec before it boots a VM for it."""
    oci.check_spec(spec, "config.json")
    bundle = oci.Bundle("/bundle", spec)
    for name in ("rootfs", "process", "terminal", "readonly", "hostname", "annotations",
                 "resources", "hooks", "cgroups_path"):
        getattr(bundle, name)
    init = process_spec(bundle.process, "init", 1, 2)
    fields = container_fields(spec)
    limits = cgroup_limits(bundle.resources)
    vm_size(bundle.resources, 1, 256)
    asked(bundle.resources)
    network_namespace(spec)
    netns_path(spec)
    sandbox_of(bundle.annotations)
    sandbox_size(spec, bundle.annotations, 1, 256)
    shared_namespaces(spec)
    message = m.NewContainer(id="c", rootfs="c/rootfs", process=init, limits=limits, **fields)
    assert m.NewContainer.from_wire(json.loads(json.dumps(message.to_wire()))) == message


@fuzz(200)
@given(data=st.data())
def test_any_config_json_is_read_or_refused_with_a_typed_error(data):
    spec = mutate(data, json.loads(json.dumps(rich_spec())))
    try:
        read_everything(spec)
    except RunvError:
        pass


BUNDLE = tempfile.mkdtemp(prefix="runv-fuzz-")
os.makedirs(os.path.join(BUNDLE, "rootfs"), exist_ok=True)
CONFIG = json.dumps(rich_spec()).encode()


@fuzz(150)
@given(text=st.binary(max_size=100) | truncations(CONFIG) | st.just(b"[" * 100000)
       | st.just(b'{"a": "\xff"}'))
def test_any_config_json_file_loads_or_is_refused(text):
    with open(os.path.join(BUNDLE, "config.json"), "wb") as f:
        f.write(text)
    try:
        bundle = oci.load(BUNDLE)
    except oci.BundleError:
        return
    read_everything(bundle.spec)


@fuzz(150)
@given(data=st.data())
def test_any_process_json_is_read_or_refused_with_a_typed_error(data):
    process = mutate(data, json.loads(json.dumps(rich_spec()["process"])))
    try:
        oci.check_process(process, "process.json")
        spec = process_spec(process, "exec-1", 3, 4)
    except RunvError:
        return
    assert m.ProcessSpec.from_wire(json.loads(json.dumps(spec.to_wire()))) == spec
