"""`runv-py ctr`: a client for the daemon, in the manner of containerd 0.2's ctr."""
import json
import sys

import click

DEFAULT_ADDRESS = "/run/runv-containerd/containerd.sock"


def stub(address: str):
    import grpc
    from . import api_pb2_grpc
    channel = grpc.insecure_channel(f"unix:{address}")
    return api_pb2_grpc.APIStub(channel)


def call(fn, request, timeout: float = 300):
    import grpc
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as e:
        click.echo(f"ctr: {e.code().name}: {e.details()}", err=True)
        sys.exit(1)


@click.group()
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True, help="Daemon socket.")
@click.pass_context
def ctr(ctx, address):
    """Talk to a running `runv-py containerd`."""
    ctx.obj = address


@ctr.group()
def containers():
    """List, start, exec into, signal, inspect and update containers."""


@containers.command("list")
@click.pass_obj
def list_containers(address):
    from . import api_pb2 as pb
    reply = call(stub(address).State, pb.StateRequest())
    click.echo(f"{'ID':<24} {'PATH':<40} {'STATUS':<10} PROCESSES")
    for c in reply.containers:
        click.echo(f"{c.id:<24} {c.bundlePath:<40} {c.status:<10} {len(c.processes)}")


@containers.command()
@click.argument("container_id")
@click.argument("bundle")
@click.option("--stdin", default="")
@click.option("--stdout", default="")
@click.option("--stderr", default="")
@click.option("--label", multiple=True)
@click.option("--create-only", is_flag=True)
@click.pass_obj
def start(address, container_id, bundle, stdin, stdout, stderr, label, create_only):
    from . import api_pb2 as pb
    reply = call(stub(address).CreateContainer, pb.CreateContainerRequest(
        id=container_id, bundlePath=bundle, stdin=stdin, stdout=stdout, stderr=stderr,
        labels=list(label), mode="create" if create_only else ""))
    click.echo(reply.container.status)


@containers.command(context_settings={"ignore_unknown_options": True})
@click.argument("container_id")
@click.option("--pid", "pid_name", required=True, help="Name of the new process.")
@click.option("--cwd", default="/")
@click.option("--env", multiple=True)
@click.option("--stdin", default="")
@click.option("--stdout", default="")
@click.option("--stderr", default="")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_obj
def exec(address, container_id, pid_name, cwd, env, stdin, stdout, stderr, args):
    from . import api_pb2 as pb
    reply = call(stub(address).AddProcess, pb.AddProcessRequest(
        id=container_id, pid=pid_name, args=list(args), cwd=cwd,
        env=list(env) or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        stdin=stdin, stdout=stdout, stderr=stderr))
    click.echo(reply.systemPid)


@containers.command()
@click.argument("container_id")
@click.option("--pid", "pid_name", default="init")
@click.option("-s", "--signal", "sig", default=15, type=int)
@click.pass_obj
def kill(address, container_id, pid_name, sig):
    from . import api_pb2 as pb
    call(stub(address).Signal, pb.SignalRequest(id=container_id, pid=pid_name, signal=sig))


@containers.command()
@click.argument("container_id")
@click.pass_obj
def state(address, container_id):
    from google.protobuf.json_format import MessageToDict
    from . import api_pb2 as pb
    reply = call(stub(address).State, pb.StateRequest(id=container_id))
    click.echo(json.dumps(MessageToDict(reply), indent=2))


@containers.command()
@click.argument("container_id")
@click.option("--memory", default=0, type=int, help="Memory limit in bytes.")
@click.option("--cpu-quota", default=0, type=int)
@click.option("--cpu-period", default=0, type=int)
@click.option("--status", type=click.Choice(["", "paused", "running"]), default="")
@click.pass_obj
def update(address, container_id, memory, cpu_quota, cpu_period, status):
    from . import api_pb2 as pb
    call(stub(address).UpdateContainer, pb.UpdateContainerRequest(
        id=container_id, status=status, resources=pb.UpdateResource(
            memoryLimit=memory, cpuQuota=cpu_quota, cpuPeriod=cpu_period)))


@containers.command()
@click.argument("container_id")
@click.pass_obj
def stats(address, container_id):
    from google.protobuf.json_format import MessageToDict
    from . import api_pb2 as pb
    reply = call(stub(address).Stats, pb.StatsRequest(id=container_id))
    click.echo(json.dumps(MessageToDict(reply), indent=2))


@ctr.command()
@click.option("--since", default=None, type=float, help="Unix time: replay stored events after it.")
@click.option("--stored-only", is_flag=True)
@click.option("--id", "container_id", default="")
@click.pass_obj
def events(address, since, stored_only, container_id):
    from . import api_pb2 as pb
    from .server import timestamp
    request = pb.EventsRequest(storedOnly=stored_only, id=container_id)
    if since is not None:
        request.timestamp.CopyFrom(timestamp(since))
    import grpc
    try:
        for e in stub(address).Events(request):
            t = e.timestamp.ToNanoseconds() / 1e9
            click.echo(json.dumps({"type": e.type, "id": e.id, "pid": e.pid,
                                   "status": e.status, "timestamp": t}), nl=True)
            sys.stdout.flush()
    except grpc.RpcError as e:
        click.echo(f"ctr: {e.code().name}: {e.details()}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
