"""OCI ``linux.resources`` as the files of the container's host cgroup.

What the host cgroup holds is the shim, QEMU and virtiofsd: the container's processes run
in the guest, limited there by its own cgroup. So each value lands exactly as the spec
gives it (as runc writes it) wherever the VM lives with that, and with the VM's headroom
where it cannot (the README's "Host cgroups" section, and ``features``):

- memory: the VM's RAM (the limit plus the guest's VM_MEMORY_OVERHEAD_MIB) plus
  HOST_MEMORY_OVERHEAD_MIB for QEMU and the shim; the guest holds the exact limit.
- CPU quota: plus a tenth of a CPU per period (CPU_OVERHEAD_US per 100 ms) for QEMU's
  own threads (main loop, I/O); shares, period, cpus and mems are exact.
- pids: plus PIDS_OVERHEAD for the threads of QEMU (a thread per vCPU and a pool of up
  to 64 for I/O), virtiofsd (its pool) and the shim; the guest holds the exact limit.
- blkio, hugetlb, net_cls and net_prio: exact.
"""
import os
from typing import List, Optional, Tuple

from ..hyperstart.errors import FailedPrecondition, InvalidArgument

HOST_MEMORY_OVERHEAD_MIB = 64
CPU_OVERHEAD_US = 10000          # per 100 ms period: a tenth of a CPU
PIDS_OVERHEAD = 256
HUGEPAGES = "/sys/kernel/mm/hugepages"

# (controller, file, value); file is a name, or a tuple of names of which the first that
# exists is written (blkio's weight files differ between CFQ and BFQ kernels).
Write = Tuple[str, object, str]

RULES = {
    "memory": "the VM's memory (limit + %d MiB for the guest) + %d MiB for QEMU and the "
              "shim; the guest's cgroup holds the exact limit",
    "cpu": "shares, period, cpus and mems exact; quota + %d us per 100 ms for QEMU's own "
           "threads; vCPU threads pinned one to one when cpus has as many CPUs as the VM has "
           "vCPUs, else each to all of cpus",
    "pids": "limit + %d for QEMU's, virtiofsd's and the shim's threads; the guest's cgroup "
            "holds the exact limit",
    "exact": "blockIO, hugepageLimits, network.classID and network.priorities",
}


def rules(vm_memory_overhead_mib: int) -> dict:
    """The rules above with their figures, for ``features``."""
    return {"memory": RULES["memory"] % (vm_memory_overhead_mib, HOST_MEMORY_OVERHEAD_MIB),
            "cpu": RULES["cpu"] % CPU_OVERHEAD_US, "pids": RULES["pids"] % PIDS_OVERHEAD,
            "exact": RULES["exact"]}


def update_subset(resources: dict) -> dict:
    """The fields `runc update` changes (memory aside: the host's memory limit is the
    VM's size, fixed when it boots)."""
    cpu = {k: v for k, v in (resources.get("cpu") or {}).items()
           if k in ("shares", "quota", "period", "cpus", "mems")}
    out = {"cpu": cpu} if cpu else {}
    if (resources.get("blockIO") or {}).get("weight"):
        out["blockIO"] = {"weight": resources["blockIO"]["weight"]}
    if (resources.get("pids") or {}).get("limit"):
        out["pids"] = {"limit": resources["pids"]["limit"]}
    return out


def memory_bytes(resources: dict, vm_memory_mib: int) -> Optional[int]:
    limit = (resources.get("memory") or {}).get("limit")
    return (vm_memory_mib + HOST_MEMORY_OVERHEAD_MIB) << 20 if limit and limit > 0 else None


def cpu_quota(cpu: dict) -> Optional[int]:
    """The host quota for the spec's (None: leave it; -1: no quota)."""
    quota = cpu.get("quota")
    if not quota:
        return None
    if quota < 0:
        return -1
    return int(quota) + CPU_OVERHEAD_US * int(cpu.get("period") or 100000) // 100000


def pids_max(resources: dict) -> Optional[str]:
    limit = (resources.get("pids") or {}).get("limit")
    if not limit:
        return None
    return str(int(limit) + PIDS_OVERHEAD) if limit > 0 else "max"


