"""Unit tests: wire protocol framing, bundle checks, driver probing."""
import json
import os

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


@pytest.mark.parametrize("cid", ["", "a/b", "..", "../x", "x" * 129, "-lead", "sp ace", "a\n",
                                 "\u00e9t\u00e9", "a\x00"])
def test_bad_ids(cid):
    with pytest.raises(oci.BundleError):
        oci.check_id(cid)


def test_good_id():
    assert oci.check_id("web-1.2_x") == "web-1.2_x"
    assert oci.check_id("0" + "a.+_-" * 25 + "xy") == "0" + "a.+_-" * 25 + "xy"  # 128


JSON_VALUES = [None, True, False, 0, -7, 1 << 70, 1.5, "", "\u00e9\u2028\"\\\n\x00/", {}, [],
               {"a": {}, "b": [], "c": [1, [2, {}], {"x": None, "y": [True]}]}, [[[]]],
               ("a", ("b",)), {2: "int key", True: "bool key", None: "null key"},
               {"ociVersion": "1.0.2-dev", "annotations": {"org.example/k": "v\u00e9"}}]


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_json_without_the_json_module_writes_what_json_does(value):
    """hyperstart's encoder (the C accelerator alone: json's decoder imports re) writes
    what json.dumps writes, compact, with its default separators, and indented by 2 (the
    CLI's `state`, `list -f json`, `ps -f json`, `events`)."""
    assert p.json_dumps(value) == json.dumps(value, separators=(",", ":"))
    assert p.json_dumps(value, compact=False) == json.dumps(value)
    assert p.json_dumps_indented(value) == json.dumps(value, indent=2)
    assert p.json_loads(json.dumps(value)) == json.loads(json.dumps(value))


def test_record_fields_defaults_and_state_json(tmp_path):
    """shim.records.Record: a dataclass's API without dataclasses (which imports inspect):
    keyword fields, fresh mutable defaults, state.json without ``path``."""
    from runv_py.shim import records
    a, b = records.Record(id="a"), records.Record(id="b", path=str(tmp_path))
    assert (a.status, a.pid, a.exit_status, a.path) == ("stopped", 0, None, "")
    a.annotations["k"] = "v"
    a.host_cgroups.append("/x")
    assert b.annotations == {} and b.host_cgroups == [] and b.execs == {} and b.exec_exits == {}
    with pytest.raises(TypeError):
        records.Record(id="c", bogus=1)
    with pytest.raises(TypeError):
        records.Record(status="running")  # no id
    (tmp_path / "root" / "c1").mkdir(parents=True)
    written = records.Record(id="c1", status="created", pid=5, bundle="/b",
                             annotations={"k": "\u00e9"}, execs={"e1": 7}, exit_status=3,
                             path=str(tmp_path / "root" / "c1"))
    written.write()
    stored = json.loads((tmp_path / "root" / "c1" / records.STATE_FILE).read_text())
    assert list(stored) == ["id", *records.FIELDS] and stored["annotations"] == {"k": "\u00e9"}
    read = records.read(str(tmp_path / "root"), "c1")  # its shim (pid 0) is gone: stopped
    assert read.status == "stopped" and read.path == written.path and read.execs == {"e1": 7}
    read.status = "created"
    assert read == written and repr(read) == repr(written) and read != records.Record(id="c1")
    (tmp_path / "root" / "c1" / records.STATE_FILE).write_text("[1]")
    assert records.read(str(tmp_path / "root"), "c1") == records.Record(id="c1", path=written.path)


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


