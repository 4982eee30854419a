"""QEMU's vCPU threads pinned to the CPUs of the container's cpuset (``cpu.cpus``).

The cgroup's cpuset already keeps every QEMU thread on those CPUs. As Kata does, a VM
with as many vCPUs as the set has CPUs gets each vCPU on a CPU of its own (vCPU i on
the i-th CPU of the set); otherwise each vCPU thread may run on all of them. QMP's
``query-cpus-fast`` names each vCPU's host thread.
"""
import logging
import os
from typing import List

log = logging.getLogger("runv_py.host.vcpus")


def parse_cpus(text: str) -> List[int]:
    """A cpuset list ("0-2,4") as sorted CPU numbers."""
    cpus = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return sorted(cpus)


def vcpu_threads(vm) -> List[int]:
    """The host thread ids of ``vm``'s vCPUs, by vCPU index ([] for a VM with no QMP:
    the namespace driver's)."""
    query = getattr(vm, "qmp_command", None)
    if query is None:
        return []
    cpus = sorted(query("query-cpus-fast"), key=lambda c: c["cpu-index"])
    return [int(c["thread-id"]) for c in cpus]


def pin_vcpus(vm, cpus: str) -> List[int]:
    """Pin ``vm``'s vCPU threads to ``cpus`` (a cpuset list); returns the thread ids."""
    wanted = parse_cpus(cpus)
    threads = vcpu_threads(vm)
    if not wanted or not threads:
        return threads
    one_each = len(threads) == len(wanted)
    for i, tid in enumerate(threads):
        try:
            os.sched_setaffinity(tid, {wanted[i]} if one_each else set(wanted))
        except ProcessLookupError:
            pass          # the VM is going
    log.info("vCPU threads %s pinned to %s%s", threads, cpus, " one each" if one_each else "")
    return threads
