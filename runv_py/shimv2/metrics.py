"""A container's figures as containerd's cgroups v2 Metrics (what `ctr task metrics`
and the CRI decode)."""
from ..oci.resources import MAX_UINT64
from ..sandbox import ContainerStats
from .pb import shimv2_pb2 as pb

TYPE_URL = "io.containerd.cgroups.v2.Metrics"


def metrics(stats: ContainerStats) -> "pb.Metrics":
    out = pb.Metrics()
    out.pids.current = stats.pids
    out.pids.limit = MAX_UINT64 if stats.pids_limit is None else stats.pids_limit
    for name in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                 "throttled_usec"):
        setattr(out.cpu, name, stats.cpu.get(name, 0))
    for name in ("anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped",
                 "file_dirty", "file_writeback", "pgfault", "pgmajfault"):
        setattr(out.memory, name, stats.memory.get(name, 0))
    out.memory.usage = stats.memory_usage
    out.memory.usage_limit = MAX_UINT64 if stats.memory_limit is None else stats.memory_limit
    return out
