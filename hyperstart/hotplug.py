"""Growing the guest: CPUs the kernel left offline at boot (maxcpus=) brought online,
and memory it was told to ignore (mem=) added through the probe interface and onlined.
The VM has both from the start; the host asks for them as a pod's containers come."""
import os

from .cgroups import write_file
from .errors import FailedPrecondition

CPU = "/sys/devices/system/cpu"
MEMORY = "/sys/devices/system/memory"


def online_cpus(target: int) -> int:
    """Online CPUs until ``target`` are; returns how many are."""
    cpus = sorted((int(name[3:]) for name in os.listdir(CPU)
                   if name.startswith("cpu") and name[3:].isdigit()))
    online = [c for c in cpus if _cpu_online(c)]
    for cpu in cpus:
        if len(online) >= target:
            break
        if cpu not in online:
            write_file(os.path.join(CPU, f"cpu{cpu}", "online"), "1")
            online.append(cpu)
    if len(online) < target:
        raise FailedPrecondition(f"the VM has {len(cpus)} CPUs, not {target}")
    return len(online)


def _cpu_online(cpu: int) -> bool:
    path = os.path.join(CPU, f"cpu{cpu}", "online")
    if not os.path.exists(path):
        return True  # the boot CPU cannot go offline: it has no switch
    with open(path) as f:
        return f.read().strip() == "1"


def online_memory(target_mib: int) -> int:
    """Add and online memory blocks until ``target_mib`` are online; returns the MiB."""
    with open(os.path.join(MEMORY, "block_size_bytes")) as f:
        block = int(f.read().strip(), 16)
    blocks = sorted(int(name[6:]) for name in os.listdir(MEMORY)
                    if name.startswith("memory") and name[6:].isdigit())
    online = sum(1 for b in blocks if _state(b) == "online")
    index = blocks[-1] + 1 if blocks else 0
    while online * block < target_mib << 20:
        try:
            write_file(os.path.join(MEMORY, "probe"), hex(index * block))
            write_file(os.path.join(MEMORY, f"memory{index}", "state"), "online")
        except OSError as e:
            raise FailedPrecondition(f"cannot add memory block {index}: {e.strerror} "
                                     f"(the VM has {online * block >> 20} MiB)") from None
        online += 1
        index += 1
    return online * block >> 20


def _state(index: int) -> str:
    try:
        with open(os.path.join(MEMORY, f"memory{index}", "state")) as f:
            return f.read().strip()
    except OSError:
        return ""
