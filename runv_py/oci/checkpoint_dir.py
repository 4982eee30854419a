"""A checkpoint's directory, as runc's is the caller's (--image-path): the files, who
writes them, and reading them back with the checks a restore needs. The CLI writes what
the shim answers (shim/lifecycle.py); sandbox/checkpoint.py saves and restores the VM.

- ``vm.state``: QEMU's migration stream, the guest's RAM included;
- ``runv-py.json``: what a restore needs besides (sandbox/checkpoint.py: save);
- ``inventory.img``: the file podman looks for before it restores (CRIU's name).
"""
import hashlib
import json
import os

from ..hyperstart.errors import InvalidArgument

FORMAT = 1
META_FILE = "runv-py.json"
STATE_FILE = "vm.state"
INVENTORY_FILE = "inventory.img"
INVENTORY_TEXT = b"runv-py VM checkpoint: see runv-py.json and vm.state (not a CRIU image)\n"


class CheckpointError(InvalidArgument):
    """A checkpoint that cannot be restored here: not runv-py's, damaged, or made by
    another kernel or initrd."""


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_state(image_dir: str) -> int:
    """The checkpoint's state file, new and empty, for save()."""
    os.makedirs(image_dir, exist_ok=True)
    return os.open(os.path.join(image_dir, STATE_FILE),
                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def write_checkpoint(image_dir: str, save) -> dict:
    """The whole checkpoint in ``image_dir``, or none of it: ``save(fd)`` writes the VM's
    state into the file open as ``fd`` and returns the metadata, written beside it."""
    try:
        fd = open_state(image_dir)
        try:
            meta = save(fd)
        finally:
            os.close(fd)
        write_image(image_dir, meta)
    except BaseException:
        remove_partial(image_dir)
        raise
    return meta


def write_image(image_dir: str, meta: dict) -> None:
    """What goes beside the state: the metadata, and the file podman looks for."""
    write_json(os.path.join(image_dir, META_FILE), meta)
    with open(os.path.join(image_dir, INVENTORY_FILE), "wb") as f:
        f.write(INVENTORY_TEXT)


def remove_partial(image_dir: str) -> None:
    """A checkpoint that failed half-way: nothing of it stays to be restored."""
    for name in (STATE_FILE, META_FILE, META_FILE + ".tmp", INVENTORY_FILE):
        try:
            os.unlink(os.path.join(image_dir, name))
        except FileNotFoundError:
            pass


def write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def read(image_dir: str, config) -> dict:
    """The checkpoint's metadata, checked against this runtime's ``config`` (a
    BootConfig: its kernel and initrd must be the ones that made it)."""
    path = os.path.join(image_dir, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{image_dir} holds no runv-py checkpoint ({META_FILE} is missing)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("runtime") != "runv-py":
        raise CheckpointError(f"{path} is not a runv-py checkpoint of format {FORMAT}")
    try:
        size = os.path.getsize(os.path.join(image_dir, STATE_FILE))
    except OSError as e:
        raise CheckpointError(f"the checkpoint's VM state is missing: {e}") from None
    if size != meta.get("state_bytes"):
        raise CheckpointError(f"the checkpoint's VM state is {size} bytes, not the "
                              f"{meta.get('state_bytes')} written: it is truncated or changed")
    for key in ("kernel", "initrd"):
        if digest(getattr(config, key)) != meta.get(f"{key}_sha256"):
            raise CheckpointError(f"the checkpoint was made with another {key} than "
                                  f"{getattr(config, key)}: its guest memory cannot run on this one")
    return meta
