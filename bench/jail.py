"""What the VMM jail costs: runv-py with QEMU jailed (the default) against the jail
turned off (RUNV_JAIL=off: QEMU as root, serving 9p itself), side by side, interleaved
round by round, factory off so every VM boots cold.

- start-up: `runv-py run` of busybox `true`;
- 9p file I/O inside the container (`runv-py compare`'s work script: sequential write and
  read, small-file create+delete, `find` over a tree, `tar x`), where the jailed QEMU's
  share goes through virtfs-proxy-helper;
- PSS of one idle container's QEMU plus its share server.

    python3 bench/jail.py [--runs 5] [--tree-files 2000] [--tar-mb 20]
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from common import RUNV, bundle, median, timed

from runv_py.compare.measure import (derived_bundle, descendants, parse_marks, pss_kb,
                                     work_script, workload_figures)

MODES = (("jailed", "on"), ("jail off", "off"))
MEASURES = [("seq_write_mbps", "9p sequential write", "MB/s"),
            ("seq_read_mbps", "9p sequential read", "MB/s"),
            ("small_file_ops", "9p small-file create+delete", "ops/s"),
            ("find_tree_s", "9p find over the tree", "s"),
            ("tar_x_mbps", "9p tar x of the archive", "MB/s")]


def env(jail: str) -> dict:
    return dict(os.environ, RUNV_JAIL=jail, RUNV_FACTORY="off")


def idle_pss(root: str, idle: str, jail: str) -> float:
    """KiB of PSS of an idle container's QEMU and share server (their jail tools too)."""
    cid = f"jail-idle-{uuid.uuid4().hex[:6]}"
    base = RUNV + ["--root", root, "--share", "9p"]
    subprocess.run(base + ["run", "-d", "-b", idle, cid], env=env(jail), timeout=120,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    try:
        time.sleep(3)  # settle into idle
        shim = json.loads(subprocess.run(base + ["state", cid], capture_output=True,
                                         timeout=60, check=True).stdout)["pid"]
        return sum(pss_kb(pid) for pid in descendants(shim))  # all below the shim
    finally:
        subprocess.run(base + ["delete", "-f", cid], env=env(jail), timeout=120,
                       capture_output=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree-files", type=int, default=2000)
    parser.add_argument("--tar-mb", type=int, default=20)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="runv-bench-jail-")
    true = bundle(["true"], "jail")
    script = derived_bundle(true, os.path.join(work, "io"),
                            ["sh", "-c", work_script(args.tree_files, args.tar_mb)], writable=True)
    idle = derived_bundle(true, os.path.join(work, "idle"), ["sleep", "3600"])
    start = {name: [] for name, _ in MODES}
    io = {name: {k: [] for k, _, _ in MEASURES} for name, _ in MODES}
    pss = {name: [] for name, _ in MODES}
    try:
        for i in range(args.runs):
            for name, jail in MODES:
                root = os.path.join(work, jail)
                base = RUNV + ["--root", root, "--share", "9p"]
                start[name].append(timed(base + ["run", "-b", true, f"t-{uuid.uuid4().hex[:8]}"],
                                         env=env(jail), timeout=120))
                r = subprocess.run(base + ["run", "-b", script, f"io-{uuid.uuid4().hex[:8]}"],
                                   env=env(jail), stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=900)
                if r.returncode != 0:
                    raise RuntimeError(f"{name}: {r.stderr.decode()[-300:]}")
                figures = workload_figures(parse_marks(r.stdout.decode()), args.tar_mb)
                for key, _, _ in MEASURES:
                    io[name][key].append(figures[key])
                pss[name].append(idle_pss(root, idle, jail))
            print(f"round {i + 1}/{args.runs}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.path.dirname(true), ignore_errors=True)
    names = [name for name, _ in MODES]
    print(f"\nmedians of {args.runs} rounds; ratio jailed / jail off")
    print(f"  {'measure':<32}" + "".join(f"{n:>16}" for n in names) + "   ratio")
    rows = [("run true (cold)", {n: median(start[n]) * 1000 for n in names}, "ms"),
            *[(label, {n: median(io[n][key]) for n in names}, unit)
              for key, label, unit in MEASURES],
            ("idle QEMU + share server PSS", {n: median(pss[n]) / 1024 for n in names}, "MiB")]
    for label, values, unit in rows:
        cells = "".join(f"{values[n]:>10.1f} {unit:<5}" for n in names)
        print(f"  {label:<32}{cells}   {values[names[0]] / values[names[1]]:5.2f}x")


if __name__ == "__main__":
    main()
