"""`runv-py manage`: VM templates; and the global --factory-policy and --template flags.

Only click is imported at start-up (the CLI's start-up test checks it). Templates are
made here, by the CLI itself: a template is a VM of no container, so no shim owns it.
"""
import json
import os
import sys

import click

from .. import paths

META_POLICY = "runv_py.factory_policy"
META_TEMPLATE = "runv_py.template"
DEFAULT_TEMPLATE_DIR = paths.TEMPLATE_DIR


def _store(ctx, param, value):
    ctx.meta[META_POLICY if param.name == "factory_policy" else META_TEMPLATE] = value
    return value


def factory_options(fn):
    """The global flags that choose how VMs are made, for `main`. Kept in ctx.meta so
    that `main`'s signature does not change."""
    fn = click.option("--template", default="", envvar="RUNV_TEMPLATE", expose_value=False,
                      callback=_store, metavar="DIR",
                      help=f"Start every VM as a clone of the VM template in DIR "
                           f"(made by `manage create-template`; default dir {DEFAULT_TEMPLATE_DIR}).")(fn)
    fn = click.option("--factory-policy", default="", envvar="RUNV_FACTORY_POLICY",
                      expose_value=False, callback=_store, metavar="JSON",
                      help='runV factory policy: [{"cache": N, "template": bool, "cpu": N, '
                           '"memory": MiB}].')(fn)
    return fn


def factory_settings() -> dict:
    """{factory_policy, template_dir} from the global flags, for the shim."""
    meta = click.get_current_context().meta
    return {"factory_policy": meta.get(META_POLICY) or None,
            "template_dir": meta.get(META_TEMPLATE) or ""}


def _template_dir() -> str:
    return click.get_current_context().meta.get(META_TEMPLATE) or DEFAULT_TEMPLATE_DIR


@click.group()
def manage():
    """Manage VM templates."""


@manage.command("create-template")
@click.option("--cpu", default=0, type=click.IntRange(0, 16), help="vCPUs (default: --default-cpus).")
@click.option("--mem", default=0, type=click.IntRange(0, 65536),
              help="Memory in MiB (default: --default-memory).")
@click.pass_obj
def create_template(opts, cpu, mem):
    """Boot a VM and save it as the template (in --template DIR or the default dir)."""
    from ..drivers import probe
    from ..hyperstart.errors import RunvError
    from ..vm import template
    from ..vm.boot import BootConfig
    try:
        config = BootConfig(**opts.boot_config(cpu or None, mem or None))
        meta = template.create(probe(opts.driver), config, _template_dir())
    except RunvError as e:
        click.echo(f"runv-py: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(dict(meta, dir=os.path.abspath(_template_dir())), indent=2))


@manage.command("remove-template")
def remove_template():
    """Remove the template; VMs already cloned from it keep running."""
    from ..vm import template
    if not template.remove(_template_dir()):
        click.echo(f"runv-py: no template in {_template_dir()}", err=True)
        sys.exit(1)


@manage.command("warm-checkpoint")
@click.argument("image_path")
@click.pass_obj
def warm_checkpoint(opts, image_path):
    """Keep a checkpoint's RAM in a shared memory file: restores from IMAGE_PATH become
    copy-on-write clones of it (vm/warm.py)."""
    from ..drivers import probe
    from ..hyperstart.errors import RunvError
    from ..vm import warm
    from ..vm.boot import BootConfig
    try:
        meta = warm.make(probe(opts.driver), image_path, BootConfig(**opts.boot_config()))
    except RunvError as e:
        click.echo(f"runv-py: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(dict(meta, dir=warm.warm_dir(image_path)), indent=2))


@manage.command("cool-checkpoint")
@click.argument("image_path")
def cool_checkpoint(image_path):
    """Remove a checkpoint's warm copy; containers restored from it keep running."""
    from ..vm import warm
    if not warm.remove(image_path):
        click.echo(f"runv-py: {image_path} has no warm copy", err=True)
        sys.exit(1)
