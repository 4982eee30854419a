"""Memory per idle pod, and where it goes, with the default settings (the node factory
on): N idle pods through CRI (one containerd with the CRI plugin, the tests' harness),
runc's handler and runv-py's side by side in one run; and N idle containers through the
CLI (`runv-py run -d` against `runc run -d`).

For every step of N it prints the PSS per pod split by component (runv-py: the shim
with its share of the shim v2's fork server,
QEMU's guest RAM, its TCG translation cache, the rest of QEMU, the share's server
(virtiofsd, or virtfs-proxy-helper for a jailed QEMU's 9p), and the
factory's share: its own process and its ready VMs divided by N), and the drop in the
host's MemAvailable divided by N; then draws PSS per pod against N (--chart).

    python3 bench/density.py [--steps 1,5,10] [--cli 5] [--chart docs/density.png]
"""
import argparse
import json
import os
import sys
import tempfile
import time
import uuid

from common import RUNV, bundle, have_runc, median
from runv_py.factory import left_as_found  # noqa: E402
from pss import (factory_kb, factory_status, mem_available_kb, pools_full, shim_of, tree_kb,
                 vm_breakdown, zygote_kb)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from cri.harness import RUNC_HANDLER, RUNVPY_HANDLER, CriContainerd  # noqa: E402
from cri.config import missing_prerequisites  # noqa: E402

KSM = "/sys/kernel/mm/ksm/"
PARTS = ("shim", "guest_ram", "tcg_cache", "qemu", "share_server", "factory")
SETTLE = 3.0   # seconds for the guests to go idle before measuring


def per_pod(sandboxes: list, vms: bool, baseline_kb: int, forked: bool = False) -> dict:
    """Per-sandbox figures (MiB) for ``sandboxes``, [(owner pid, name)] running now: the
    median of each part, the factory's share, the MemAvailable drop. ``vms``: runv-py's
    (split by component), else runc's (the owner's process tree). ``forked``: the shims
    are the shim v2's daemons, forked by its fork server."""
    time.sleep(SETTLE)
    status = factory_status() if vms else {}
    rows = [vm_breakdown(owner, name, status) if vms else {"shim": tree_kb(owner)}
            for owner, name in sandboxes]
    n = len(sandboxes)
    out = {part: median([r.get(part, 0) for r in rows]) / 1024 for part in PARTS[:-1]}
    if forked:  # the shim v2's fork server, divided among the pods like the factory
        out["shim"] += zygote_kb() / n / 1024
    out["factory"] = factory_kb(status) / n / 1024
    out["total"] = sum(out[p] for p in PARTS)
    out["mem_available_drop"] = (baseline_kb - mem_available_kb()) / n / 1024
    return out


def ksm_pass(scans: int = 2, timeout: float = 300) -> float:
    """Start ksmd and wait for ``scans`` full passes over memory; seconds it took."""
    started = time.monotonic()
    with open(KSM + "run", "w") as f:
        f.write("1")
    first = int(open(KSM + "full_scans").read())
    while int(open(KSM + "full_scans").read()) < first + scans:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"ksmd did not finish {scans} passes in {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic() - started


def cri_run(steps: list, ksm: bool = False) -> dict:
    results = {}
    env = {"RUNV_KSM": "on"} if ksm else {}
    with CriContainerd(log_level="info", env=env) as cri:
        cri.client.rpc_timeout = 180
        logs = tempfile.mkdtemp(prefix="runv-density-")
        for handler in (RUNC_HANDLER, RUNVPY_HANDLER):
            # Two warm-ups: the first starts the node factory (and boots cold), the
            # second makes the factory a pool of pod VMs (which have room to grow, so
            # another shape than the one it warms at start).
            for i in range(2):
                warm = cri.client.run_pod(f"warm{i}-{handler}", log_dir=logs, handler=handler)
                cri.client.stop_pod(warm)
                cri.client.remove_pod(warm)
                pools_full(60)  # the factory's pool fills
            baseline = mem_available_kb()
            pods, containers, results[handler] = [], [], {}
            started = time.monotonic()
            for target in steps:
                while len(pods) < target:
                    pod = cri.client.run_pod(f"d-{handler}-{len(pods)}", handler=handler,
                                             log_dir=os.path.join(logs, str(len(pods))))
                    containers.append(cri.client.run_container(pod, "c", cri.BUSYBOX,
                                                               ["sleep", "3600"]))
                    pods.append(pod)
                results[handler][target] = per_pod([(shim_of(p), p) for p in pods],
                                                   handler == RUNVPY_HANDLER, baseline,
                                                   forked=handler == RUNVPY_HANDLER)
                print(f"{handler}: {target} pods: {results[handler][target]['total']:.1f} MiB "
                      "per pod", file=sys.stderr)
            if ksm and handler == RUNVPY_HANDLER:  # the same pods, once ksmd has merged
                took = ksm_pass()
                results["runvpy + KSM"] = {steps[-1]: per_pod(
                    [(shim_of(p), p) for p in pods], True, baseline, forked=True)}
                print(f"KSM: two full passes in {took:.0f} s", file=sys.stderr)
            # Every pod still answers: an exec in each, all of them running at once.
            answered = sum(cri.client.exec_sync(c, ["true"], timeout=60)[0] == 0
                           for c in containers)
            results[handler]["answered"] = f"{answered}/{len(containers)}"
            results[handler]["seconds_to_start_all"] = time.monotonic() - started
            for pod in pods:
                cri.client.stop_pod(pod)
                cri.client.remove_pod(pod)
    return results


