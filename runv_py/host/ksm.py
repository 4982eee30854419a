"""Kernel same-page merging for VMs, as an option (``ksm = true`` in the node's settings,
or ``RUNV_KSM=on``): off by default.

QEMU marks guest RAM mergeable by itself; this marks all of a VM-launching process's
anonymous memory (PR_SET_MEMORY_MERGE, Linux 6.4+), which its children keep across
exec: QEMU's heap and the pages a template's clone copied on write, which are often
equal across clones. Measured in the README ("Memory per pod"). The kernel's ksmd does
the merging only when /sys/kernel/mm/ksm/run is 1, a node-wide choice left to the
operator.

Why it is not the default: merged pages are a known cross-VM side channel (a write to
a merged page takes longer, so a guest can learn whether another VM holds a page it
guesses), the reason Kata Containers leaves it off as well.
"""
import ctypes
import logging
import os

log = logging.getLogger("runv_py.host")

PR_SET_MEMORY_MERGE = 67
RUN_FILE = "/sys/kernel/mm/ksm/run"


def wanted() -> bool:
    from ..settings import switch
    return switch("RUNV_KSM", "ksm", False)


def apply() -> bool:
    """Mark this process's memory, and its future children's, mergeable if the node
    asks for it; True if it is marked. One log line says why not, or that ksmd is off."""
    if not wanted():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        log.warning("KSM asked for, but this kernel refuses PR_SET_MEMORY_MERGE: %s",
                    os.strerror(ctypes.get_errno()))
        return False
    try:
        with open(RUN_FILE) as f:
            running = f.read().strip() == "1"
    except OSError:
        running = False
    if not running:
        log.warning("KSM asked for, but ksmd does not run: echo 1 > %s", RUN_FILE)
    return True
