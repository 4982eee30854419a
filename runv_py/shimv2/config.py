"""The shim v2's settings: containerd starts it with no flags of ours, so they come from
a config file and the environment containerd runs with.

The node's settings file (runv_py/settings.py) may set ``kernel``, ``initrd``,
``driver``, ``default_cpus``, ``default_memory`` (MiB), ``template`` (a template
directory: every VM a clone of it), ``factory_policy`` (runV's policy JSON) and
``share`` (9p or virtiofs). ``RUNV_KERNEL``, ``RUNV_INITRD``, ``RUNV_DRIVER``,
``RUNV_TEMPLATE``, ``RUNV_FACTORY_POLICY`` and ``RUNV_SHARE`` in the environment
override the file.
"""
import dataclasses
import os

from .. import paths
from ..hyperstart.errors import InvalidArgument

ENV = {"kernel": "RUNV_KERNEL", "initrd": "RUNV_INITRD", "driver": "RUNV_DRIVER",
       "template": "RUNV_TEMPLATE", "factory_policy": "RUNV_FACTORY_POLICY",
       "share": "RUNV_SHARE"}


@dataclasses.dataclass
class ShimConfig:
    kernel: str = paths.KERNEL
    initrd: str = paths.INITRD
    driver: str = ""
    default_cpus: int = 1
    default_memory: int = 256
    template: str = ""
    factory_policy: str = ""
    share: str = paths.DEFAULT_SHARE

    def boot_config(self) -> dict:
        return {"cpus": self.default_cpus, "memory_mib": self.default_memory,
                "kernel": self.kernel, "initrd": self.initrd, "share": self.share}


def load(environ=os.environ) -> ShimConfig:
    from ..settings import node_file
    path, values = node_file(environ)
    values = {k: v for k, v in values.items()
              if k in {f.name for f in dataclasses.fields(ShimConfig)}}
    for name, var in ENV.items():
        if environ.get(var):
            values[name] = environ[var]
    try:
        return ShimConfig(**values)
    except TypeError as e:
        raise InvalidArgument(f"{path}: {e}") from None
