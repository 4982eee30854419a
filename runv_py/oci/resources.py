"""OCI ``linux.resources``: the one conversion into cgroup v2 values for the guest, and
the size of the VM that has to hold them."""
import math

MAX_UINT64 = (1 << 64) - 1
# What the guest kernel and agent need besides the container's own memory limit.
VM_MEMORY_OVERHEAD_MIB = 96
MAX_CPUS = 16


def cgroup_limits(resources: dict) -> dict:
    """OCI LinuxResources as cgroup v2 file values; a negative limit is "max", an absent
    or zero one is left alone."""
    values = {}
    limit = (resources.get("memory") or {}).get("limit")
    if limit:
        values["memory.max"] = str(limit) if limit > 0 else "max"
    cpu = resources.get("cpu") or {}
    if cpu.get("quota") or cpu.get("period"):
        # As runc writes it: without a period the kernel keeps the one the cgroup has.
        quota = cpu.get("quota") or 0
        values["cpu.max"] = f"{quota if quota > 0 else 'max'}" + \
            (f" {cpu['period']}" if cpu.get("period") else "")
    pids = (resources.get("pids") or {}).get("limit")
    if pids:
        values["pids.max"] = str(pids) if pids > 0 else "max"
    return values


def asked(resources: dict) -> tuple:
    """(cpus, MiB) a container's limits ask of its VM (0 where it sets no limit)."""
    memory = (resources.get("memory") or {}).get("limit") or 0
    cpu = resources.get("cpu") or {}
    quota = cpu.get("quota") or 0
    cpus = math.ceil(quota / (cpu.get("period") or 100000)) if quota > 0 else 0
    return cpus, math.ceil(memory / (1 << 20)) if memory > 0 else 0


def vm_size(resources: dict, cpus: int, memory_mib: int) -> tuple:
    """(cpus, memory MiB) of a VM for these resources: the memory limit plus a fixed
    overhead, and as many vCPUs as the cpu quota asks for; the defaults otherwise."""
    want_cpus, want_mib = asked(resources)
    if want_mib:
        memory_mib = max(64, want_mib + VM_MEMORY_OVERHEAD_MIB)
    if want_cpus:
        cpus = max(1, min(MAX_CPUS, want_cpus))
    return cpus, memory_mib