def machine_can_use_kvm() -> bool:
    """The oracle, from the machine itself (DESIGN.md's facts), not from the loader: KVM
    boots a stock guest kernel only from a /dev/kvm we can open that is not PVM's (a PVM
    host, like this one, hangs such a guest)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return "kvm_pvm" not in os.listdir("/sys/module")  # the loaded modules


def test_probe_on_this_machine():
    kvm = machine_can_use_kvm()
    driver = probe("")
    assert driver.accel == ("kvm" if kvm else "tcg")
    assert kvm_verdict()[0] == kvm
    if not kvm:
        assert "TCG" in driver.reason
        with pytest.raises(DriverError, match="driver kvm"):
            probe("kvm")
    assert probe("qemu-tcg").accel == "tcg"
    assert probe("namespace").name == "namespace"
    with pytest.raises(DriverError, match="unknown driver"):
        probe("xen")


def test_probe_missing_qemu(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNV_QEMU", str(tmp_path / "nothing"))
    with pytest.raises(DriverError, match="not found"):
        probe("qemu-tcg")


HOT_COMMANDS = [["state", "nope"], ["list"], ["kill", "nope"], ["kill", "-a", "nope", "KILL"],
                ["ps", "nope"], ["events", "--stats", "nope"]]


@pytest.mark.parametrize("args", HOT_COMMANDS, ids=" ".join)
def test_cli_start_up_imports_no_heavy_modules(tmp_path, args):
    """`state`, `list`, `kill`, `ps` and `events` must not pay for grpc, protobuf, QMP or
    asyncio, nor for click: tools call them in loops (their fast path: cli/fast.py)."""
    import subprocess
    import sys
    code = ("import sys, runpy\n"
            "sys.argv = ['runv-py', '--root'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('runv_py.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    print('EXIT:%s' % e.code)\n"
            "heavy = [m for m in ('grpc', 'google.protobuf', 'qemu.qmp', 'asyncio', 'matplotlib',"
            " 'click') if m in sys.modules]\n"
            "print('HEAVY:' + ','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["EXIT:0" if args == ["list"] else "EXIT:1",
                                                   "HEAVY:"]
    if args != ["list"]:
        assert out.stderr == "runv-py: container 'nope' does not exist\n"


def stopped_container_root(tmp_path) -> str:
    """A state root holding c1, whose record says running but whose shim is gone."""
    from runv_py.shim.records import Record
    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    Record(id="c1", status="running", pid=1 << 22, bundle="/b", rootfs="/b/rootfs",
           created="2024-01-01T00:00:00Z", shim_pid=1 << 22, shim_start="1",
           annotations={"org.example/\u00e9": "x\ty", "b": ""}, path=str(root / "c1")).write()
    return str(root)


FAST_PATH_CASES = [
    "--root ROOT state c1", "--root=ROOT state c1", "--root ROOT state nope",
    "--root ROOT state ../x", "--root ROOT state -- c1", "--root ROOT --debug state c1",
    "--root ROOT --log-format json --default-cpus 2 --systemd-cgroup state c1",
    "--root ROOT list", "--root ROOT list -q", "--root ROOT list --format json",
    "--root ROOT list --format=json", "--root ROOT-missing list -f json",
    "--root ROOT kill c1", "--root ROOT kill -a c1 KILL", "--root ROOT kill c1 NOPE",
    "--root ROOT kill --all nope 9", "--root ROOT ps c1", "--root ROOT ps -f json c1 -- -ef",
    "--root ROOT events c1", "--root ROOT events --stats --interval=1s c1",
]
DECLINED_CASES = [
    "", "--help", "--version", "--root ROOT state", "--root ROOT state c1 c2", "state -h",
    "--root ROOT list -fjson", "--root ROOT list -f yaml", "--root ROOT list extra",
    "--root ROOT kill c1 -9", "--bogus state c1", "--default-cpus 99 state c1",
    "--default-cpus x state c1", "--log-format yaml state c1", "--systemd-cgroup=1 state c1",
    "-- state c1", "--root", "--root ROOT nosuchcommand", "--root ROOT spec",
]


@pytest.mark.parametrize("line", FAST_PATH_CASES)
def test_cli_fast_path_prints_and_exits_as_click(tmp_path, capsys, line):
    """The click-free path (cli/fast.py) and the click CLI give the same output, errors
    and exit status."""
    from runv_py.cli import app, fast
    root = stopped_container_root(tmp_path)
    argv = [a.replace("ROOT", root) for a in line.split()]
    assert fast.parse(argv) is not None
    results = []
    for run in (lambda: fast.dispatch(argv), lambda: app.cli(argv, prog_name="runv-py")):
        with pytest.raises(SystemExit) as exit:
            run()
        captured = capsys.readouterr()
        results.append((exit.value.code, captured.out, captured.err))
    assert results[0] == results[1]


@pytest.mark.parametrize("line", DECLINED_CASES)
def test_cli_fast_path_leaves_the_rest_to_click(line):
    from runv_py.cli import fast
    assert fast.parse(line.split()) is None


def test_cli_fast_path_knows_the_click_parameters():
    """fast.py's tables are the click group's and the five commands' parameters."""
    import click

    from runv_py.cli import app, fast

    def kind(param):
        if param.is_flag:
            return "flag"
        if isinstance(param.type, click.Choice):
            return tuple(param.type.choices)
        if isinstance(param.type, click.IntRange):
            return range(param.type.min, param.type.max + 1)
        assert param.type == click.STRING, param
        return "str"

    def options(command):
        return {opt: (p.name, kind(p)) for p in command.params
                if isinstance(p, click.Option) and p.name != "version" for opt in p.opts}

    assert options(app.cli) == fast.GLOBAL_OPTIONS
    group = {p.name: p for p in app.cli.params}
    assert fast.GLOBAL_ENV == {n: p.envvar for n, p in group.items() if p.envvar}
    assert fast.global_defaults() == {n: group[n].default for n in fast.global_defaults()}
    for name, (table, (names, required, variadic)) in fast.COMMANDS.items():
        command = app.cli.commands[name]
        assert options(command) == table, name
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        assert tuple(a.name for a in arguments) == names, name
        assert sum(a.required for a in arguments) == required, name
        assert bool(arguments) and arguments[-1].nargs == -1 or not variadic, name
        defaults = {p.name: p.default for p in command.params
                    if not p.required and p.nargs != -1}
        assert {k: v for k, v in fast.COMMAND_DEFAULTS.get(name, {}).items()
                if k in defaults} == defaults, name


