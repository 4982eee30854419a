"""Daemon benchmark: CreateContainer to the first byte of output through a FIFO, against
`runv-py run` of the same bundle to its first byte of output; medians over --runs.

    python3 bench/daemon.py [--runs 7]
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from common import RUNV, bundle, median

import grpc

from runv_py.containerd02 import api_pb2 as pb
from runv_py.containerd02 import api_pb2_grpc as pb_grpc


def first_output_run(b: str, root: str) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(RUNV + ["--root", root, "run", "-b", b, f"b-{uuid.uuid4().hex[:8]}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.wait(60)
    return elapsed


def first_output_daemon(api, b: str, work: str) -> float:
    cid = f"b-{uuid.uuid4().hex[:8]}"
    fifo = os.path.join(work, cid)
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    start = time.perf_counter()
    api.CreateContainer(pb.CreateContainerRequest(id=cid, bundlePath=b, stdout=fifo), timeout=120)
    os.set_blocking(reader, True)
    os.read(reader, 1)
    elapsed = time.perf_counter() - start
    os.close(reader)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    b = bundle(["sh", "-c", "echo x"])
    work = tempfile.mkdtemp(prefix="runv-bench-daemon-")
    daemon = subprocess.Popen(RUNV + ["containerd", "--state-dir", os.path.join(work, "state"),
                                      "--containerd-dir", os.path.join(work, "d")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"unix:{os.path.join(work, 'd', 'containerd.sock')}")
        grpc.channel_ready_future(channel).result(timeout=30)
        api = pb_grpc.APIStub(channel)
        runs, daemon_runs = [], []
        for i in range(args.runs):
            daemon_runs.append(first_output_daemon(api, b, work))
            runs.append(first_output_run(b, os.path.join(work, "root")))
            print(f"round {i + 1}/{args.runs}: daemon {daemon_runs[-1]:.3f}s run {runs[-1]:.3f}s", flush=True)
        d, r = median(daemon_runs), median(runs)
        print(f"\nmedians of {args.runs} runs, to the first byte of output")
        print(f"  CreateContainer (daemon)   {d * 1000:8.1f} ms")
        print(f"  runv-py run                {r * 1000:8.1f} ms")
        print(f"  daemon / run = {d / r:.2f}x")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.path.dirname(b), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
