"""Start-up and density benchmark: VMs from cold, from a template, from the cache, runc.

Start-up: `runv-py run` of busybox `true` cold and with `--template`, and `runc run` of
the same bundle, interleaved round by round; then the same container started in this
process through each factory (direct, template, cache), where the cache can be timed.
Density: the PSS (smaps_rollup) of the QEMU processes of N idle containers (`sleep
1000`), started cold and then from the template. Medians of --runs; ratios against cold.

    python3 bench/startup.py [--runs 10] [--density 10] [--json out.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from common import RUNV, bundle, have_runc, median, row, timed
from runv_py.factory import left_as_found  # noqa: E402
from pss import pools_full

from runv_py.oci import bundle as oci
from runv_py.drivers import probe
from runv_py.host import statedir
from runv_py.sandbox import ProcessIO, Sandbox, private_mount_namespace
from runv_py.vm import template
from runv_py.vm.boot import BootConfig, DirectFactory
from runv_py.vm.factory import CacheFactory
from runv_py.vm.template import TemplateFactory


def start_container(factory, workdir: str, name: str, b: oci.Bundle, wait: bool) -> Sandbox:
    """A container in a VM from ``factory``, through the sandbox API; with ``wait``, run
    it to its exit and tear everything down (returns None)."""
    sandbox = None
    try:
        sandbox = Sandbox.boot(name, factory, BootConfig(), workdir)
        sandbox.create_container(name, b, ProcessIO())
        sandbox.start_container(name)
        if not wait:
            return sandbox
        exit = sandbox.wait(name, timeout=60)
        if exit is None or exit.status != 0:
            raise RuntimeError(f"{name} failed: {exit} {sandbox.vm.failure()}")
    except BaseException:
        if sandbox is not None:
            sandbox.destroy()
        statedir.remove(workdir)
        raise
    sandbox.destroy()
    statedir.remove(workdir)
    return None


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def density(factory, n: int, b: oci.Bundle, state: str, label: str) -> dict:
    """Start ``n`` idle containers, measure their QEMUs' PSS, stop them."""
    boxes = []
    try:
        for i in range(n):
            name = f"{label}-{i}-{uuid.uuid4().hex[:6]}"
            boxes.append((start_container(factory, os.path.join(state, name), name, b, False),
                          os.path.join(state, name)))
        time.sleep(2)  # let the guests settle into idle
        per_vm = [pss_kb(box.vm.pid) for box, _ in boxes]
    finally:
        for box, workdir in boxes:
            box.destroy()
            statedir.remove(workdir)
    return {"containers": n, "pss_kb_total": sum(per_vm), "pss_kb_per_container": sum(per_vm) / n,
            "pss_kb_each": per_vm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--density", type=int, default=10, help="idle containers per PSS figure")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()

    private_mount_namespace()  # before any thread: sandboxes bind-mount into their shares
    work = tempfile.mkdtemp(prefix="runv-bench-startup-")
    tdir = os.path.join(work, "template")
    root = os.path.join(work, "root")
    true_bundle = bundle(["true"], "startup")
    sleep_bundle = bundle(["sleep", "1000"], "density")
    figures = {"runs": args.runs}
    driver = probe("")
    try:
        started = time.perf_counter()
        subprocess.run(RUNV + ["--template", tdir, "manage", "create-template"], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)  # the one every clone comes from
        figures["create_template_s"] = time.perf_counter() - started
        meta = template.load(tdir)

        # ---- `runv-py run true` (and runc), interleaved ------------------------------
        off = {"RUNV_FACTORY": "off"}
        cli = {"cold": (RUNV + ["--root", root], off),
               "template": (RUNV + ["--root", root, "--template", tdir], off),
               # The default: the node's factory (it starts with the first round).
               "factory (virtiofs)": (RUNV + ["--root", root], {"RUNV_FACTORY": "on",
                                                                "RUNV_SHARE": "virtiofs"}),
               "factory (9p)": (RUNV + ["--root", root], {"RUNV_FACTORY": "on",
                                                          "RUNV_SHARE": "9p"})}
        if have_runc():
            cli["runc"] = (["runc", "--root", os.path.join(work, "runc")], {})
        # Compiled modules, as an installed runv-py has them, whatever this shell says.
        env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(work, "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        times = {name: [] for name in cli}
        for i in range(args.runs + 1):  # round 0 warms up and is not counted
            for name, (cmd, extra) in cli.items():
                if name.startswith("factory"):
                    pools_full(8 if i == 0 else 60, env)  # its refill must not compete
                cid = f"bench-{name.split()[0]}-{uuid.uuid4().hex[:8]}"
                elapsed = timed(cmd + ["run", "-b", true_bundle, cid], timeout=120,
                                env=dict(env, **extra))
                if i:
                    times[name].append(elapsed)
            print(f"CLI round {i}/{args.runs}", flush=True)
        figures["cli_run_true_s"] = {n: median(v) for n, v in times.items()}

        # ---- the same in this process, through each factory --------------------------
        b = oci.load(true_bundle)
        state = os.path.join(work, "state")
        cache = CacheFactory(DirectFactory(driver), 1, BootConfig())
        factories = {"direct (cold)": DirectFactory(driver),
                     "template": TemplateFactory(driver, tdir), "cache": cache}
        api = {name: [] for name in factories}
        try:
            for i in range(args.runs):
                for name, factory in factories.items():
                    # Each start begins with the cache full and idle: its refill would
                    # otherwise compete for the two CPUs with the next measurement.
                    if not cache.wait_full(120):
                        raise RuntimeError("the cache did not fill")
                    name_id = f"api-{i}-{uuid.uuid4().hex[:6]}"
                    t0 = time.perf_counter()
                    start_container(factory, os.path.join(state, name_id), name_id, b, True)
                    api[name].append(time.perf_counter() - t0)
                print(f"in-process round {i + 1}/{args.runs}", flush=True)
        finally:
            cache.close()
        figures["in_process_run_true_s"] = {n: median(v) for n, v in api.items()}

        # ---- density -------------------------------------------------------------------
        sb = oci.load(sleep_bundle)
        figures["density_cold"] = density(DirectFactory(driver), args.density, sb, state, "cold")
        figures["density_template"] = density(TemplateFactory(driver, tdir), args.density, sb,
                                              state, "tpl")
        figures["template_memory_file_mib"] = meta["memory_mib"]
    finally:
        template.remove(tdir)
        shutil.rmtree(work, ignore_errors=True)
        for path in (true_bundle, sleep_bundle):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    report(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def report(f: dict) -> None:
    print(f"\n`run true`, medians of {f['runs']} runs (ratio to cold):")
    cli = f["cli_run_true_s"]
    for name, value in cli.items():
        print(row(f"runv-py run, {name}" if name != "runc" else "runc run", value, cli["cold"]))
    print("\nthe same through the factories in one process (ratio to cold):")
    api = f["in_process_run_true_s"]
    for name, value in api.items():
        print(row(name, value, api["direct (cold)"]))
    print(f"\ncreate-template: {f['create_template_s']:.2f} s")
    cold, tpl = f["density_cold"], f["density_template"]
    print(f"\nPSS of {cold['containers']} idle containers (sum over the QEMU processes):")
    print(f"  cold      {cold['pss_kb_total'] / 1024:8.1f} MiB   "
          f"{cold['pss_kb_per_container'] / 1024:7.1f} MiB per container")
    print(f"  template  {tpl['pss_kb_total'] / 1024:8.1f} MiB   "
          f"{tpl['pss_kb_per_container'] / 1024:7.1f} MiB per container   "
          f"{tpl['pss_kb_per_container'] / cold['pss_kb_per_container']:.2f}x cold")
    print(f"\ntargets under TCG: template start <= 0.3x cold "
          f"(CLI {cli['template'] / cli['cold']:.2f}x, in-process "
          f"{api['template'] / api['direct (cold)']:.2f}x); template PSS <= 0.5x cold "
          f"({tpl['pss_kb_per_container'] / cold['pss_kb_per_container']:.2f}x)")


if __name__ == "__main__":
    with left_as_found():  # the runs' clients may start the node's VM factory
        main()
