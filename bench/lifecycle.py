"""Lifecycle benchmark: `create`+`start`, `state` and `exec true` of runv-py against
runc's same commands on the same bundle, measured side by side; medians over --runs.

    python3 bench/lifecycle.py [--runs 7]
"""
import argparse
import os
import subprocess
import tempfile
import uuid

from common import RUNV, bundle, have_runc, median, timed


def cycle(cli: list, b: str, results: dict, name: str) -> None:
    cid = f"bench-{uuid.uuid4().hex[:8]}"
    results[name]["create+start"].append(
        timed(cli + ["create", "-b", b, cid], timeout=120) + timed(cli + ["start", cid], timeout=60))
    results[name]["state"].append(timed(cli + ["state", cid], timeout=60))
    results[name]["exec true"].append(timed(cli + ["exec", cid, "true"], timeout=60))
    subprocess.run(cli + ["delete", "--force", cid], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    b = bundle(["sleep", "1000"])
    root = tempfile.mkdtemp(prefix="runv-bench-root-")
    runtimes = {"runv-py": RUNV + ["--root", root]}
    if have_runc():
        runtimes["runc"] = ["runc", "--root", tempfile.mkdtemp(prefix="runc-bench-")]
    measures = ("create+start", "state", "exec true")
    results = {name: {m: [] for m in measures} for name in runtimes}
    for i in range(args.runs):
        for name, cli in runtimes.items():
            cycle(cli, b, results, name)
        print(f"round {i + 1}/{args.runs} done", flush=True)
    print(f"\nmedians of {args.runs} runs (ms)")
    names = list(runtimes)
    print(f"  {'measure':<14}" + "".join(f"{n:>12}" for n in names) + ("   runv-py/runc" if len(names) > 1 else ""))
    for m in measures:
        values = [median(results[n][m]) for n in names]
        ratio = f"   {values[0] / values[1]:10.1f}x" if len(values) > 1 else ""
        print(f"  {m:<14}" + "".join(f"{v * 1000:12.1f}" for v in values) + ratio)
    subprocess.run(["rm", "-rf", root, os.path.dirname(b)])


if __name__ == "__main__":
    main()
