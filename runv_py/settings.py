"""The node's settings file, ``/etc/runv-py/runv-py.toml`` (or the file ``RUNVPY_CONFIG``
names): what entry points without flags of their own (the shim v2, the factory, a
runtime started by podman or docker) are told. One table at the top level:

- the shim v2's VMs: ``kernel``, ``initrd``, ``driver``, ``default_cpus``,
  ``default_memory`` (MiB), ``template``, ``factory_policy``, ``share`` (9p, virtiofs);
- the node's VM factory: ``factory`` (on by default), ``factory_pool``,
  ``factory_pause`` (ready clones wait stopped: less memory, slower starts; off),
  ``factory_warmup`` (ready clones run a pod's kernel paths once: faster starts, more
  memory; on);
- checkpointable containers (their files in guest memory): ``checkpoint`` (off by
  default; the annotation io.github.runv-py.checkpoint decides per container);
- kernel same-page merging of VMs' memory: ``ksm`` (off by default: see host/ksm.py);
- the shim v2's fork server (runv_py/shimv2/zygote.py): ``shim_zygote`` (on by default);
- the VMM jail: ``jail`` (on by default; read by drivers/jail.py, which may import
  nothing of ours, from the same file).

A name not in this list is an error: a typo must not pass as a default.
"""
import os

from . import paths
from .hyperstart.errors import InvalidArgument

KNOWN = ("kernel", "initrd", "driver", "default_cpus", "default_memory", "template",
         "factory_policy", "share", "factory", "factory_pool", "factory_pause",
         "factory_warmup", "jail", "checkpoint", "shim_zygote", "ksm")


def node_file(environ=os.environ) -> tuple:
    """(path, its settings) — {} if there is no such file; InvalidArgument if it cannot
    be read or names an unknown setting."""
    path = environ.get("RUNVPY_CONFIG") or paths.CONFIG_FILE
    if not os.path.isfile(path):
        return path, {}
    import tomllib
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"{path}: {e}") from None
    unknown = set(values) - set(KNOWN)
    if unknown:
        raise InvalidArgument(f"{path}: unknown settings {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(KNOWN)})")
    return path, values


def from_env(env_name: str, otherwise: bool, environ=os.environ) -> bool:
    """An on/off setting's value: the environment's ``env_name`` if set (0, off, false or
    no turn it off), else ``otherwise`` (the settings file's, or the default)."""
    value = environ.get(env_name, "").strip().lower()
    return value not in ("0", "off", "false", "no") if value else bool(otherwise)


def switch(env_name: str, key: str, default: bool, environ=os.environ) -> bool:
    """An on/off setting: the environment's ``env_name`` wins over the settings file's
    ``key``; ``default`` if neither says, or if the file cannot be read (the entry point
    that reads all of it says why)."""
    if environ.get(env_name, "").strip():
        return from_env(env_name, default, environ)
    try:
        return bool(node_file(environ)[1].get(key, default))
    except InvalidArgument:
        return default
