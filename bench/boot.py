"""Boot benchmark: the raw QEMU boot floor, `runv-py run` of `true`, and `runc run`.

All three are measured side by side, interleaved round by round so that machine noise
hits them alike; medians over --runs rounds are printed with their ratios.

    python3 bench/boot.py [--runs 7]
"""
import argparse
import os
import subprocess
import tempfile
import time
import uuid

from common import RUNV, bundle, have_runc, median, row, timed

from runv_py.drivers import probe
from runv_py.vm.boot import BootConfig


def floor_command(workdir: str, config: BootConfig = None) -> list:
    """QEMU with the same machine, devices, kernel and initrd as runv-py, booting a
    trivial init that reboots at once (QEMU then exits: -no-reboot)."""
    driver = probe("")
    config = config or BootConfig(extra_cmdline=("rdinit=/floor-init",))
    share = os.path.join(workdir, "share")
    os.makedirs(share, exist_ok=True)
    return driver.command(config, "floor", share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    b = bundle(["true"])
    root = tempfile.mkdtemp(prefix="runv-bench-root-")
    work = tempfile.mkdtemp(prefix="runv-bench-floor-")
    floor_cmd = floor_command(work)
    results = {"floor": [], "runv": [], "runc": []}
    for i in range(args.runs):
        results["floor"].append(timed(floor_cmd, cwd=work, timeout=60))
        results["runv"].append(timed(RUNV + ["--root", root, "run", "-b", b, f"bench-{uuid.uuid4().hex[:8]}"],
                                     timeout=120))
        if have_runc():
            results["runc"].append(timed(["runc", "run", "-b", b, f"bench-{uuid.uuid4().hex[:8]}"],
                                         timeout=60))
        print(f"round {i + 1}/{args.runs}: floor {results['floor'][-1]:.3f}s  "
              f"runv-py {results['runv'][-1]:.3f}s", flush=True)
        time.sleep(0.2)
    floor = median(results["floor"])
    runv = median(results["runv"])
    print(f"\nmedians of {args.runs} runs, driver: {probe('').describe()['accelerator']}")
    print(row("raw QEMU boot floor (same kernel+initrd)", floor, floor))
    print(row("runv-py run true", runv, floor))
    if results["runc"]:
        runc = median(results["runc"])
        print(row("runc run true", runc, floor))
        print(f"\n  runv-py / floor = {runv / floor:.2f}x   runv-py / runc = {runv / runc:.1f}x")
    else:
        print(f"\n  runv-py / floor = {runv / floor:.2f}x   (runc not installed)")
    subprocess.run(["rm", "-rf", root, work, os.path.dirname(b)])


if __name__ == "__main__":
    main()
