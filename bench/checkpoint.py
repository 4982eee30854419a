"""Checkpoint and restore against a cold start, side by side in one run: an application
that is slow to initialise (a busybox script that sleeps 2 s, then writes /ready and
serves on) started cold, checkpointed, and restored into a new container; for runv-py
also from a warm copy of the checkpoint (`manage warm-checkpoint`: restores are
copy-on-write clones of it). "First response" is the first `exec cat /ready` that
succeeds. runv-py with its defaults (the node factory for the cold start); runc with
CRIU where CRIU can dump here.

    python3 bench/checkpoint.py [--runs 5]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import RUNV, median
from pss import pools_full

from runv_py.factory import left_as_found  # noqa: E402
from runv_py.oci.busybox import make_bundle  # noqa: E402

APP = ["sh", "-c", "rm -f /ready; sleep 2; echo ready > /ready; exec sleep 100000"]
ANNOTATION = "io.github.runv-py.checkpoint"


def run(cmd: list, check: bool = True) -> subprocess.CompletedProcess:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=120)
        out.seek(0)
        err.seek(0)
        r.stdout, r.stderr = out.read(), err.read()
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace')[-400:]}")
    return r


def first_response(runtime: list, cid: str, since: float, timeout: float = 60) -> float:
    while run(runtime + ["exec", cid, "cat", "/ready"], check=False).returncode:
        if time.perf_counter() - since > timeout:
            raise RuntimeError(f"{cid} never answered")
        time.sleep(0.02)
    return time.perf_counter() - since


def criu_errors(image: str) -> str:
    try:
        with open(os.path.join(image, "dump.log"), errors="replace") as f:
            return "; ".join(line.split(": ", 1)[-1].strip() for line in f if "Error" in line)
    except OSError:
        return "(no dump.log)"


def size_of(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def one_round(runtime: list, bundle: str, work: str, n: int, warm: bool) -> dict:
    cid, copy, image = f"ck{n}", f"rs{n}", os.path.join(work, f"image{n}")
    names = [cid, copy]
    try:
        start = time.perf_counter()
        run(runtime + ["run", "-d", "-b", bundle, cid])
        cold = first_response(runtime, cid, start)
        start = time.perf_counter()
        try:
            run(runtime + ["checkpoint", "--image-path", image, cid])
        except RuntimeError as e:  # CRIU says why in its log
            raise RuntimeError(f"{e}\n{criu_errors(image)}") from None
        saved = time.perf_counter() - start
        run(runtime + ["delete", "-f", cid], check=False)
        start = time.perf_counter()
        run(runtime + ["restore", "-d", "--image-path", image, "-b", bundle, copy])
        result = {"cold": cold, "checkpoint": saved, "restore": first_response(runtime, copy, start),
                  "bytes": size_of(image)}
        if warm:  # runv-py's warm copy: made once, then each restore a clone of it
            start = time.perf_counter()
            run(runtime + ["manage", "warm-checkpoint", image])
            result["warming"] = time.perf_counter() - start
            clones = []
            for k in range(3):
                names.append(f"w{n}-{k}")
                start = time.perf_counter()
                run(runtime + ["restore", "-d", "--image-path", image, "-b", bundle, names[-1]])
                clones.append(first_response(runtime, names[-1], start))
            result["warm"] = median(clones)
            run(runtime + ["manage", "cool-checkpoint", image])
        return result
    finally:
        for name in names:
            run(runtime + ["delete", "-f", name], check=False)
        shutil.rmtree(image, ignore_errors=True)


def make_app_bundle(path: str) -> str:
    make_bundle(path, APP)
    with open(os.path.join(path, "config.json")) as f:
        spec = json.load(f)
    spec["annotations"] = {ANNOTATION: "true"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    work = tempfile.mkdtemp(prefix="runv-bench-checkpoint-")
    runtimes = {"runv-py": RUNV + ["--root", os.path.join(work, "runv")]}
    if shutil.which("runc") and shutil.which("criu"):
        runtimes["runc + CRIU"] = ["runc", "--root", os.path.join(work, "runc")]
    bundles = {name: make_app_bundle(os.path.join(work, f"bundle{i}"))   # runc writes into its rootfs
               for i, name in enumerate(runtimes)}
    results = {name: [] for name in runtimes}
    failures = {}
    with left_as_found():
        # The node factory starts with the first container: the rounds take its VMs (a
        # warm copy needs one: a template's clone), once its pools are full.
        run(runtimes["runv-py"] + ["run", "-d", "-b", bundles["runv-py"], "warmup"])
        run(runtimes["runv-py"] + ["delete", "-f", "warmup"])
        for n in range(opts.runs):
            for name, runtime in runtimes.items():
                if name in failures:
                    continue
                if name == "runv-py":
                    pools_full(60)
                try:
                    results[name].append(one_round(runtime, bundles[name], work, n,
                                                   warm=name == "runv-py"))
                except RuntimeError as e:
                    failures[name] = str(e).splitlines()[-1][:300]
    shutil.rmtree(work, ignore_errors=True)
    print(f"medians of {opts.runs} runs; the app sleeps 2 s before it answers\n")
    print(f"  {'runtime':<14} {'cold start':>11} {'checkpoint':>11} {'size':>9} "
          f"{'restore':>9} {'restore/cold':>13}")
    for name, rounds in results.items():
        if not rounds:
            print(f"  {name:<14} not measured: {failures.get(name, 'no run')}")
            continue
        cold, saved, restored = (median(r[k] for r in rounds) for k in ("cold", "checkpoint", "restore"))
        size = median(r["bytes"] for r in rounds) / (1 << 20)
        print(f"  {name:<14} {cold:10.2f}s {saved:10.2f}s {size:7.1f}MiB {restored:8.2f}s "
              f"{restored / cold:12.2f}x")
        if "warm" in rounds[0]:
            warm, warming = (median(r[k] for r in rounds) for k in ("warm", "warming"))
            print(f"  {name + ' warm':<14} {'':>11} {warming:10.2f}s {'(once)':>9} {warm:8.2f}s "
                  f"{warm / cold:12.2f}x   (3 restores from one warm copy)")
        if name in failures:
            print(f"  ({name} failed after {len(rounds)} runs: {failures[name]})")


if __name__ == "__main__":
    main()
