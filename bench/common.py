"""Helpers shared by the benchmark scripts: timing, medians, busybox bundles, runc."""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runv_py.oci.busybox import make_bundle  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the `runv-py` command that setup.sh writes runs: the -S launcher.
RUNV = [sys.executable, "-S", os.path.join(REPO, "runv_py", "cli", "launch.py")]


def timed(cmd, **kw) -> float:
    """Wall time of one command; raises if it fails."""
    # stderr goes to a file: a detached shim or container keeps it open after we return.
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, **kw)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {err.read().decode()[-500:]}")
    return elapsed


def median(values) -> float:
    return statistics.median(values)


def bundle(args, name="bench") -> str:
    path = os.path.join(tempfile.mkdtemp(prefix=f"runv-{name}-"), "bundle")
    make_bundle(path, args)
    return path


def have_runc() -> bool:
    return shutil.which("runc") is not None


def row(label: str, seconds: float, base: float = 0.0) -> str:
    ratio = f"{seconds / base:6.2f}x" if base else ""
    return f"  {label:<44} {seconds * 1000:9.1f} ms  {ratio}"
