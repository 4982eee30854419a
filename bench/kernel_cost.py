"""What a guest kernel costs, two kernels side by side: boot time (the raw QEMU boot
floor and `runv-py run true`, cold boots) and memory of an idle container (the guest's
MemTotal and MemAvailable, QEMU's PSS split as bench/pss.py splits it). Rounds alternate
the kernels so that machine noise hits both alike; medians are printed.

    python3 bench/kernel_cost.py NEW_KERNEL [--base /var/lib/runv-py/kernel] [--runs 3]
"""
import argparse
import os
import re
import resource
import subprocess
import tempfile
import time
import uuid

from boot import floor_command
from common import RUNV, bundle, median, timed
from pss import qemu_split

from runv_py import paths

SETTLE = 5.0   # seconds an idle container is left before its memory is read
INITCALL = re.compile(r"initcall (\S+?)\+\S+ returned -?\d+ after (\d+) usecs")


def initcalls(kernel: str, work: str) -> dict:
    """Guest time (us) of each initcall of one floor boot (initcall_debug): what the
    kernel's own start-up spends per subsystem, whatever else loads the host."""
    from runv_py.vm.boot import BootConfig
    log = os.path.join(work, "console.log")
    if os.path.exists(log):
        os.unlink(log)
    timed(floor_command(work, BootConfig(kernel=kernel, debug=True, extra_cmdline=(
        "rdinit=/floor-init", "initcall_debug", "loglevel=8"))), cwd=work, timeout=60)
    with open(log, errors="replace") as f:
        return {m.group(1): int(m.group(2)) for m in INITCALL.finditer(f.read())}


def qemu_of(name: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*runv-py:[^ ]*{name}"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


def idle_memory(kernel: str, root: str, b: str) -> dict:
    """Guest MemTotal/MemAvailable and QEMU's PSS (KiB) of an idle `sleep` container."""
    name = f"kmem-{uuid.uuid4().hex[:8]}"
    base = RUNV + ["--root", root, "--kernel", kernel]
    with tempfile.TemporaryFile() as out:
        subprocess.run(base + ["run", "-d", "-b", b, name], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out, check=True, timeout=120)
    try:
        time.sleep(SETTLE)
        meminfo = subprocess.run(base + ["exec", name, "cat", "/proc/meminfo"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
        fields = dict(line.split(":", 1) for line in meminfo.splitlines())
        qemu = qemu_of(name)
        split = qemu_split(qemu)
        with open(f"/proc/{qemu}/smaps_rollup") as f:
            rss = [int(line.split()[1]) for line in f if line.startswith("Rss:")][0]
        # PSS shares the kernel file's pages among every QEMU mapping it (other VMs of the
        # installed kernel on this machine): RSS is the per-VM figure to compare.
        return {"mem_total": int(fields["MemTotal"].split()[0]),
                "mem_available": int(fields["MemAvailable"].split()[0]),
                "qemu_pss": sum(split.values()), "qemu_rss": rss}
    finally:
        subprocess.run(base + ["delete", "-f", name], capture_output=True, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", help="the kernel to measure")
    parser.add_argument("--base", default=paths.KERNEL, help="the kernel to compare with")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ["RUNV_FACTORY"] = "off"   # cold boots of the kernel under test
    kernels = {"base": args.base, "new": args.kernel}
    true_b, idle_b = bundle(["true"]), bundle(["sleep", "600"], name="idle")
    root = tempfile.mkdtemp(prefix="runv-bench-root-")
    work = tempfile.mkdtemp(prefix="runv-bench-floor-")
    results = {k: {"floor": [], "cpu": [], "run": [], "mem": [], "init": []} for k in kernels}
    for i in range(args.runs):
        for label, kernel in kernels.items():
            from runv_py.vm.boot import BootConfig
            r = results[label]
            # CPU time of the floor's QEMU too: under TCG it is the work of the boot, which
            # other load on the machine stretches less than the wall time.
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r["floor"].append(timed(floor_command(work, BootConfig(
                kernel=kernel, extra_cmdline=("rdinit=/floor-init",))), cwd=work, timeout=60))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            r["cpu"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            r["run"].append(timed(RUNV + ["--root", root, "--kernel", kernel, "run", "-b", true_b,
                                          f"kboot-{uuid.uuid4().hex[:8]}"], timeout=120))
            r["mem"].append(idle_memory(kernel, root, idle_b))
            r["init"].append(initcalls(kernel, work))
            print(f"round {i + 1}/{args.runs} {label}: floor {r['floor'][-1]:.3f}s"
                  f" (CPU {r['cpu'][-1]:.3f}s)"
                  f"  run {r['run'][-1]:.3f}s  {r['mem'][-1]}", flush=True)
    print(f"\nmedians of {args.runs} rounds (TCG, 1 vCPU, 256 MiB, 9p)")
    print(f"  {'':<6} {'size':>11} {'QEMU floor':>11} {'its CPU':>8} {'run true':>9} {'MemTotal':>10}"
          f" {'MemAvail':>10} {'QEMU PSS':>10} {'QEMU RSS':>10}")
    for label, kernel in kernels.items():
        r = results[label]
        mem = {k: median([m[k] for m in r["mem"]]) for k in r["mem"][0]}
        print(f"  {label:<6} {os.path.getsize(kernel) // 1024:>7} KiB {median(r['floor']) * 1000:>8.0f} ms"
              f" {median(r['cpu']) * 1000:>5.0f} ms"
              f" {median(r['run']) * 1000:>6.0f} ms {mem['mem_total']:>6.0f} KiB"
              f" {mem['mem_available']:>6.0f} KiB {mem['qemu_pss']:>6.0f} KiB"
              f" {mem['qemu_rss']:>6.0f} KiB")
    base_calls = set().union(*results["base"]["init"])
    for label in kernels:
        runs = results[label]["init"]
        total = median([sum(c.values()) for c in runs])
        added = median([sum(us for name, us in c.items() if name not in base_calls) for c in runs])
        print(f"  {label:<6} initcalls: {total / 1000:.1f} ms in all, {added / 1000:.1f} ms in the"
              f" ones the base kernel lacks")
    new = results["new"]["init"]
    extra = sorted({n for c in new for n in c} - base_calls,
                   key=lambda n: -median([c.get(n, 0) for c in new]))
    print("  slowest added initcalls: " + ", ".join(
        f"{n} {median([c.get(n, 0) for c in new]) / 1000:.1f} ms" for n in extra[:6]))
    subprocess.run(["rm", "-rf", root, work, os.path.dirname(true_b), os.path.dirname(idle_b)])


if __name__ == "__main__":
    main()
