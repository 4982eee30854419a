"""Kubernetes' path, measured: a private containerd with the CRI plugin (the tests'
harness), the same pod spec under the ``runc`` handler and the ``runvpy`` handler, side
by side in one run.

- pod to first byte: RunPodSandbox + CreateContainer + StartContainer of a container
  that prints one line, until that line is in the container's CRI log (what
  `kubectl logs` would show first), interleaved runc/runvpy, medians of --runs;
- memory per idle pod: --idle pods with one `sleep` container each, then the PSS of each
  pod's shim and every process under it (runc: containerd-shim-runc-v2, pause, sleep;
  runvpy: the shim v2 daemon, its QEMU and virtiofsd wherever they were made, and the
  node factory's share); the median per pod.

    python3 bench/cri.py [--runs 5] [--idle 3]
"""
import argparse
import os
import sys
import tempfile
import time

from common import median
from runv_py.factory import left_as_found  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from cri.harness import RUNC_HANDLER, RUNVPY_HANDLER, CriContainerd, cri_log_text  # noqa: E402
from cri.config import missing_prerequisites  # noqa: E402
from pss import factory_kb, factory_status, pools_full, shim_of, tree_kb, vm_breakdown  # noqa: E402

HANDLERS = (RUNC_HANDLER, RUNVPY_HANDLER)
LINE = "first byte\n"


def pod_to_first_byte(cri: CriContainerd, handler: str, logs: str, n: int) -> float:
    client = cri.client
    name = f"fb-{handler}-{n}"
    log = os.path.join(logs, name, "c", "0.log")
    start = time.perf_counter()
    pod = client.run_pod(name, log_dir=os.path.join(logs, name), handler=handler)
    cid = client.create_container(pod, "c", cri.BUSYBOX, ["sh", "-c", f"echo {LINE.strip()};"
                                                                      " exec sleep 600"])
    client.start_container(cid)
    deadline = time.monotonic() + 120
    while True:
        try:
            if cri_log_text(log) == LINE:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{handler}: no output in {log}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    client.stop_pod(pod)
    client.remove_pod(pod)
    return elapsed


def idle_pods(cri: CriContainerd, handler: str, logs: str, count: int) -> list:
    client = cri.client
    pods = []
    for n in range(count):
        pod = client.run_pod(f"idle-{handler}-{n}", log_dir=os.path.join(logs, f"idle{n}"),
                             handler=handler)
        client.run_container(pod, "c", cri.BUSYBOX, ["sleep", "600"])
        pods.append(pod)
    time.sleep(3)  # let the guests settle (their agents idle)
    if handler == RUNVPY_HANDLER:  # QEMU may be the node factory's child, not the shim's
        status = factory_status()
        share = factory_kb(status) / 1024 / count
        figures = [sum(vm_breakdown(shim_of(pod), pod, status).values()) / 1024 + share
                   for pod in pods]
    else:
        figures = [tree_kb(shim_of(pod)) / 1024 for pod in pods]
    for pod in pods:
        client.stop_pod(pod)
        client.remove_pod(pod)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=int, default=3)
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    logs = tempfile.mkdtemp(prefix="runv-bench-cri-")
    times = {h: [] for h in HANDLERS}
    with CriContainerd(log_level="info") as cri:
        cri.client.rpc_timeout = 120
        for warm in (-1, -2):  # images unpacked; the factory started, then its pod pool
            for h in HANDLERS:
                pod_to_first_byte(cri, h, logs, warm)
            pools_full(60)
        for n in range(args.runs):
            for h in HANDLERS:
                pools_full(8 if n == 0 else 60)  # the factory's refill must not compete
                times[h].append(pod_to_first_byte(cri, h, logs, n))
            print(f"round {n + 1}/{args.runs}", file=sys.stderr)
        pss = {h: idle_pods(cri, h, logs, args.idle) for h in HANDLERS}
    base_t, base_m = median(times[RUNC_HANDLER]), median(pss[RUNC_HANDLER])
    print(f"\nCRI through one containerd: medians of {args.runs} runs, {args.idle} idle pods"
          " (ratio to runc)")
    print(f"  {'':36} {'pod to first byte':>22} {'PSS per idle pod':>22}")
    for h in HANDLERS:
        t, m = median(times[h]), median(pss[h])
        print(f"  {h:36} {t * 1000:10.0f} ms {t / base_t:7.1f}x {m:10.1f} MiB {m / base_m:6.1f}x")
    return 0


if __name__ == "__main__":
    with left_as_found():  # the runs' clients may start the node's VM factory
        sys.exit(main())