def cli_run(count: int) -> dict:
    """`run -d` of ``count`` idle containers per runtime: PSS per container (MiB)."""
    import subprocess
    results = {}
    idle = bundle(["sleep", "3600"], "density")
    runtimes = [("runv-py", RUNV)] + ([("runc", ["runc"])] if have_runc() else [])
    for name, base in runtimes:
        root = tempfile.mkdtemp(prefix=f"density-{name}-")
        cmd = base + ["--root", root]
        baseline = mem_available_kb()
        ids = [f"d{uuid.uuid4().hex[:6]}" for _ in range(count)]
        try:
            for cid in ids:
                subprocess.run(cmd + ["run", "-d", "-b", idle, cid], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=120, check=True)
            pids = [json.loads(subprocess.run(cmd + ["state", cid], capture_output=True,
                                              timeout=30).stdout)["pid"] for cid in ids]
            results[name] = per_pod(list(zip(pids, ids)), name == "runv-py", baseline)
        finally:
            for cid in ids:
                subprocess.run(cmd + ["delete", "-f", cid], capture_output=True, timeout=60)
    return results


def table(title: str, figures: dict, base: str) -> None:
    print(f"\n{title}")
    print(f"  {'':16}" + "".join(f"{p:>11}" for p in PARTS) + f"{'PSS total':>11}"
          f"{'ratio':>8}{'MemAvail drop':>15}")
    for name, f in figures.items():
        ratio = f["total"] / figures[base]["total"] if figures.get(base) else 0
        print(f"  {name:16}" + "".join(f"{f.get(p, 0):11.1f}" for p in PARTS) +
              f"{f['total']:11.1f}{ratio:7.1f}x{f['mem_available_drop']:15.1f}")


def chart(path: str, cri: dict, steps: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for handler, style in ((RUNVPY_HANDLER, "o-"), (RUNC_HANDLER, "s-")):
        ax.plot(steps, [cri[handler][n]["total"] for n in steps], style, label=f"{handler} PSS")
        ax.plot(steps, [cri[handler][n]["mem_available_drop"] for n in steps], style[0] + ":",
                label=f"{handler} MemAvailable drop")
    ax.axhline(122832 / 1024, color="grey", linestyle="--", label="Kata + QEMU (CI baseline)")
    ax.set_xlabel("idle pods on the node (CRI)")
    ax.set_ylabel("MiB per pod")
    ax.set_title("Memory per idle pod, TCG, default settings")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,5,10", help="pod counts to measure at")
    parser.add_argument("--cli", type=int, default=5, help="idle CLI containers per runtime")
    parser.add_argument("--chart", default="", help="write the PSS-against-N chart here")
    parser.add_argument("--ksm", action="store_true",
                        help="runv-py's VMs mergeable (RUNV_KSM=on), and at the last step the "
                        "same pods again once ksmd has merged (the node factory must not be "
                        "running yet: it would not have KSM on)")
    args = parser.parse_args()
    steps = sorted({int(s) for s in args.steps.split(",")})
    missing = missing_prerequisites()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    if os.environ.get("RUNV_FACTORY", "").lower() in ("0", "off", "false", "no"):
        print("note: RUNV_FACTORY is off: these are the figures without the factory",
              file=sys.stderr)
    if args.ksm and factory_status():
        print("cannot run with --ksm: a node factory runs already (runv-py factory stop)",
              file=sys.stderr)
        return 1
    was = open(KSM + "run").read().strip() if args.ksm else ""
    try:
        cri = cri_run(steps, args.ksm)
    finally:
        if args.ksm:  # as found (2: stopped, and what it merged unmerged)
            with open(KSM + "run", "w") as f:
                f.write("2" if was == "0" else was)
    for n in steps:
        rows = [h for h in (RUNC_HANDLER, RUNVPY_HANDLER, "runvpy + KSM") if n in cri.get(h, {})]
        table(f"CRI, {n} idle pods: MiB per pod (medians; factory = its share)",
              {h: cri[h][n] for h in rows}, RUNC_HANDLER)
    for h in (RUNC_HANDLER, RUNVPY_HANDLER):
        print(f"  {h}: {cri[h]['answered']} pods answered an exec with {steps[-1]} running; "
              f"{cri[h]['seconds_to_start_all']:.0f} s to start them all")
    if args.cli:
        table(f"CLI, {args.cli} idle containers: MiB per container", cli_run(args.cli), "runc")
    if args.chart:
        chart(args.chart, cri, steps)
    return 0


if __name__ == "__main__":
    with left_as_found():  # the runs' clients may start the node's VM factory
        sys.exit(main())
