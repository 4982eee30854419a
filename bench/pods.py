"""A podman pod of two containers, runc against runv-py side by side in one run.

Each round, for each runtime (interleaved): `podman pod create`, then a member serving
HTTP on the pod's loopback (`httpd`), then a second member that fetches from it over
localhost; the time is from `pod create` until the second member has printed the page
(start to first byte). Private podman storage per run; medians of --runs.

    python3 bench/pods.py [--runs 5]
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from common import median
from runv_py.factory import left_as_found  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import images  # noqa: E402

IMAGE = "localhost/runvpy/busybox:bench"
NOFILE = 1024
SERVER = "echo pod-page > /tmp/i; exec httpd -f -p 8080 -h /tmp"
CLIENT = ("for i in $(seq 100); do wget -qO- http://localhost:8080/i 2>/dev/null && exit 0;"
          " sleep 0.05; done; exit 1")


def podman(base: str, runtime: str):
    cmd = ["podman", "--root", f"{base}/root", "--runroot", f"{base}/run", "--storage-driver",
           "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir",
           f"{base}/tmp", "--runtime", runtime]

    conf = f"{base}/containers.conf"
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    with open(conf, "w") as f:  # podman's defaults are over this machine's limits (runc fails)
        f.write(f'[containers]\ndefault_ulimits = ["nofile={NOFILE}:{NOFILE}", '
                f'"nproc={nproc}:{nproc}"]\n')
    env = dict(os.environ, CONTAINERS_CONF=conf)

    def run(*args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                           env=env)
        if check and r.returncode != 0:
            raise SystemExit(f"podman {' '.join(args)}: {r.stderr.strip()}")
        return r
    return run


def one_pod(run, name: str) -> float:
    start = time.monotonic()
    run("pod", "create", "--name", name)
    run("run", "-d", "--pod", name, IMAGE, "sh", "-c", SERVER)
    out = run("run", "--rm", "--pod", name, IMAGE, "sh", "-c", CLIENT).stdout
    took = time.monotonic() - start
    if "pod-page" not in out:
        raise SystemExit(f"no page from the pod: {out!r}")
    run("pod", "rm", "-f", "-t", "0", name)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runtimes = {"runc": shutil.which("runc"), "runv-py": shutil.which("runv-py")}
    if not all(runtimes.values()):
        raise SystemExit(f"missing: {[k for k, v in runtimes.items() if not v]}")
    base = tempfile.mkdtemp(prefix="bench-pods-")
    try:
        runs = {name: podman(base, path) for name, path in runtimes.items()}
        archive = images.docker_archive(f"{base}/busybox.tar", base, IMAGE)
        runs["runc"]("load", "-i", archive)
        times = {name: [] for name in runs}
        failed = {}
        for i in range(args.runs + 1):  # the first round warms caches and the factory
            for name, run in runs.items():
                if name in failed:
                    continue
                try:
                    took = one_pod(run, f"bench-{name.replace('-', '')}-{i}")
                except SystemExit as e:  # said, and the other runtime still measured
                    lines = str(e).strip().splitlines()
                    failed[name] = next((x for x in lines if "OCI" in x), lines[-1])[-160:]
                    run("pod", "rm", "-af", "-t", "0", check=False)
                    continue
                if i:
                    times[name].append(took)
        reference = median(times["runc"]) if times["runc"] else 0.0
        print(f"podman pod of two containers, start to first byte (medians of {args.runs})")
        print("| runtime | median | ratio to runc |\n|---|---|---|")
        for name, values in times.items():
            if name in failed:
                print(f"| {name} | failed: {failed[name]} | |")
            else:
                ratio = f"{median(values) / reference:.1f}x" if reference else "-"
                print(f"| {name} | {median(values):.2f} s | {ratio} |")
    finally:
        subprocess.run(["podman", "--root", f"{base}/root", "--runroot", f"{base}/run",
                        "--storage-driver", "vfs", "pod", "rm", "-af", "-t", "0"],
                       capture_output=True, timeout=300)
        subprocess.run(["rm", "-rf", base], timeout=120)
    return 0


if __name__ == "__main__":
    with left_as_found():  # the runs' clients may start the node's VM factory
        sys.exit(main())