def test_cli_launcher_without_site(tmp_path):
    """runv_py/cli/launch.py under `python3 -S`: runv_py found from the launcher's place,
    the fast path without site; anything else through click, without site's .pth hooks."""
    import os
    import subprocess
    import sys
    launch = os.path.join(os.path.dirname(oci.__file__), "..", "cli", "launch.py")
    root = stopped_container_root(tmp_path)

    def run(*args):
        return subprocess.run([sys.executable, "-S", launch, "--root", root, *args],
                              capture_output=True, text=True, timeout=60)
    state = run("state", "c1")
    assert state.returncode == 0 and json.loads(state.stdout)["status"] == "stopped"
    missing = run("state", "nope")
    assert (missing.returncode, missing.stderr) == (1, "runv-py: container 'nope' does not exist\n")
    usage = run("state")
    assert usage.returncode == 2 and usage.stderr.startswith("Usage: runv-py state")
    from runv_py import __version__
    assert run("--version").stdout == f"runv-py, version {__version__}\n"
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", launch, "--root", root,
                          "delete", "c1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = {row.split("|")[-1].strip() for row in out.stderr.splitlines()
                if row.startswith("import time:")}
    assert "click" in imported and "sitecustomize" not in imported
    assert not any(name.startswith("__editable__") for name in imported)


LAUNCHER_LIGHT_CASES = ["state c1", "state nope", "list", "list -q", "list -f json"]


@pytest.mark.parametrize("line", LAUNCHER_LIGHT_CASES)
def test_cli_launcher_state_and_list_import_little(tmp_path, line):
    """`state` and `list` under the -S launcher import neither json (its decoder imports
    re), dataclasses (inspect), typing, enum nor ctypes: each costs more than the command."""
    import os
    import subprocess
    import sys
    launch = os.path.join(os.path.dirname(oci.__file__), "..", "cli", "launch.py")
    root = stopped_container_root(tmp_path)
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", launch, "--root", root,
                          *line.split()], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == (1 if "nope" in line else 0), out.stderr
    imported = {row.split("|")[-1].strip() for row in out.stderr.splitlines()
                if row.startswith("import time:")}
    assert "runv_py.cli.hot" in imported
    assert not imported & {"re", "dataclasses", "inspect", "typing", "enum", "json", "ctypes",
                           "click", "logging"}


