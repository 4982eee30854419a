"""cgroup v2 files as the runtime meets them: OCI resources turned into file values to
write in the guest, and the text of the files read back (stats, metrics)."""

MAX_UINT64 = (1 << 64) - 1


def limits(resources: dict) -> dict:
    """OCI LinuxResources as cgroup v2 file values; a negative limit is "max"."""
    values = {}
    limit = (resources.get("memory") or {}).get("limit")
    if limit:
        values["memory.max"] = str(limit) if limit > 0 else "max"
    cpu = resources.get("cpu") or {}
    if cpu.get("quota"):
        quota = cpu["quota"]
        values["cpu.max"] = f"{quota if quota > 0 else 'max'} {cpu.get('period') or 100000}"
    pids = (resources.get("pids") or {}).get("limit")
    if pids:
        values["pids.max"] = str(pids) if pids > 0 else "max"
    return values


def table(text: str) -> dict:
    """A flat-keyed file (cpu.stat, memory.stat, memory.events) as name -> number."""
    pairs = (line.split() for line in (text or "").splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def number(text: str, unlimited: int = 0) -> int:
    """A single-value file (memory.current, pids.max); "max" reads as ``unlimited``."""
    text = (text or "").strip()
    return unlimited if text == "max" else int(text) if text.isdigit() else 0
