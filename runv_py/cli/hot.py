"""The commands tools call in loops: state, list, kill, ps and events.

Their click commands (commands.py, more.py) and the fast path (fast.py) both call these
functions, so what they do and print cannot differ. Nothing here imports click, nor json
(whose decoder imports re): hyperstart's encoder prints what json.dumps would."""
from ..hyperstart.protocol import json_dumps, json_dumps_indented
from . import echo


def state(opts, container_id):
    from ..shim import lifecycle
    echo(json_dumps_indented(lifecycle.load(opts.root, container_id).oci_state()))


def list_containers(opts, quiet, fmt):
    from ..hyperstart.errors import NotFound
    from ..shim import records
    states = []
    for cid in records.list_ids(opts.root):
        try:
            states.append(records.read(opts.root, cid).oci_state())
        except NotFound:
            continue
    if quiet:
        for s in states:
            echo(s["id"])
    elif fmt == "json":
        echo(json_dumps(states, compact=False))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"])
                 for s in states]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            echo("   ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def kill(opts, all_processes, container_id, signal):
    from ..oci.bundle import parse_signal
    from ..shim import lifecycle
    lifecycle.kill(opts.root, container_id, parse_signal(signal), all_processes)


def ps(opts, fmt, container_id, ps_args):
    from ..shim import lifecycle
    procs = lifecycle.processes(opts.root, container_id)
    if fmt == "json":
        echo(json_dumps([p["pid"] for p in procs], compact=False))
        return
    echo(f"{'UID':<8} {'PID':>6} {'PPID':>6} {'STAT':<4} {'RSS':>8}  CMD")
    for p in procs:
        echo(f"{p['uid']:<8} {p['pid']:>6} {p['ppid']:>6} {p['state']:<4} "
             f"{p['rssKb']:>8}  {p['cmd']}")


def events(opts, stats, interval, container_id):
    import time

    from ..hyperstart import states
    from ..hyperstart.errors import RunvError
    from ..shim import lifecycle
    seconds = float(interval.rstrip("s")) if interval.rstrip("s").replace(".", "").isdigit() else 5.0
    while True:
        data = lifecycle.stats(opts.root, container_id)
        echo(json_dumps({"type": "stats", "id": container_id, "data": runc_stats(data)},
                        compact=False))
        if stats:
            return
        time.sleep(seconds)
        try:
            if lifecycle.load(opts.root, container_id).status == states.STOPPED:
                return
        except RunvError:
            return


def runc_stats(stats: dict) -> dict:
    """A ContainerStats (as JSON) in the shape of runc's `events --stats` data."""
    cpu, mem = stats["cpu"], stats["memory"]
    return {
        "cpu": {"usage": {"total": cpu.get("usage_usec", 0) * 1000,
                          "kernel": cpu.get("system_usec", 0) * 1000,
                          "user": cpu.get("user_usec", 0) * 1000},
                "throttling": {"periods": cpu.get("nr_periods", 0),
                               "throttledPeriods": cpu.get("nr_throttled", 0),
                               "throttledTime": cpu.get("throttled_usec", 0) * 1000}},
        "memory": {"usage": {"usage": stats["memory_usage"], "limit": stats["memory_limit"] or 0,
                             "failcnt": stats["memory_events"].get("oom_kill", 0)},
                   "raw": mem},
        "pids": {"current": stats["pids"], "limit": stats["pids_limit"] or 0},
    }
