"""`pip install .` as a user does it: a wheel of the checkout, installed (without its
dependencies, which the machine has) into a fresh virtual environment, works from
outside the checkout: every module of it imports, and its `runv-py run` runs a busybox
container in a VM. setup.py finds the packages (drivers/ and hyperstart/ go in as
runv_py.drivers and runv_py.hyperstart); a package it missed would be missing here."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import INITRD, KERNEL, wait_vms_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders of the checkout and the installed packages they become.
FOLDERS = {"runv_py": "runv_py", "drivers": "runv_py.drivers", "hyperstart": "runv_py.hyperstart"}

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def checkout_modules() -> set:
    """Every module the checkout has, by the name it has once installed."""
    found = set()
    for folder, package in FOLDERS.items():
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            for name in files:
                if name == "__init__.py":
                    found.add(prefix)
                elif name.endswith(".py"):
                    found.add(f"{prefix}.{name[:-3]}")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> str:
    """A fresh venv (seeing the system's packages, for the dependencies) holding a
    wheel of the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    # From a copy: setuptools builds in the tree, and a build/ left there by an earlier
    # build would put back into the wheel what the package list no longer finds.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.img", "out"))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True,
                           timeout=300, env=env, cwd=str(tmp))
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = list(wheels.iterdir())
    path = str(tmp / "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path],
                   check=True, timeout=120)
    install = subprocess.run([f"{path}/bin/python", "-m", "pip", "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300,
                             env=env, cwd=str(tmp))
    assert install.returncode == 0, install.stdout + install.stderr
    return path


def in_venv(venv: str, *args, **kw) -> subprocess.CompletedProcess:
    """Run ``args`` from outside the checkout, with the venv's own runv_py."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(args, capture_output=True, text=True, cwd=os.path.dirname(venv),
                          env=env, **kw)


def test_wheel_installs_every_module(venv):
    modules = checkout_modules()
    assert {"runv_py.net", "runv_py.factory.daemon", "runv_py.drivers.qemu",
            "runv_py.hyperstart.agent", "runv_py.shimv2.pb.shimv2_pb2"} <= modules
    script = ("import importlib, json, os, sys, runv_py\n"
              "names = json.loads(sys.argv[1])\n"
              "failed = {}\n"
              "for name in names:\n"
              "    if name.endswith('.__main__'):\n"
              "        continue  # runs its command when imported: only its file is checked\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception as e:\n"
              "        failed[name] = repr(e)\n"
              "print(json.dumps({'root': os.path.dirname(runv_py.__file__), 'failed': failed,\n"
              "    'files': sorted(sys.modules[n].__file__ for n in names if n in sys.modules)}))")
    import json
    r = in_venv(venv, f"{venv}/bin/python", "-c", script, json.dumps(sorted(modules)), timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["root"].startswith(venv + "/lib/"), "runv_py did not come from the wheel"
    assert got["failed"] == {}
    assert all(f.startswith(venv + "/lib/") for f in got["files"])
    site = os.path.dirname(got["root"])
    installed = {os.path.relpath(os.path.join(d, f), site)[:-3].replace(os.sep, ".")
                 .removesuffix(".__init__")
                 for d, _, files in os.walk(got["root"]) for f in files if f.endswith(".py")}
    assert installed == modules
    assert not {"tests", "bench", "drivers", "hyperstart"} & set(os.listdir(site)), \
        "only runv_py is installed at the top"


def test_installed_runv_py_runs_a_container(venv, bundle, tmp_path):
    path = bundle(["sh", "-c", "echo installed-$((6*7))"])
    root = str(tmp_path / "state")
    cid = f"inst-{os.getpid()}"
    try:
        r = in_venv(venv, f"{venv}/bin/runv-py", "--root", root, "--kernel", KERNEL,
                    "--initrd", INITRD, "run", "-b", path, cid, stdin=subprocess.DEVNULL,
                    timeout=240)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "installed-42"
    finally:
        in_venv(venv, f"{venv}/bin/runv-py", "--root", root, "delete", "--force", cid,
                timeout=60)
        assert not wait_vms_gone(cid)
