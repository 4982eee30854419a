"""Build the guest initrd: Debian's python3.11, the agent, busybox, as a newc cpio.

Only the standard-library modules the agent really imports are copied (found by importing
the agent under the guest's own Python), each precompiled to an unchecked-hash .pyc so
the guest never stats or recompiles sources. The image is cached outside the repo, keyed
by the agent's sources, this builder and the Debian package versions it draws from.

usage: python -m runv_py.hyperstart.initrd --output PATH --cache DIR [--force]
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

GUEST_PYTHON = "/usr/bin/python3.11"
BUSYBOX = "/bin/busybox"
PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "busybox-static",
            "libseccomp2"]
# Loaded by the agent with ctypes (dlopen), so ldd of the interpreter does not find it.
DLOPENED = ["libseccomp.so.2"]
HERE = os.path.dirname(os.path.abspath(__file__))
# The agent's modules: everything in hyperstart but the host-only ones.
HOST_ONLY = ("hostagent.py", "initrd.py")
AGENT_FILES = sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in HOST_ONLY)
# Modules the agent may import lazily (in children, on error paths): named so that the
# initrd has them however the agent's start-up imports them.
EXTRA_MODULES = ["resource", "traceback", "warnings", "encodings.utf_8", "encodings.latin_1",
                 "encodings.ascii"]
BUSYBOX_APPLETS = ["sh", "ls", "cat", "mount", "reboot", "poweroff", "ps", "dmesg", "ip"]

INIT = """#!/usr/bin/python3.11 -ISB
import sys
sys.path.insert(0, "/lib/runv")
from hyperstart.guest import guest_main
guest_main()
"""
# A trivial init for the benchmark's raw boot floor: boot, then reboot (QEMU exits).
FLOOR_INIT = "#!/bin/busybox sh\n/bin/busybox reboot -f\n"


def package_versions() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package}=${Version}\n", *PACKAGES],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"initrd: missing Debian packages: {out.stderr.strip()} "
                         f"(apt-get install {' '.join(PACKAGES)})")
    return out.stdout


def input_key() -> str:
    h = hashlib.sha256()
    for name in AGENT_FILES + ["initrd.py"]:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    h.update(package_versions().encode())
    return h.hexdigest()[:16]


def shared_libraries(binary: str) -> list:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def dlopened_libraries() -> list:
    """The paths of the DLOPENED libraries, from the dynamic loader's cache."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    found = []
    for name in DLOPENED:
        paths = [line.split(" => ")[1].strip() for line in out.splitlines()
                 if " => " in line and line.split()[0] == name and "x86-64" in line]
        if not paths:
            raise SystemExit(f"initrd: {name} not found (apt-get install {' '.join(PACKAGES)})")
        found.append(paths[0])
    return found


def module_files(stage_lib: str) -> list:
    """Files of every module the agent imports, as loaded by the guest's Python."""
    probe = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {stage_lib!r})\n"
        "import hyperstart.guest\n"
        f"for m in {EXTRA_MODULES!r}: importlib.import_module(m)\n"
        "for mod in list(sys.modules.values()):\n"
        "    f = getattr(getattr(mod, '__spec__', None), 'origin', None)\n"
        "    if f and f.startswith('/usr/lib/python3'): print(f)\n")
    out = subprocess.run([GUEST_PYTHON, "-ISB", "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"initrd: the agent does not import under {GUEST_PYTHON}:\n{out.stderr}")
    return sorted(set(out.stdout.split()))


def copy_into(stage: str, path: str) -> None:
    dest = stage + path
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy2(os.path.realpath(path), dest)


def build(output: str) -> None:
    stage = tempfile.mkdtemp(prefix="runv-initrd-")
    os.chmod(stage, 0o755)  # the guest's /: mkdtemp's 0700 would keep nobody out (ports.py)
    try:
        for d in ("proc", "sys", "dev", "run", "tmp", "bin", "lib/runv/hyperstart", "etc"):
            os.makedirs(os.path.join(stage, d), exist_ok=True)
        os.chmod(os.path.join(stage, "tmp"), 0o1777)
        # Python reads /dev/urandom at start-up when getrandom() would still block, which
        # is before the agent mounts devtmpfs: ship the few nodes it needs in the image.
        for name, major, minor in (("console", 5, 1), ("null", 1, 3), ("urandom", 1, 9)):
            os.mknod(os.path.join(stage, "dev", name), 0o666 | 0o020000, os.makedev(major, minor))
        for name in AGENT_FILES:
            shutil.copy2(os.path.join(HERE, name), os.path.join(stage, "lib/runv/hyperstart", name))
        files = module_files(os.path.join(stage, "lib/runv"))
        files.append("/usr/lib/python3.11/os.py")  # the landmark that tells Python its prefix
        dlopened = dlopened_libraries()
        binaries = [GUEST_PYTHON] + [f for f in files if f.endswith(".so")] + dlopened
        # The extension modules are in files already; the libraries they and Python need
        # (and the dlopened ones, which nothing links) are added.
        libs = set(dlopened) | {lib for b in binaries for lib in shared_libraries(b)} - set(files)
        for path in [GUEST_PYTHON, *files, *sorted(libs)]:
            copy_into(stage, path)
        os.symlink("lib", os.path.join(stage, "lib64")) if not os.path.exists(
            os.path.join(stage, "lib64")) else None
        shutil.copy2(BUSYBOX, os.path.join(stage, "bin/busybox"))
        for applet in BUSYBOX_APPLETS:
            os.symlink("busybox", os.path.join(stage, "bin", applet))
        for name, text in (("init", INIT), ("floor-init", FLOOR_INIT)):
            with open(os.path.join(stage, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(stage, name), 0o755)
        # Precompile with the guest's own Python so magic numbers match exactly.
        sources = [stage + f for f in files if f.endswith(".py")]
        sources += [os.path.join(stage, "lib/runv/hyperstart", n) for n in AGENT_FILES]
        compile_script = ("import sys, py_compile\n"
                          "for s in sys.argv[1:]:\n"
                          "    py_compile.compile(s, doraise=True, invalidation_mode="
                          "py_compile.PycInvalidationMode.UNCHECKED_HASH)\n")
        subprocess.run([GUEST_PYTHON, "-ISB", "-c", compile_script, *sources], check=True)
        listing = subprocess.run("find . | LC_ALL=C sort", shell=True, cwd=stage,
                                 capture_output=True, check=True).stdout
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output + ".tmp", "wb") as out:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner", "0:0"],
                           cwd=stage, input=listing, stdout=out, check=True)
        os.replace(output + ".tmp", output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def ensure(output: str, cache: str, force: bool = False) -> str:
    """Build the initrd into ``cache`` when its inputs changed; install it at ``output``."""
    cached = os.path.join(cache, f"initrd-{input_key()}.img")
    if force or not os.path.exists(cached):
        print(f"==> building initrd {os.path.basename(cached)}", flush=True)
        build(cached)
    if os.path.realpath(output) != os.path.realpath(cached):
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        shutil.copyfile(cached, output + ".tmp")
        os.replace(output + ".tmp", output)
    size = os.path.getsize(output) / 1e6
    print(f"==> initrd installed at {output} ({size:.1f} MB)", flush=True)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="where to install the initrd")
    parser.add_argument("--cache", required=True, help="where built initrds are kept")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    ensure(args.output, args.cache, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
