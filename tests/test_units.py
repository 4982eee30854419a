"""Unit tests: wire protocol framing, bundle checks, driver probing."""
import json

import pytest

from runv_py.oci import bundle as oci
from runv_py.drivers import DriverError, kvm_verdict, probe
from runv_py.hyperstart import protocol as p


def test_control_frames_roundtrip_in_pieces():
    data = p.encode_control(p.NEWCONTAINER, {"id": "c1"}) + p.encode_control(p.PING)
    reader = p.FrameReader(p.CONTROL_HEADER)
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i:i + 1])
    assert frames == [(p.NEWCONTAINER, b'{"id":"c1"}'), (p.PING, b"")]
    assert data[:8] == bytes([0, 0, 0, 17, 0, 0, 0, 19])  # big-endian, length counts header


def test_stream_frames_and_eof():
    reader = p.FrameReader(p.STREAM_HEADER)
    assert reader.feed(p.encode_stream(3, b"abc") + p.encode_stream(3)) == [(3, b"abc"), (3, b"")]
    assert len(p.encode_stream(1, b"x")) == 13


def test_corrupt_frame_length_is_rejected():
    with pytest.raises(p.ProtocolError):
        p.FrameReader(p.CONTROL_HEADER).feed(b"\0\0\0\x09\0\0\0\x02")


def test_exit_status():
    assert p.exit_status(7 << 8) == 7
    assert p.exit_status(9) == 137


@pytest.mark.parametrize("cid", ["", "a/b", "..", "../x", "x" * 129, "-lead", "sp ace"])
def test_bad_ids(cid):
    with pytest.raises(oci.BundleError):
        oci.check_id(cid)


def test_good_id():
    assert oci.check_id("web-1.2_x") == "web-1.2_x"


def test_signals():
    assert oci.parse_signal("KILL") == 9
    assert oci.parse_signal("sigterm") == 15
    assert oci.parse_signal("10") == 10
    for bad in ("NOPE", "0", "999"):
        with pytest.raises(oci.BundleError):
            oci.parse_signal(bad)


def test_bundle_errors_name_the_problem(tmp_path):
    with pytest.raises(oci.BundleError, match="config.json not found"):
        oci.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(oci.BundleError, match="invalid JSON at line 1"):
        oci.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"},
                                                      "process": {"args": ["sh"]}}))
    with pytest.raises(oci.BundleError, match="rootfs .* does not exist"):
        oci.load(str(tmp_path))


def test_resources_become_cgroup_values_and_size_the_vm():
    from runv_py.oci.resources import cgroup_limits, vm_size
    resources = {"memory": {"limit": 1 << 26}, "pids": {"limit": 10},
                 "cpu": {"quota": 150000, "period": 100000}}
    assert cgroup_limits(resources) == {"memory.max": str(1 << 26), "pids.max": "10",
                                        "cpu.max": "150000 100000"}
    assert cgroup_limits({"memory": {"limit": -1}, "pids": {"limit": 0}}) == {"memory.max": "max"}
    assert vm_size(resources, 1, 256) == (2, 64 + 96)
    assert vm_size({}, 1, 256) == (1, 256)


def test_probe_on_this_machine():
    usable, reason = kvm_verdict()
    driver = probe("")
    assert driver.accel == ("kvm" if usable else "tcg")
    assert reason in driver.reason or driver.reason == reason
    with pytest.raises(DriverError, match="unknown driver"):
        probe("xen")


def test_probe_missing_qemu(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNV_QEMU", str(tmp_path / "nothing"))
    with pytest.raises(DriverError, match="not found"):
        probe("qemu-tcg")


def test_cli_start_up_imports_no_heavy_modules(tmp_path):
    """`state`, `list` and friends must not pay for grpc, protobuf, QMP or asyncio."""
    import subprocess
    import sys
    code = ("import sys, runpy\n"
            "sys.argv = ['runv-py', '--root', sys.argv[1], 'list']\n"
            "try:\n    runpy.run_module('runv_py.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('grpc', 'google.protobuf', 'qemu.qmp', 'asyncio', 'matplotlib')"
            " if m in sys.modules]\n"
            "print('HEAVY:' + ','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:"
