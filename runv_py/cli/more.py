"""The rest of runc's command line: update, events, features, checkpoint and restore
(checkpoint.py). The body of events is hot.py's (see fast.py)."""
import json
import sys

import click

from . import hot, runtime_errors

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
@click.option("--cpu-share", type=int, default=None, help="CPU shares (relative weight).")
@click.option("--cpuset-cpus", default="", help="CPUs to use (0-3, 0,1).")
@click.option("--cpuset-mems", default="", help="Memory nodes to use (0-3, 0,1).")
@click.option("--blkio-weight", type=int, default=None, help="Block IO weight (10 to 1000).")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def update(opts, resources_file, memory, cpu_quota, cpu_period, pids_limit, cpu_share,
           cpuset_cpus, cpuset_mems, blkio_weight, container_id):
    """Update a container's resource limits (in its cgroup in the VM, and on the host
    where runc applies them: its cgroupsPath)."""
    from ..hyperstart.errors import InvalidArgument
    from ..shim import lifecycle
    from ..shim import protocol as p
    resources = {}
    if resources_file:
        try:
            text = sys.stdin.read() if resources_file == "-" else open(resources_file).read()
            resources = json.loads(text) if text.strip() else {}
        except (OSError, ValueError, RecursionError) as e:
            raise InvalidArgument(f"cannot read the resources: {e}") from None
        from ..oci import schema
        schema.check(resources, schema.RESOURCES, resources_file)
    if memory:
        resources.setdefault("memory", {})["limit"] = parse_bytes(memory)
    if cpu_quota is not None:
        resources.setdefault("cpu", {})["quota"] = cpu_quota
    if cpu_period is not None:
        resources.setdefault("cpu", {})["period"] = cpu_period
    if pids_limit is not None:
        resources.setdefault("pids", {})["limit"] = pids_limit
    for key, value in (("shares", cpu_share), ("cpus", cpuset_cpus or None),
                       ("mems", cpuset_mems or None)):
        if value is not None:
            resources.setdefault("cpu", {})[key] = value
    if blkio_weight is not None:
        resources.setdefault("blockIO", {})["weight"] = blkio_weight
    lifecycle.request(opts.root, container_id, p.Update(resources=resources))


@click.command()
@click.option("--stats", is_flag=True, help="Print the container's stats once and exit.")
@click.option("--interval", default="5s", show_default=True, help="Time between stats.")
@click.argument("container_id")
@click.pass_obj
@runtime_errors
def events(opts, stats, interval, container_id):
    """Print the container's stats as runc's JSON events (until it stops)."""
    hot.events(opts, stats, interval, container_id)


@click.command()
def features():
    """Print what this runtime supports, as runc's features JSON."""
    from ..oci import features as f
    click.echo(json.dumps(f.features(), indent=4))


def register(group: click.Group) -> None:
    from .checkpoint import checkpoint, restore
    for command in (update, events, features, checkpoint, restore):
        group.add_command(command)
