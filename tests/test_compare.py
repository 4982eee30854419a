"""`runv-py compare`: a busybox bundle under the VM driver, the namespace driver and runc,
for real, with few runs; then the JSON, the PNG and the HTML it wrote."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from conftest import INITRD, KERNEL, qemu_pids
from runv_py.oci.busybox import make_bundle

pytestmark = [pytest.mark.vm]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> list:
    return [sys.executable, "-m", "runv_py.cli", "--kernel", KERNEL, "--initrd", INITRD, *args]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A private VM template when this runv-py makes them ([] of global flags if not)."""
    path = str(tmp_path_factory.mktemp("template") / "tpl")
    help_text = subprocess.run(cli("--help"), capture_output=True, text=True, timeout=30).stdout
    if "--template" not in help_text:
        yield []
        return
    made = subprocess.run(cli("--template", path, "manage", "create-template"),
                          capture_output=True, timeout=120)
    assert made.returncode == 0, made.stderr.decode(errors="replace")[-1000:]
    yield ["--template", path]
    subprocess.run(cli("--template", path, "manage", "remove-template"), capture_output=True,
                   timeout=60)


@pytest.fixture(scope="module")
def report(tmp_path_factory, template):
    """Run compare once for the module; returns (output dir, results, stdout)."""
    base = tmp_path_factory.mktemp("compare")
    bundle = make_bundle(str(base / "bundle"), ["true"])
    out = base / "out"
    cmd = cli(*template, "compare", "-b", bundle, "--runs", "2", "--tree-files", "500",
              "--tar-mb", "8", "--out", str(out))
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=600)
    finally:
        # Nothing may outlive compare: no QEMU, no namespace agent of its containers.
        leaked = qemu_pids("cmp-") + [int(p) for p in subprocess.run(
            ["pgrep", "-f", "hyperstart.hostagent.*runv-py:cmp-"], capture_output=True,
            text=True).stdout.split()]
        for pid in leaked:
            os.kill(pid, 9)
    assert not leaked, f"compare leaked processes: {leaked}"
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    with open(out / "compare.json") as f:
        return out, json.load(f), r.stdout.decode()


def expected_runtimes(template: list) -> set:
    names = {"runv-py vm (9p)", "runv-py vm (virtiofs)", "runv-py namespace"}
    if shutil.which("runc"):
        names.add("runc")
    if template:
        names.add("runv-py vm (template)")
    return names


@pytest.mark.timeout(900)
def test_json_has_a_figure_for_every_runtime_and_measure(report, template):
    _, results, _ = report
    assert expected_runtimes(template) <= set(results["runtimes"])
    if not template:  # a row that cannot run says why
        assert results["skipped"]["runv-py vm (template)"]
    for name, data in results["runtimes"].items():
        assert not data.get("error"), f"{name}: {data.get('error')}"
        for key in results["measures"]:
            figure = data["measures"].get(key)
            assert figure, f"{name} has no {key}"
            assert figure["median"] > 0, f"{name} {key} = {figure}"
        assert data["isolation"], f"{name} has no isolation probes"
    for key in ("start_to_exit_ms", "exec_ms"):
        assert all(len(d["measures"][key]["values"]) == 2 for d in results["runtimes"].values())


@pytest.mark.timeout(900)
def test_png_decodes(report):
    out, _, _ = report
    data = (out / "compare.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    import matplotlib.image
    image = matplotlib.image.imread(str(out / "compare.png"))
    assert image.shape[0] > 100 and image.shape[1] > 200


@pytest.mark.timeout(900)
def test_html_holds_table_chart_and_probes(report):
    out, results, stdout = report
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    for name in results["runtimes"]:
        assert name in page and name in stdout
    for meta in results["measures"].values():
        assert meta["label"].replace("`", "&#x60;") in page or meta["label"] in page
        assert meta["label"] in stdout
    assert "can read the host&#x27;s dmesg" in page or "can read the host's dmesg" in page


@pytest.mark.timeout(900)
def test_probes_show_guest_kernel_under_vm_and_host_kernel_under_namespace(report):
    _, results, _ = report
    vm = results["runtimes"]["runv-py vm (9p)"]["probes"]
    if "runv-py vm (template)" in results["runtimes"]:
        assert results["runtimes"]["runv-py vm (template)"]["probes"]["kernel"] == vm["kernel"]
    ns = results["runtimes"]["runv-py namespace"]["probes"]
    assert vm["kernel"] and vm["kernel"] != platform.release()
    assert ns["kernel"] == platform.release()
    # Neither sees the host's processes or network interfaces. The VM has its own NIC,
    # unconnected: it waits for a network made between create and start (net/late.py).
    for probes, own in ((vm, {"lo", "eth0"}), (ns, {"lo"})):
        assert probes["host_pid"] == "no"
        assert not set(probes["netdevs"].split()) - own
    # The VM has its own memory size; the namespace container sees the host's.
    with open("/proc/meminfo") as f:
        host_kb = int(f.readline().split()[1])
    assert int(vm["mem_total_kb"]) < host_kb // 4
    assert int(ns["mem_total_kb"]) == host_kb


# ---- the parsing and judging, without containers ----------------------------------------

def test_work_script_marks_parse_to_seconds():
    from runv_py.compare.measure import CompareError, parse_marks
    text = "".join(f"@{i}\n    time.tv_sec:  100\n    time.tv_usec: {i * 1000}\n" for i in range(9))
    assert parse_marks(text) == pytest.approx([100 + i / 1000 for i in range(9)])
    with pytest.raises(CompareError):
        parse_marks(text.split("@8")[0])


def test_probes_are_judged_against_the_host():
    from runv_py.compare.measure import judge_probes
    host = {"kernel": "6.18", "mounts": ["/srv/data"], "netdevs": ["eth0"]}
    leaky = judge_probes({"kernel": "6.18", "host_pid": "yes", "processes": "90",
                          "mounts": "/ /proc /srv/data", "netdevs": "lo eth0",
                          "insmod": "insmod: can't insert 'x': Exec format error",
                          "dmesg_lines": "5"}, host)
    assert leaky["host mounts visible"].startswith("yes: /srv/data")
    assert leaky["host network interfaces visible"] == "yes: eth0"
    assert leaky["can load a kernel module"].startswith("yes")
    assert leaky["can read the host's dmesg"].startswith("yes")
    guest = judge_probes({"kernel": "6.1", "host_pid": "no", "mounts": "/ /proc",
                          "netdevs": "lo", "insmod": "insmod: can't insert 'x': Operation not "
                          "permitted", "dmesg_lines": "120"}, host)
    assert "not the host's" in guest["kernel release"]
    assert guest["host mounts visible"].startswith("no")
    assert guest["can load a kernel module"] == "no (permission denied)"
    assert guest["can read the host's dmesg"].startswith("its own kernel's log")


def test_derived_bundle_shares_the_rootfs(tmp_path):
    from runv_py.compare.measure import derived_bundle
    source = make_bundle(str(tmp_path / "b"), ["sh"], readonly=True)
    target = derived_bundle(source, str(tmp_path / "d"), ["true"], env={"A": "1"}, writable=True)
    with open(os.path.join(target, "config.json")) as f:
        spec = json.load(f)
    assert spec["root"] == {"path": os.path.join(source, "rootfs"), "readonly": False}
    assert spec["process"]["args"] == ["true"] and "A=1" in spec["process"]["env"]
