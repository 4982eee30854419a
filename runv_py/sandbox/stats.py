"""A container's resource figures, read from its cgroup v2 files in the guest and parsed
once (the 0.2 daemon and the shim v2 turn them into their own protobufs)."""
import dataclasses
from typing import Dict, Optional

FILES = ("memory.current", "memory.max", "memory.stat", "memory.events", "cpu.stat",
         "pids.current", "pids.max")


@dataclasses.dataclass
class ContainerStats:
    cpu: Dict[str, int]               # cpu.stat: usage_usec, user_usec, nr_throttled...
    memory: Dict[str, int]            # memory.stat: anon, file, pgfault...
    memory_events: Dict[str, int]     # memory.events: oom, oom_kill...
    memory_usage: int = 0
    memory_limit: Optional[int] = None   # None: unlimited
    pids: int = 0
    pids_limit: Optional[int] = None

    @classmethod
    def from_files(cls, files: Dict[str, str]) -> "ContainerStats":
        """From the text of the FILES (a missing file reads as empty)."""
        return cls(cpu=table(files.get("cpu.stat", "")), memory=table(files.get("memory.stat", "")),
                   memory_events=table(files.get("memory.events", "")),
                   memory_usage=number(files.get("memory.current", "")) or 0,
                   memory_limit=number(files.get("memory.max", "")),
                   pids=number(files.get("pids.current", "")) or 0,
                   pids_limit=number(files.get("pids.max", "")))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ContainerStats":
        return cls(**data)


def table(text: str) -> Dict[str, int]:
    """A flat-keyed file (cpu.stat, memory.stat, memory.events) as name -> number."""
    pairs = (line.split() for line in (text or "").splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def number(text: str) -> Optional[int]:
    """A single-value file (memory.current, pids.max); "max" (or nothing) reads as None."""
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def read_stats(agent, cid: str) -> ContainerStats:
    """Container ``cid``'s figures, its cgroup files read through ``agent``."""
    import base64
    from ..hyperstart import messages as m
    from ..hyperstart.errors import NotFound
    files = {}
    for name in FILES:
        try:
            data = agent.call(m.ReadFile(container=cid, file=name, cgroup=True)).data
            files[name] = base64.b64decode(data).decode(errors="replace")
        except NotFound:
            files[name] = ""
    return ContainerStats.from_files(files)