def v1_writes(resources: dict, vm_memory_mib: Optional[int]) -> List[Write]:
    """The cgroup v1 files for ``resources``, in runc's order (None: no memory limit)."""
    out: List[Write] = []
    memory = memory_bytes(resources, vm_memory_mib) if vm_memory_mib else None
    if memory is not None:
        out.append(("memory", "memory.limit_in_bytes", str(memory)))
    cpu = resources.get("cpu") or {}
    if cpu.get("shares"):
        out.append(("cpu", "cpu.shares", str(int(cpu["shares"]))))
    if cpu.get("period"):
        out.append(("cpu", "cpu.cfs_period_us", str(int(cpu["period"]))))
    quota = cpu_quota(cpu)
    if quota is not None:
        out.append(("cpu", "cpu.cfs_quota_us", str(quota)))
    if cpu.get("cpus"):
        out.append(("cpuset", "cpuset.cpus", str(cpu["cpus"])))
    if cpu.get("mems"):
        out.append(("cpuset", "cpuset.mems", str(cpu["mems"])))
    pids = pids_max(resources)
    if pids is not None:
        out.append(("pids", "pids.max", pids))
    out += _blkio(resources.get("blockIO") or {})
    for limit in resources.get("hugepageLimits") or []:
        size = page_size(limit.get("pageSize", ""))
        value = str(int(limit.get("limit") or 0))
        out.append(("hugetlb", f"hugetlb.{size}.limit_in_bytes", value))
        out.append(("hugetlb", (f"hugetlb.{size}.rsvd.limit_in_bytes", None), value))
    network = resources.get("network") or {}
    if network.get("classID"):
        out.append(("net_cls", "net_cls.classid", str(int(network["classID"]))))
    for prio in network.get("priorities") or []:
        out.append(("net_prio", "net_prio.ifpriomap", f"{prio['name']} {int(prio['priority'])}"))
    return out


def _blkio(blkio: dict) -> List[Write]:
    weight, weight_device = ("blkio.bfq.weight", "blkio.weight"), \
        ("blkio.bfq.weight_device", "blkio.weight_device")
    out: List[Write] = []
    if blkio.get("weight"):
        out.append(("blkio", weight, str(int(blkio["weight"]))))
    if blkio.get("leafWeight"):
        out.append(("blkio", "blkio.leaf_weight", str(int(blkio["leafWeight"]))))
    for dev in blkio.get("weightDevice") or []:
        if dev.get("weight"):
            out.append(("blkio", weight_device, f"{_dev(dev)} {int(dev['weight'])}"))
        if dev.get("leafWeight"):
            out.append(("blkio", "blkio.leaf_weight_device", f"{_dev(dev)} {int(dev['leafWeight'])}"))
    for key, name in (("throttleReadBpsDevice", "read_bps_device"),
                      ("throttleWriteBpsDevice", "write_bps_device"),
                      ("throttleReadIOPSDevice", "read_iops_device"),
                      ("throttleWriteIOPSDevice", "write_iops_device")):
        for dev in blkio.get(key) or []:
            out.append(("blkio", f"blkio.throttle.{name}", f"{_dev(dev)} {int(dev['rate'])}"))
    return out


def _dev(dev: dict) -> str:
    return f"{int(dev['major'])}:{int(dev['minor'])}"


def page_size(text: str) -> str:
    """A hugepageLimits pageSize ("2MB", "1GB", "64KB") as the kernel names it, if this
    kernel has that size (as runc checks)."""
    sizes = set()
    for entry in os.listdir(HUGEPAGES) if os.path.isdir(HUGEPAGES) else []:
        kb = int(entry.removeprefix("hugepages-").removesuffix("kB"))
        unit, scale = next((u, s) for u, s in (("GB", 1 << 20), ("MB", 1 << 10), ("KB", 1))
                           if kb % s == 0)
        sizes.add(f"{kb // scale}{unit}")
    if text not in sizes:
        raise InvalidArgument(f"invalid hugepage size {text!r} (this kernel has "
                              f"{', '.join(sorted(sizes)) or 'none'})")
    return text


def v2_writes(resources: dict, vm_memory_mib: Optional[int]) -> List[Tuple[str, str]]:
    """The same for cgroup v2, with runc's conversions (shares -> weight, blkio -> io)."""
    out = []
    memory = memory_bytes(resources, vm_memory_mib) if vm_memory_mib else None
    if memory is not None:
        out.append(("memory.max", str(memory)))
    cpu = resources.get("cpu") or {}
    if cpu.get("shares"):
        out.append(("cpu.weight", str(1 + ((int(cpu["shares"]) - 2) * 9999) // 262142)))
    quota = cpu_quota(cpu)
    if quota is not None or cpu.get("period"):
        q = "max" if quota is None or quota < 0 else str(quota)
        out.append(("cpu.max", f"{q} {int(cpu.get('period') or 100000)}"))
    for key in ("cpus", "mems"):
        if cpu.get(key):
            out.append((f"cpuset.{key}", str(cpu[key])))
    pids = pids_max(resources)
    if pids is not None:
        out.append(("pids.max", pids))
    blkio = resources.get("blockIO") or {}
    if blkio.get("weight"):
        out.append(("io.weight", str(1 + (int(blkio["weight"]) - 10) * 9999 // 990)))
    for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                      ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):
        for dev in blkio.get(key) or []:
            out.append(("io.max", f"{_dev(dev)} {name}={int(dev['rate'])}"))
    for limit in resources.get("hugepageLimits") or []:
        out.append((f"hugetlb.{page_size(limit.get('pageSize', ''))}.max",
                    str(int(limit.get("limit") or 0))))
    if (resources.get("network") or {}).get("classID") or \
            (resources.get("network") or {}).get("priorities"):
        raise FailedPrecondition("network.classID and network.priorities need cgroup v1's "
                                 "net_cls and net_prio: this host runs cgroup v2")
    return out
