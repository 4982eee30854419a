"""Where runv-py keeps things on the host, by default (every one can be overridden)."""
import os

LIB_DIR = "/var/lib/runv-py"
KERNEL = os.path.join(LIB_DIR, "kernel")
INITRD = os.path.join(LIB_DIR, "initrd.img")
TEMPLATE_DIR = os.path.join(LIB_DIR, "template")
CACHE_DIR = os.environ.get("RUNV_CACHE", "/var/cache/runv-py")
STATE_ROOT = "/run/runv-py"
CONFIG_FILE = "/etc/runv-py/runv-py.toml"
# How a sandbox's share (rootfs, bind mounts) reaches the guest, unless told otherwise:
# chosen by measurement (README, "File I/O").
DEFAULT_SHARE = "virtiofs"
