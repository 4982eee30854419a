"""CLI start-up: `runv-py state` and `runv-py list` against runc's, and what they are made of.

Tools poll a runtime with state, list, kill, ps and events, so each call's start-up is
paid over and over. Every variant below runs once per round, round after round
(interleaved, so that a busy machine weighs on all alike), for --runs rounds; the table
gives medians and ratios against runc.

  python3 -c pass, python3 -S -c pass    the interpreter alone, with and without site
                                         (site runs every .pth file in site-packages)
  before: console script                 runv-py as of --before (a commit), run the way
                                         pip's console script runs it
  console script                         the installed `runv-py` (pip's script beside
                                         the interpreter)
  python3 -m runv_py.cli                 as the tests run it
  python3 -S launch.py                   runv_py/cli/launch.py, the -S launcher
  PATH runv-py                           a `runv-py` on PATH that is not the console script
                                         itself (pyenv's shim, a bash script), if any
  runc                                   on a created container (or, if runc cannot
                                         create one here, an unknown id)

runv-py's container is a state directory written here: a record whose shim is gone, so
it reads as stopped; no VM is needed. Every tree's modules are compiled first, so that
PYTHONDONTWRITEBYTECODE does not make one variant compile its modules at every run.

    python3 bench/cli_startup.py [--runs 30] [--before REF] [--json out.json]
"""
import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from common import REPO, RUNV, make_bundle, median

from runv_py.shim.records import Record

BEFORE = "99a2f1e"  # the CLI before its fast path
CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from runv_py.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def compile_tree(path: str) -> None:
    for sub in ("runv_py", "hyperstart", "drivers"):
        if os.path.isdir(os.path.join(path, sub)):
            compileall.compile_dir(os.path.join(path, sub), quiet=2)


def state_root(workdir: str) -> str:
    """A state root with one container, c1, whose shim is gone (it reads as stopped)."""
    root = os.path.join(workdir, "runv-root")
    path = os.path.join(root, "c1")
    os.makedirs(path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    Record(id="c1", status="running", pid=gone.pid, bundle="/nonexistent/bundle",
           rootfs="/nonexistent/bundle/rootfs", created="2024-01-01T00:00:00.000000000Z",
           shim_pid=gone.pid, shim_start="1", path=path).write()
    return root


def before_tree(workdir: str, ref: str):
    """runv_py as of ``ref``, laid out as a wheel installs it, and a console script for
    it; (script, environment), or None without git or the commit."""
    tree = os.path.join(workdir, "before")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "runv_py", "hyperstart",
                              "drivers"], capture_output=True)
    if archive.returncode != 0:
        print(f"  (no 'before': git archive {ref}: {archive.stderr.decode().strip()})")
        return None
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    for sub in ("hyperstart", "drivers"):
        os.rename(os.path.join(tree, sub), os.path.join(tree, "runv_py", sub))
    compile_tree(tree)
    script = os.path.join(workdir, "runv-py-before")
    with open(script, "w") as f:
        f.write(CONSOLE_SCRIPT.format(python=sys.executable))
    os.chmod(script, 0o755)
    return script, dict(os.environ, PYTHONPATH=tree)


def runc_container(workdir: str):
    """(runc root, id, created) of a created runc container, or of an unknown id if runc
    cannot create one here; None without runc."""
    if not shutil.which("runc"):
        return None
    root = os.path.join(workdir, "runc-root")
    bundle = os.path.join(workdir, "bundle")
    cid = f"runv-cli-startup-{os.getpid()}"
    make_bundle(bundle, ["sleep", "1000"])
    # stderr to a file: the container's init keeps what it was given open.
    with tempfile.TemporaryFile() as err:
        try:
            created = subprocess.run(["runc", "--root", root, "create", "-b", bundle, cid],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, timeout=60)
        except subprocess.TimeoutExpired:
            delete_runc_container(root, cid)
            raise
        err.seek(0)
        if created.returncode != 0:
            print(f"  (runc create failed, timing an unknown id: {err.read().decode().strip()})")
            return root, "unknown-id", False
    return root, cid, True


