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
# chosen by measurement (README, "Sharing files"). 9p: the node factory's VMs are then
# template clones, which share the guest's untouched memory (82 against 187 MiB per
# idle CRI pod); virtio-fs VMs cannot be cloned in QEMU 7.2, but are faster on metadata.
DEFAULT_SHARE = "9p"
