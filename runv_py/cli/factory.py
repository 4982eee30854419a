"""`runv-py factory`: the node's VM factory (runv_py/factory): serve it, see what it
holds (which QEMU serves which container), stop it."""
import json
import sys

import click


@click.group()
def factory():
    """The node's VM factory: templates and ready VMs for every shim."""


@factory.command()
@click.option("--pool", type=int, default=None, help="Ready VMs kept per VM shape.")
@click.pass_obj
def serve(opts, pool):
    """Run the factory in the foreground (shims start it by themselves when needed)."""
    from ..factory.__main__ import main as serve_main
    args = ["--kernel", opts.kernel, "--initrd", opts.initrd, "--driver", opts.driver,
            "--share", opts.share, "--cpus", str(opts.default_cpus),
            "--memory", str(opts.default_memory)]
    sys.exit(serve_main(args + (["--pool", str(pool)] if pool is not None else [])))


def _ask(op: str) -> dict:
    from ..factory.client import request
    try:
        reply, _ = request({"op": op})
    except (OSError, EOFError) as e:
        click.echo(f"runv-py: no VM factory is running ({e})", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        click.echo(f"runv-py: {reply.get('reason')}", err=True)
        sys.exit(1)
    return reply


@factory.command()
@click.option("--json", "as_json", is_flag=True, help="The factory's answer as JSON.")
def status(as_json):
    """Pools, and every VM handed out: its QEMU pid and the container it serves."""
    reply = _ask("status")
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    click.echo(f"factory pid {reply['pid']}")
    for pool in reply["pools"]:
        click.echo(f"pool {pool['shape']}: {len(pool['ready'])}/{pool['size']} ready")
    click.echo(f"{'CONTAINER':<30} {'QEMU PID':>8}  {'VM':<16} ORIGIN")
    for vm in reply["vms"]:
        click.echo(f"{vm['container']:<30} {vm['qemu_pid']:>8}  {vm['name']:<16} {vm['origin']}")


@factory.command()
def stop():
    """Stop the factory and its ready VMs; VMs it handed out go on."""
    _ask("stop")
