"""CRI container log files, as containerd writes them from a container's stdio."""
import datetime
import re
from typing import List, Tuple


# CRI log files ("<RFC 3339 nano time> <stdout|stderr> <F|P> <text>", one per line;
# P marks a line containerd split because it was longer than max_container_log_line_size).

def read_cri_log(path: str) -> List[Tuple[str, str, str, str]]:
    """[(time, stream, tag, text)] for each record of a CRI log file."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().split("\n"):  # not splitlines(): a record may hold a \r
            if not line:
                continue
            when, stream, tag, text = (line.split(" ", 3) + [""])[:4]
            records.append((when, stream, tag, text))
    return records


def cri_log_text(path: str, stream: str = None) -> str:
    """The log's text as the container wrote it (partial records joined, full records
    ended by a newline), from both streams or just ``stream``."""
    out = []
    for _, s, tag, text in read_cri_log(path):
        if stream is None or s == stream:
            out.append(text + ("\n" if tag == "F" else ""))
    return "".join(out)


def parse_cri_time(stamp: str) -> datetime.datetime:
    """containerd's RFC 3339 nano timestamp (Go's time.RFC3339Nano: trailing zeros of
    the fraction dropped; "Z" or an offset), cut to microseconds."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {stamp!r}")
    head, frac, zone = m.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.datetime.fromisoformat(f"{head}.{((frac or '') + '000000')[:6]}{zone}")
