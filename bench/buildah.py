"""A two-step `buildah bud` (FROM the busybox image, two RUN steps) with runc and with
runv-py as its runtime, side by side, interleaved round by round: with `--network none`
(runv-py from the node factory, its default, and with the factory off: every RUN step's
VM boots cold) and on buildah's default network (CNI: a bridge and subnet of the
benchmark's own, no masquerade, given with --cni-config-dir). Private storage (vfs); the
base image is made here (no registry).

    python3 bench/buildah.py [--runs 5]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from common import REPO, median, row, timed
from runv_py.factory import left_as_found  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests"))
import images  # noqa: E402

BASE = "localhost/runvpy/busybox:bench"
CONTAINERFILE = f"""FROM {BASE}
RUN echo first > /step1
RUN cat /step1 > /step2 && echo second >> /step2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    if not shutil.which("buildah"):
        sys.exit("buildah is not installed (apt-get install buildah)")
    work = tempfile.mkdtemp(prefix="runv-bench-buildah-")
    # The command setup.sh installs: this checkout's -S launcher.
    runv = os.path.join(work, "runv-py")
    with open(runv, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} -S {REPO}/runv_py/cli/launch.py "$@"\n')
    os.chmod(runv, 0o755)
    buildah = ["buildah", "--root", f"{work}/root", "--runroot", f"{work}/run",
               "--storage-driver", "vfs"]
    context = os.path.join(work, "context")
    os.mkdir(context)
    with open(os.path.join(context, "Containerfile"), "w") as f:
        f.write(CONTAINERFILE)
    cni = os.path.join(work, "cni")
    os.mkdir(cni)
    bridge = f"rvbench{os.getpid() % 100000}"
    with open(os.path.join(cni, "bench.conflist"), "w") as f:
        json.dump({"cniVersion": "0.4.0", "name": "podman", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": f"{work}/ipam",
                     "ranges": [[{"subnet": "10.96.0.0/24", "gateway": "10.96.0.1"}]]}}]}, f)
    none, cni_net = ["--network", "none"], ["--cni-config-dir", cni]
    modes = [("runc", shutil.which("runc"), {}, none),
             ("runv-py (node factory)", runv, {}, none),
             ("runv-py (factory off: cold boots)", runv, {"RUNV_FACTORY": "off"}, none),
             ("runc, default network (CNI)", shutil.which("runc"), {}, cni_net),
             ("runv-py (node factory), default network (CNI)", runv, {}, cni_net)]
    times = {label: [] for label, *_ in modes}
    try:
        subprocess.run(buildah + ["pull", "-q", "oci-archive:" + images.oci_archive(
            f"{work}/busybox.tar", work, BASE)], check=True, capture_output=True, timeout=120)
        # One untimed build each first: the factory's pool and the page cache warm up.
        for round_ in range(opts.runs + 1):
            for label, runtime, extra, network in modes:
                cmd = buildah + ["bud", "--runtime", runtime, *network, "-t", "bench-built",
                                 context]
                seconds = timed(cmd, env=dict(os.environ, **extra), timeout=600)
                if round_:
                    times[label].append(seconds)
                subprocess.run(buildah + ["rmi", "-f", "bench-built"], capture_output=True,
                               timeout=120)
        print(f"buildah bud, two RUN steps: median of {opts.runs} runs (ratio to runc's)")
        for label, _, _, network in modes:
            base = median(times["runc" if network is none else "runc, default network (CNI)"])
            print(row(label, median(times[label]), base))
    finally:
        subprocess.run(buildah + ["rmi", "-a", "-f"], capture_output=True, timeout=120)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
        subprocess.run(["rm", "-rf", work], timeout=120)


if __name__ == "__main__":
    with left_as_found():  # the runs' clients may start the node's VM factory
        main()