def delete_runc_container(root: str, cid: str) -> None:
    subprocess.run(["runc", "--root", root, "delete", "--force", cid],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def variants(workdir: str, before: str):
    """[(label, [argv prefix], environment)] for runv-py's variants."""
    python, env = sys.executable, dict(os.environ)
    out = []
    made = before_tree(workdir, before) if before else None
    if made:
        out.append((f"before ({before}): console script", [made[0]], made[1]))
    script = os.path.join(sysconfig.get_path("scripts"), "runv-py")
    if os.path.isfile(script):
        out.append(("console script", [script], env))
    out.append(("python3 -m runv_py.cli", [python, "-m", "runv_py.cli"], env))
    out.append(("python3 -S launch.py", RUNV, env))
    # pyenv runs python3 with its version's bin first on PATH: look past it too.
    for directory in dict.fromkeys(os.environ.get("PATH", "").split(os.pathsep)):
        on_path = os.path.join(directory or ".", "runv-py")
        if os.access(on_path, os.X_OK) and os.path.realpath(on_path) != os.path.realpath(script):
            out.append((f"PATH runv-py ({on_path})", [on_path], env))
            break
    return out


def check(label: str, argv: list, env: dict, expect: str, status: int = 0) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    if result.returncode != status or expect not in result.stdout + result.stderr:
        raise RuntimeError(f"{label}: {' '.join(argv)} exited {result.returncode}: "
                           f"{result.stdout[-300:]}{result.stderr[-300:]}")


def timed(argv: list, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--before", default=BEFORE,
                        help="commit of the CLI to compare with ('' for none)")
    parser.add_argument("--json", default="", help="write the medians here")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="runv-cli-startup-")
    runc = None
    try:
        compile_tree(REPO)
        root = state_root(workdir)
        runc = runc_container(workdir)
        env = dict(os.environ)
        # label -> {command: (argv, environment)}
        table = {"python3 -c pass": {c: ([sys.executable, "-c", "pass"], env)
                                     for c in ("state", "list")},
                 "python3 -S -c pass": {c: ([sys.executable, "-S", "-c", "pass"], env)
                                        for c in ("state", "list")}}
        for label, prefix, venv in variants(workdir, args.before):
            table[label] = {"state": (prefix + ["--root", root, "state", "c1"], venv),
                            "list": (prefix + ["--root", root, "list"], venv)}
            check(label, *table[label]["state"], '"status": "stopped"')
            check(label, *table[label]["list"], "c1")
            check(label, prefix + ["--root", root, "state", "nope"], venv, "does not exist", 1)
        if runc:
            runc_root, cid, _ = runc
            table["runc"] = {"state": (["runc", "--root", runc_root, "state", cid], env),
                             "list": (["runc", "--root", runc_root, "list"], env)}

        times = {label: {c: [] for c in cmds} for label, cmds in table.items()}
        for _ in range(args.runs):
            for command in ("state", "list"):
                for label, cmds in table.items():
                    times[label][command].append(timed(*cmds[command]))

        medians = {label: {c: median(v) for c, v in cmds.items()} for label, cmds in times.items()}
        print(f"CLI start-up: medians of {args.runs} interleaved runs (ms), ratio to runc")
        print(f"  {'':<46} {'state':>8} {'':>7} {'list':>8} {'':>7}")
        for label, m in medians.items():
            cells = ""
            for command in ("state", "list"):
                base = medians.get("runc", {}).get(command)
                ratio = f"{m[command] / base:6.1f}x" if base else ""
                cells += f" {m[command] * 1000:8.1f} {ratio:>7}"
            print(f"  {label:<46}{cells}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": args.runs, "medians_s": medians}, f, indent=2)
    finally:
        if runc and runc[2]:
            delete_runc_container(runc[0], runc[1])
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
