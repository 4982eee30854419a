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
from runv_py.busybox_bundle import make_bundle

pytestmark = [pytest.mark.vm]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run compare once for the module; returns (output dir, results, stdout)."""
    base = tmp_path_factory.mktemp("compare")
    bundle = make_bundle(str(base / "bundle"), ["true"])
    out = base / "out"
    cmd = [sys.executable, "-m", "runv_py.cli", "--kernel", KERNEL, "--initrd", INITRD,
           "compare", "-b", bundle, "--runs", "2", "--out", str(out)]
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


def expected_runtimes() -> set:
    names = {"runv-py vm", "runv-py namespace"}
    if shutil.which("runc"):
        names.add("runc")
    return names


@pytest.mark.timeout(900)
def test_json_has_a_figure_for_every_runtime_and_measure(report):
    _, results, _ = report
    assert expected_runtimes() <= set(results["runtimes"])
    assert "runv-py vm (template)" in results["runtimes"] or \
        results["skipped"].get("runv-py vm (template)")
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
    vm = results["runtimes"]["runv-py vm"]["probes"]
    ns = results["runtimes"]["runv-py namespace"]["probes"]
    assert vm["kernel"] and vm["kernel"] != platform.release()
    assert ns["kernel"] == platform.release()
    # Neither sees the host's processes or network interfaces.
    for probes in (vm, ns):
        assert probes["host_pid"] == "no"
        assert not set(probes["netdevs"].split()) - {"lo"}
    # The VM has its own memory size; the namespace container sees the host's.
    with open("/proc/meminfo") as f:
        host_kb = int(f.readline().split()[1])
    assert int(vm["mem_total_kb"]) < host_kb // 4
    assert int(ns["mem_total_kb"]) == host_kb
