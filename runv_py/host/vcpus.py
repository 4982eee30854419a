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
    # A jailed QEMU is PID 1 of a pid namespace of its own: it names its threads there.
    host_tid = host_thread_ids(getattr(vm, "pid", 0))
    return [host_tid.get(int(c["thread-id"]), 0) for c in cpus
            if host_tid.get(int(c["thread-id"]))]


def host_thread_ids(pid: int) -> dict:
    """{thread id in the process's own pid namespace: host thread id} for ``pid``'s
    threads (the identity for a process in ours)."""
    out = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task") if pid else []
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        out[int(line.split()[-1])] = int(tid)
                        break
        except OSError:
            continue  # the thread ended
    return out


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
