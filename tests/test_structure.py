"""The layering rules of the code base, checked on its sources.

- hyperstart (the guest agent and the protocol shared with it) imports nothing of
  runv_py's: the guest has only that package.
- drivers import only hyperstart (and themselves): nothing above them.
- the CLI reaches VMs only through the per-sandbox shim: it imports neither the sandbox
  API nor the VM layer (templates, which belong to no container, are `manage`'s; `probe`
  asks the driver loader).
- the shim's clients (lifecycle, client) do not reach the sandbox either.
- no module of ours is over 400 lines (generated protobuf code aside).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"runv_py": "runv_py", "drivers": "runv_py.drivers", "hyperstart": "runv_py.hyperstart"}


def sources():
    for top, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, os.path.join(ROOT, top))
                    parts = rel[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    yield path, ".".join([package] + parts), name == "__init__.py"


def imports(path: str, module: str, is_package: bool) -> set:
    """Absolute names of the runv_py modules ``path`` imports, anywhere in it."""
    tree = ast.parse(open(path).read(), path)
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[:len(base) - node.level + 1] + ([node.module] if node.module else [])
                name = ".".join(target)
            else:
                name = node.module or ""
            found |= {f"{name}.{a.name}" if a.name != "*" else name for a in node.names}
    return {n for n in found if n.startswith("runv_py")}


ALL = list(sources())


def test_sources_found():
    assert len(ALL) > 40


@pytest.mark.parametrize("path,module,is_package", ALL, ids=[m for _, m, _ in ALL])
def test_layering(path, module, is_package):
    names = imports(path, module, is_package)

    def breaks(*prefixes, allow=()):
        return sorted(n for n in names if n.startswith(prefixes) and not n.startswith(allow))

    if module.startswith("runv_py.hyperstart"):
        assert not breaks("runv_py", allow=("runv_py.hyperstart",)), "hyperstart is the bottom"
    elif module.startswith("runv_py.drivers"):
        assert not breaks("runv_py", allow=("runv_py.hyperstart", "runv_py.drivers")), \
            "drivers import only hyperstart"
    elif module.startswith("runv_py.cli"):
        allow = ("runv_py.vm.template", "runv_py.vm.boot", "runv_py.vm.warm", "runv_py.drivers") \
            if module == "runv_py.cli.manage" else \
            ("runv_py.drivers",) if module == "runv_py.cli.commands" else ()
        assert not breaks("runv_py.sandbox", "runv_py.vm", "runv_py.drivers", "runv_py.shimv2",
                          "runv_py.shim.server", allow=allow), "the CLI goes through shims"
    elif module in ("runv_py.shim.lifecycle", "runv_py.shim.client"):
        assert not breaks("runv_py.sandbox", "runv_py.vm", "runv_py.drivers"), \
            "the shim's clients reach the sandbox through the shim"


@pytest.mark.parametrize("path,module,is_package", ALL, ids=[m for _, m, _ in ALL])
def test_module_size(path, module, is_package):
    if path.endswith(("_pb2.py", "_pb2_grpc.py")):
        return
    assert sum(1 for _ in open(path)) <= 400, f"{module} is over 400 lines: split it"



@pytest.mark.parametrize("path,module,is_package", ALL, ids=[m for _, m, _ in ALL])
def test_no_python_between_fork_and_exec(path, module, is_package):
    """No preexec_fn: the host processes that launch children are threaded, where Python
    documents it as unsafe (a lock held by another thread at fork deadlocks the child).
    What it did is done by subprocess's own arguments or by the child after exec."""
    tree = ast.parse(open(path).read(), path)
    calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and any(k.arg == "preexec_fn" for k in node.keywords)]
    assert not calls, f"{module} passes preexec_fn at lines {calls}"


def test_the_fork_server_knows_every_setting_read_at_import():
    """A module-level os.environ read is frozen in the shim v2's fork server: the server
    must compare it (zygote.IMPORT_TIME_ENV) before it forks a daemon for a caller."""
    import re
    from runv_py.shimv2.zygote import IMPORT_TIME_ENV
    read = re.compile(r"^\w+(?::[^=]*)?\s*=.*environ\.get\(\s*\"(\w+)\"", re.M)
    found = {name for path, _, _ in ALL for name in read.findall(open(path).read())}
    assert found and found <= set(IMPORT_TIME_ENV), found - set(IMPORT_TIME_ENV)
