"""OCI bundles: loading and checking config.json, container ids and signals.

Every CLI call checks a container id here: json, re and signal (which imports enum) are
imported only by what needs them."""
import os

from ..hyperstart.errors import InvalidArgument

# runc's container ids: ^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$ (without the re module).
ID_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
ID_CHARS = ID_FIRST | frozenset("_.+-")


class BundleError(InvalidArgument):
    """The bundle, its config.json, a container id or a signal cannot be used; the text
    names the problem."""


def check_id(cid: str, what: str = "container id") -> str:
    """Container ids as runc accepts them, minus what could escape the state directory
    (also the shim v2's task and exec ids: every id that becomes a path)."""
    if not isinstance(cid, str) or not cid:
        raise BundleError(f"{what} must be a non-empty string")
    if len(cid) > 128:
        raise BundleError(f"{what} is {len(cid)} characters long; at most 128 allowed")
    if cid[0] not in ID_FIRST or not ID_CHARS.issuperset(cid) or ".." in cid:
        raise BundleError(f"invalid {what} {cid!r}: use letters, digits and _.+- "
                          "(no '/', no '..')")
    return cid


class Bundle:
    def __init__(self, path: str, spec: dict):
        self.path = path
        self.spec = spec

    @property
    def rootfs(self) -> str:
        root = self.spec["root"]["path"]
        return root if os.path.isabs(root) else os.path.join(self.path, root)

    @property
    def process(self) -> dict:
        return self.spec["process"]

    @property
    def terminal(self) -> bool:
        return bool(self.process.get("terminal"))

    @property
    def readonly(self) -> bool:
        return bool(self.spec["root"].get("readonly"))

    @property
    def hostname(self) -> str:
        return self.spec.get("hostname") or ""

    @property
    def annotations(self) -> dict:
        return self.spec.get("annotations") or {}

    @property
    def resources(self) -> dict:
        return (self.spec.get("linux") or {}).get("resources") or {}

    @property
    def hooks(self) -> dict:
        return self.spec.get("hooks") or {}

    @property
    def cgroups_path(self) -> str:
        return (self.spec.get("linux") or {}).get("cgroupsPath") or ""


def load(path: str) -> Bundle:
    """Read and check ``path/config.json``; raises BundleError with a precise message."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise BundleError(f"bundle {path} is not a directory")
    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            text = f.read()
    except FileNotFoundError:
        raise BundleError(f"{config} not found (create one with 'runv-py spec')") from None
    except OSError as e:
        raise BundleError(f"cannot read {config}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BundleError(f"{config} is not UTF-8 text") from None
    import json
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{config}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise BundleError(f"{config}: JSON nested too deeply") from None
    if not isinstance(spec, dict):
        raise BundleError(f"{config}: expected a JSON object")
    check_spec(spec, config)
    bundle = Bundle(path, spec)
    if not os.path.isdir(bundle.rootfs):
        raise BundleError(f"rootfs {bundle.rootfs} does not exist or is not a directory")
    return bundle


def read_spec(path: str) -> dict:
    """``path/config.json`` as it is, or {} if it is missing or unreadable: for clean-up
    and lookups that must go on without it (a bundle removed or half-written)."""
    from ..hyperstart.protocol import json_loads  # the C scanner alone: no re module
    try:
        with open(os.path.join(path, "config.json")) as f:
            spec = json_loads(f.read())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def check_spec(spec: dict, where: str) -> None:
    """The spec's fields have their types (schema.py), and what runv-py needs is there."""
    from . import schema
    schema.check(spec, schema.SPEC, where)
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise BundleError(f"{where}: root.path is required")
    process = spec.get("process")
    if not isinstance(process, dict):
        raise BundleError(f"{where}: process is required")
    check_process(process, where)
    for i, m in enumerate(spec.get("mounts") or []):
        if not isinstance(m, dict) or not str(m.get("destination", "")).startswith("/"):
            raise BundleError(f"{where}: mounts[{i}].destination must be an absolute path")


def check_process(process: dict, where: str = "process") -> None:
    from . import schema
    schema.check(process, schema.PROCESS, where, "process")
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise BundleError(f"{where}: process.args must be a non-empty list of strings")
    env = process.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise BundleError(f"{where}: process.env must be a list of strings")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise BundleError(f"{where}: process.cwd must be an absolute path")
    for i, rlimit in enumerate(process.get("rlimits") or []):
        if not rlimit.get("type"):  # runc: an rlimit of no type is no rlimit it knows
            raise BundleError(f"{where}: process.rlimits[{i}].type is required")


def parse_signal(value) -> int:
    """A signal given as a number, 'KILL' or 'SIGKILL'; raises BundleError."""
    import signal
    text = str(value).strip().upper()
    if text.isdigit():
        num = int(text)
        if 0 < num < signal.NSIG:
            return num
        raise BundleError(f"invalid signal number {value}")
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(getattr(signal.Signals, name))
    except AttributeError:
        raise BundleError(f"unknown signal {value!r}") from None
