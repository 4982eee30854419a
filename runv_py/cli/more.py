"""The rest of runc's command line: update, events, features, and the checkpoint and
restore that a VM runtime refuses."""
import json
import sys
import time

import click

from . import fail, runtime_errors

MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: str) -> int:
    """runc's sizes: a number of bytes, or with a k, m, g or t suffix (powers of 1024)."""
    import re
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", value.lower())
    if not match:
        from ..hyperstart.errors import InvalidArgument
        raise InvalidArgument(f"invalid size {value!r}")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)])


@click.command()
@click.option("-r", "--resources", "resources_file", default="",
              help="OCI LinuxResources JSON from this file ('-' for stdin).")
@click.option("--memory", default="", help="Memory limit (bytes, or with k/m/g).")
@click.option("--cpu-quota", type=int, default=None, help="CPU CFS quota (microseconds).")
@click.option("--cpu-period", type=int, default=None, help="CPU CFS period (microseconds).")
@click.option("--pids-limit", type=int, default=None, help="Maximum number of processes.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def update(opts, resources_file, memory, cpu_quota, cpu_period, pids_limit, container_id):
    """Update a container's resource limits (in its cgroup in the VM)."""
    from ..hyperstart.errors import InvalidArgument
    from ..shim import lifecycle
    from ..shim import protocol as p
    resources = {}
    if resources_file:
        try:
            text = sys.stdin.read() if resources_file == "-" else open(resources_file).read()
            resources = json.loads(text) if text.strip() else {}
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"cannot read the resources: {e}") from None
    if memory:
        resources.setdefault("memory", {})["limit"] = parse_bytes(memory)
    if cpu_quota is not None:
        resources.setdefault("cpu", {})["quota"] = cpu_quota
    if cpu_period is not None:
        resources.setdefault("cpu", {})["period"] = cpu_period
    if pids_limit is not None:
        resources.setdefault("pids", {})["limit"] = pids_limit
    lifecycle.request(opts.root, container_id, p.Update(resources=resources))


@click.command()
@click.option("--stats", is_flag=True, help="Print the container's stats once and exit.")
@click.option("--interval", default="5s", show_default=True, help="Time between stats.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def events(opts, stats, interval, container_id):
    """Print the container's stats as runc's JSON events (until it stops)."""
    from ..hyperstart import states
    from ..hyperstart.errors import RunvError
    from ..shim import lifecycle
    seconds = float(interval.rstrip("s")) if interval.rstrip("s").replace(".", "").isdigit() else 5.0
    while True:
        data = lifecycle.stats(opts.root, container_id)
        click.echo(json.dumps({"type": "stats", "id": container_id, "data": runc_stats(data)}))
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


@click.command()
def features():
    """Print what this runtime supports, as runc's features JSON."""
    from ..oci import features as f
    click.echo(json.dumps(f.features(), indent=4))


def refuse(name: str):
    @click.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        fail(f"{name} is not supported: a container's state is its VM's")
    command.__doc__ = f"Not supported by a VM runtime ({name})."
    return command


def register(group: click.Group) -> None:
    for command in (update, events, features, refuse("checkpoint"), refuse("restore")):
        group.add_command(command)
