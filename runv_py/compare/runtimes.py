"""The runtimes `runv-py compare` measures, each driven through its own command line:
runv-py with the VM driver (cold, with the rootfs over 9p and over virtio-fs; cloning a
template), with the namespace driver, and runc."""
import os
import shutil
import subprocess
import sys

from .. import paths
from ..drivers import virtiofs


class CompareError(Exception):
    """A runtime could not do what a measurement needed."""


# ---- runtimes ---------------------------------------------------------------------------

# Environment that would change what a row measures (a template for the cold VM row...).
RUNV_ENVIRONMENT = ("RUNV_TEMPLATE", "RUNV_FACTORY_POLICY", "RUNV_DRIVER", "RUNV_ROOT")


class Runtime:
    """How to run, create, exec in and delete a container with one runtime."""

    def __init__(self, name: str, base: list, kind: str):
        self.name = name
        self.base = base          # the command line up to the subcommand
        self.kind = kind          # "runv" or "runc"
        self.env = {k: v for k, v in os.environ.items() if k not in RUNV_ENVIRONMENT}

    def cmd(self, *args) -> list:
        return self.base + list(args)

    def run(self, bundle: str, cid: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd("run", "-b", bundle, cid), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env=self.env)

    def start_detached(self, bundle: str, cid: str, timeout: float) -> None:
        steps = [("run", "-d", "-b", bundle, cid)] if self.kind == "runc" else \
                [("create", "-b", bundle, cid), ("start", cid)]
        for step in steps:
            # The container keeps the stdio it is given: never a pipe we would wait on.
            r = subprocess.run(self.cmd(*step), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=timeout, env=self.env)
            if r.returncode != 0:
                raise CompareError(f"{self.name}: {' '.join(step[:1])} failed ({r.returncode})")

    def exec(self, cid: str, args: list, timeout: float) -> int:
        return subprocess.run(self.cmd("exec", cid, *args), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env=self.env).returncode

    def delete(self, cid: str) -> None:
        force = "-f" if self.kind == "runc" else "--force"
        subprocess.run(self.cmd("delete", force, cid), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60, env=self.env)


def runtimes(opts, state: str, template_dir: str = "") -> tuple:
    """(runtimes to measure, {name: why it is skipped})."""
    template_dir = template_dir or paths.TEMPLATE_DIR
    runv = [sys.executable, "-m", "runv_py.cli", "--kernel", opts.kernel, "--initrd", opts.initrd]
    found, skipped = [], {}
    vm_driver = opts.driver if opts.driver and opts.driver != "namespace" else ""
    vm = runv + (["--driver", vm_driver] if vm_driver else [])
    # The VM driver with each way of sharing the rootfs (the README's file I/O figures).
    for share in ("9p", "virtiofs"):
        name = f"runv-py vm ({share})"
        if share == "virtiofs" and not virtiofs.available():
            skipped[name] = f"{virtiofs.VIRTIOFSD} is not installed (qemu-system-common)"
            continue
        found.append(Runtime(name, vm + ["--root", os.path.join(state, share), "--share", share],
                             "runv"))
    if not os.path.isdir(template_dir):
        skipped["runv-py vm (template)"] = f"no template at {template_dir}"
    else:
        found.append(Runtime("runv-py vm (template)",
                             runv + ["--root", os.path.join(state, "tpl"), "--template",
                                    template_dir], "runv"))
    found.append(Runtime("runv-py namespace", runv + ["--root", os.path.join(state, "ns"),
                                                      "--driver", "namespace"], "runv"))
    runc = shutil.which("runc")
    if runc:
        found.append(Runtime("runc", [runc, "--root", os.path.join(state, "runc")], "runc"))
    else:
        skipped["runc"] = "runc is not installed"
    return found, skipped
