"""A small OCI bundle built from Debian's busybox-static, for tests, the demo and the
benchmarks: a rootfs with busybox and its applets, and runc's default config.json."""
import json
import os
import shutil
import subprocess

from .spec import default_spec

BUSYBOX = "/bin/busybox"


def make_bundle(path: str, args=None, terminal: bool = False, readonly: bool = False) -> str:
    """Create (or refresh) a busybox bundle at ``path``; returns ``path``."""
    if not os.path.exists(BUSYBOX):
        raise FileNotFoundError(f"{BUSYBOX} not found: apt-get install busybox-static")
    rootfs = os.path.join(path, "rootfs")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
              "root", "var", "run", "home"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin/busybox"))
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = os.path.join(rootfs, applet)
        if not os.path.lexists(link) and applet != "bin/busybox":
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
        "etc/hostname": "busybox\n",
    }
    for name, text in files.items():
        with open(os.path.join(rootfs, name), "w") as f:
            f.write(text)
    spec = default_spec(args or ["sh"], terminal=terminal)
    spec["root"]["readonly"] = readonly
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f, indent=2)
    return path
