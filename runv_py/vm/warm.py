"""Warm starts from a checkpoint: its guest RAM once in a shared memory file, and every
restore a copy-on-write clone of it, as a template's clones are (template.py).

``runv-py manage warm-checkpoint DIR`` makes the warm copy: a VM loads the checkpoint's
whole state into a memory file under /dev/shm/runv-py (0600, in a directory only root
lists), stays stopped, and its device state is saved again without the RAM
(x-ignore-shared) into DIR/warm/, a template directory. A restore from DIR then maps
that file privately: the pages no clone has written are one copy in the page cache for
all of them, and a restore loads tens of KB instead of the whole RAM. Each clone gets
fresh entropy and its own VM hostname (template.clone), its container the hostname of
its new spec, and the network of the namespace it is restored into.

``manage cool-checkpoint DIR`` removes the warm copy (running clones keep their
mappings). A checkpoint carried elsewhere without its memory file, or made again in the
same directory, is restored the whole way: the warm copy names the digest of the
metadata it was made from.
"""
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time

from ..hyperstart.errors import FailedPrecondition
from ..oci.checkpoint_dir import META_FILE, STATE_FILE, read, write_json
from . import template

WARM_DIR = "warm"


def warm_dir(image_dir: str) -> str:
    return os.path.join(os.path.abspath(image_dir), WARM_DIR)


def _meta_digest(image_dir: str) -> str:
    with open(os.path.join(image_dir, META_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def usable(image_dir: str) -> dict:
    """The warm copy's template metadata if the checkpoint has a usable one, else {}."""
    wdir = warm_dir(image_dir)
    if not template.exists(wdir):
        return {}
    try:
        wmeta = template.load(wdir)
        return wmeta if wmeta.get("checkpoint") == _meta_digest(image_dir) else {}
    except (template.TemplateError, OSError):
        return {}


def make(driver, image_dir: str, config) -> dict:
    """Make the checkpoint's warm copy (``config``: this runtime's BootConfig, whose
    kernel and initrd must be the checkpoint's); returns its template metadata."""
    from ..factory.vms import HoldingNic
    from .launcher import safe
    meta = read(image_dir, config)
    if not meta["devices"]["memory_file"]:
        raise FailedPrecondition("a warm copy needs a checkpoint of a VM from the node factory "
                                 "(its RAM a template's file); this one was booted cold")
    nics = meta["devices"]["nics"]
    if nics > 1:
        raise FailedPrecondition(f"a warm copy serves VMs of one NIC at most, not {nics}")
    config = dataclasses.replace(config, share="9p", **meta["config"])
    wdir = warm_dir(image_dir)
    with template._DirLock(wdir):
        if template.exists(wdir):
            raise template.TemplateError(f"{image_dir} has a warm copy already")
        os.makedirs(wdir, exist_ok=True)
        memory_file = template.memory_file_for(wdir)
        workdir = tempfile.mkdtemp(prefix="runv-py-warm-")
        vm = None
        try:
            share = os.path.join(workdir, "share")  # never mounted (the guest released it)
            os.mkdir(share)
            template._private_memory_file(memory_file)
            vm = safe(driver).launch(config, os.path.join(workdir, "vm"), "warm", share,
                                     memory_file=memory_file, shared_memory=True,
                                     incoming=True,
                                     network=HoldingNic(f"warm-{os.getpid()}") if nics else None)
            vm.load_state(os.path.join(image_dir, STATE_FILE), ignore_shared=False, run=False)
            state = os.path.join(wdir, template.STATE_FILE)
            vm.save_state(state)  # the RAM is the file now: only the devices' state
            wmeta = {"format": template.FORMAT, **meta["config"], "nics": nics, "nic_mac": "",
                     "kernel": os.path.abspath(config.kernel),
                     "initrd": os.path.abspath(config.initrd),
                     "kernel_id": template._file_id(config.kernel),
                     "initrd_id": template._file_id(config.initrd),
                     "memory_file": memory_file, "created": time.time(),
                     "state_bytes": os.path.getsize(state),
                     "checkpoint": _meta_digest(image_dir)}
            write_json(os.path.join(wdir, template.META_FILE), wmeta)  # the copy exists now
            return wmeta
        except BaseException:
            template._remove_files(wdir, memory_file)
            raise
        finally:
            if vm is not None:
                vm.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def remove(image_dir: str) -> bool:
    """Remove the warm copy (its memory file too); False if there was none."""
    return template.remove(warm_dir(image_dir))


def clone(driver, wmeta: dict, image_dir: str, config, workdir: str, name: str,
          share_dir: str, network, connect) -> tuple:
    """A VM restored from the warm copy: (VM, agent, config), as template.clone."""
    return template.clone(driver, wmeta, warm_dir(image_dir), config, workdir, name,
                          share_dir, network=network, connect=connect)
