"""File I/O benchmark: the rootfs over 9p against virtio-fs against runc, side by side,
and the CLI's `state` and `exec` latency against runc's.

The I/O measures are `runv-py compare`'s (timed inside the container, so start-up is not
in them): sequential write and read, small-file create+delete, `find` over a tree of
10,000 files and `tar x` of a 50 MB archive; each runtime runs the same script --runs
times, interleaved round by round; medians, with the ratio to runc.

    python3 bench/share_io.py [--runs 5] [--tree-files 10000] [--tar-mb 50]
"""
import argparse
import os
import shutil
import tempfile
import uuid

from common import RUNV, bundle, have_runc, median, timed

from runv_py.compare.measure import derived_bundle, parse_marks, work_script, workload_figures
from runv_py.compare.runtimes import Runtime

MEASURES = [("seq_write_mbps", "sequential write", "MB/s"),
            ("seq_read_mbps", "sequential read", "MB/s"),
            ("small_file_ops", "small-file create+delete", "ops/s"),
            ("find_tree_s", "find over the tree", "s"), ("tar_x_mbps", "tar x of the archive", "MB/s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree-files", type=int, default=10000)
    parser.add_argument("--tar-mb", type=int, default=50)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="runv-bench-io-")
    source = bundle(["true"], "io")
    script = derived_bundle(source, os.path.join(work, "io"),
                            ["sh", "-c", work_script(args.tree_files, args.tar_mb)], writable=True)
    runtimes = [Runtime(f"runv-py vm ({share})",
                        RUNV + ["--root", os.path.join(work, share), "--share", share], "runv")
                for share in ("9p", "virtiofs")]
    if have_runc():
        runtimes.append(Runtime("runc", ["runc", "--root", os.path.join(work, "runc")], "runc"))
    io = {rt.name: {k: [] for k, _, _ in MEASURES} for rt in runtimes}
    latency = {rt.name: {"state": [], "exec": []} for rt in runtimes}
    idle = derived_bundle(source, os.path.join(work, "idle"), ["sleep", "3600"])
    try:
        for i in range(args.runs):
            for rt in runtimes:
                r = rt.run(script, f"io-{uuid.uuid4().hex[:8]}", timeout=900)
                if r.returncode != 0:
                    raise RuntimeError(f"{rt.name}: {r.stderr.decode()[-300:]}")
                figures = workload_figures(parse_marks(r.stdout.decode()), args.tar_mb)
                for key, _, _ in MEASURES:
                    io[rt.name][key].append(figures[key])
            print(f"I/O round {i + 1}/{args.runs}", flush=True)
        for rt in runtimes:  # CLI latency on one idle container per runtime
            cid = f"io-idle-{uuid.uuid4().hex[:6]}"
            rt.start_detached(idle, cid, timeout=120)
            try:
                for _ in range(args.runs):
                    latency[rt.name]["state"].append(timed(rt.cmd("state", cid), timeout=120))
                    latency[rt.name]["exec"].append(timed(rt.cmd("exec", cid, "true"), timeout=120))
            finally:
                rt.delete(cid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.path.dirname(source), ignore_errors=True)
    report(runtimes, io, latency, args)


def report(runtimes, io, latency, args) -> None:
    names = [rt.name for rt in runtimes]
    base = "runc" if "runc" in names else names[0]
    print(f"\nmedians of {args.runs} runs; tree of {args.tree_files} files, "
          f"{args.tar_mb} MB archive; (ratio to {base})")
    print(f"  {'measure':<30}" + "".join(f"{n:>26}" for n in names))
    for key, label, unit in MEASURES:
        cells = []
        for n in names:
            value = median(io[n][key])
            ratio = value / median(io[base][key])
            cells.append(f"{value:10.2f} {unit:<6} {ratio:5.2f}x")
        print(f"  {label:<30}" + "".join(f"{c:>26}" for c in cells))
    for key in ("state", "exec"):
        cells = [f"{median(latency[n][key]) * 1000:9.1f} ms "
                 f"{median(latency[n][key]) / median(latency[base][key]):6.2f}x" for n in names]
        print(f"  {'CLI ' + key:<30}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