@pytest.mark.parametrize("rules,privileged", [
    ([{"allow": True, "access": "rwm"}], True),                       # CRI's, podman's, docker's
    ([{"allow": False, "access": "rwm"}, {"allow": True, "access": "rwm"}], True),
    ([{"allow": True, "access": "rwm"}, {"allow": False, "type": "c", "major": 1, "minor": 1}], False),
    ([{"allow": True, "access": "rw"}], False),                       # no mknod: not everything
    ([{"allow": True, "type": "c", "access": "rwm"}], False),          # char devices only
    ([{"allow": False, "access": "rwm"}], False),
    ([], False)])
def test_a_container_allowed_every_device_is_recognised(rules, privileged):
    from runv_py.hyperstart.devices import allows_all
    from runv_py.oci.linux import device_rule
    assert allows_all([device_rule(r) for r in rules]) is privileged


def test_a_device_over_a_link_replaces_the_link_not_its_target(tmp_path):
    from runv_py.hyperstart import messages as m
    from runv_py.hyperstart.devices import make_device
    from runv_py.hyperstart.rootfs import secure_join
    (tmp_path / "dev" / "pts").mkdir(parents=True)
    (tmp_path / "dev" / "pts" / "ptmx").write_text("devpts' own")
    (tmp_path / "dev" / "ptmx").symlink_to("pts/ptmx")
    make_device(str(tmp_path), m.Device(path="/dev/ptmx", type="p", major=0, minor=0), secure_join)
    assert (tmp_path / "dev" / "pts" / "ptmx").read_text() == "devpts' own"
    assert not (tmp_path / "dev" / "ptmx").is_symlink() and (tmp_path / "dev" / "ptmx").is_fifo()


def test_daemon_entries_hold_no_status_of_their_own():
    """The 0.2 daemon's entry keeps what only it knows; the status is the shim's record.
    An entry written before (with a status) still says whether its exit was logged."""
    from runv_py.containerd02.supervisor import Entry
    entry = Entry({"id": "c", "bundle": "/b", "labels": [], "stdio": [], "processes": {}})
    assert "status" not in entry.to_json() and not entry.exit_logged and not entry.creating
    old = Entry({"id": "c", "bundle": "/b", "labels": [], "stdio": [], "processes": {},
                 "status": "stopped"})
    assert old.exit_logged and "status" not in old.to_json()
    assert not Entry({"id": "c", "status": "running"}).exit_logged


def test_one_settings_file_serves_the_shim_v2_the_factory_and_the_jail(tmp_path, monkeypatch):
    """Each entry point takes its settings and lets the others' be (the shim v2 once
    refused `factory` and `jail`, which the README tells operators to set)."""
    from runv_py import factory
    from runv_py.drivers import jail
    from runv_py.hyperstart.errors import InvalidArgument
    from runv_py.host import ksm
    from runv_py.shimv2 import config, zygote
    path = tmp_path / "runv-py.toml"
    path.write_text('factory = false\nfactory_pool = 3\njail = false\ndefault_memory = 300\n'
                    'factory_pause = true\nksm = true\nshim_zygote = false\n'
                    'factory_warmup = false\n')
    monkeypatch.setenv("RUNVPY_CONFIG", str(path))
    for var in ("RUNV_FACTORY", "RUNV_FACTORY_POOL", "RUNV_JAIL", "RUNV_FACTORY_PAUSE",
                "RUNV_FACTORY_WARMUP", "RUNV_KSM", "RUNV_SHIM_ZYGOTE"):
        monkeypatch.delenv(var, raising=False)
    assert config.load().default_memory == 300
    assert factory.settings() == {"enabled": False, "pool": 3, "pause": True, "warmup": False}
    assert jail.enabled() is False
    assert ksm.wanted() is True and zygote.enabled() is False
    monkeypatch.setenv("RUNV_KSM", "off")  # the environment wins
    monkeypatch.setenv("RUNV_SHIM_ZYGOTE", "on")
    assert ksm.wanted() is False and zygote.enabled() is True
    path.write_text('default_memroy = 300\n')
    with pytest.raises(InvalidArgument, match="unknown settings default_memroy"):
        config.load()
