"""The fast path of the command line: `state`, `list`, `kill`, `ps` and `events` without
click.

Tools poll with these commands (go-runc: ``runc --root R --log L --log-format json state
ID``), and importing click and every command's module costs more than running one of
them. ``dispatch`` recognises a command line that click would parse into one of these
commands, builds the same ``Options`` the click group would, and runs the same function
(hot.py) under the same error handling (``runtime_errors``, click's Ctrl-C and broken-pipe
handling). It declines, having done nothing, whatever it does not recognise exactly: help
and version flags, an unknown or malformed option, an invalid value, a missing or extra
argument, ``--`` before the command, a shell-completion request. The click CLI then parses
the command line as it always has, so every usage error and help text stays click's.

The tables below mirror app.py's group and the five commands' parameters;
tests/test_units.py checks them against click's own.
"""
import os
import sys

# The group's options (app.py): option -> (Options field, kind). A kind is "flag", "str",
# a tuple of choices, or an inclusive (min, max) integer range.
GLOBAL_OPTIONS = {
    "--kernel": ("kernel", "str"), "--initrd": ("initrd", "str"), "--driver": ("driver", "str"),
    "--default-cpus": ("default_cpus", range(1, 16 + 1)),
    "--default-memory": ("default_memory", range(64, 65536 + 1)),
    "--root": ("root", "str"), "--debug": ("debug", "flag"), "--log": ("log_file", "str"),
    "--log-format": ("log_format", ("text", "json")), "--share": ("share", ("9p", "virtiofs")),
    "--systemd-cgroup": ("systemd_cgroup", "flag"),
    "--template": ("template", "str"), "--factory-policy": ("factory_policy", "str"),
}
# Their environment variables, and defaults (from runv_py.paths where app.py takes them).
GLOBAL_ENV = {"kernel": "RUNV_KERNEL", "initrd": "RUNV_INITRD", "driver": "RUNV_DRIVER",
              "root": "RUNV_ROOT", "template": "RUNV_TEMPLATE",
              "factory_policy": "RUNV_FACTORY_POLICY", "share": "RUNV_SHARE"}


def global_defaults() -> dict:
    from .. import paths
    return {"kernel": paths.KERNEL, "initrd": paths.INITRD, "driver": "", "default_cpus": 1,
            "default_memory": 256, "root": paths.STATE_ROOT, "debug": False, "log_file": "",
            "log_format": "text", "share": paths.DEFAULT_SHARE}


FORMAT = ("fmt", ("table", "json"))
# command -> (its options, its arguments: names, how many are required, and whether the
# last one takes any number of values).
COMMANDS = {
    "state": ({}, (("container_id",), 1, False)),
    "list": ({"-q": ("quiet", "flag"), "--quiet": ("quiet", "flag"), "-f": FORMAT,
              "--format": FORMAT}, ((), 0, False)),
    "kill": ({"-a": ("all_processes", "flag"), "--all": ("all_processes", "flag")},
             (("container_id", "signal"), 1, False)),
    "ps": ({"-f": FORMAT, "--format": FORMAT}, (("container_id", "ps_args"), 1, True)),
    "events": ({"--stats": ("stats", "flag"), "--interval": ("interval", "str")},
               (("container_id",), 1, False)),
}
COMMAND_DEFAULTS = {"list": {"quiet": False, "fmt": "table"},
                    "kill": {"all_processes": False, "signal": "SIGTERM"},
                    "ps": {"fmt": "table", "ps_args": ()},
                    "events": {"stats": False, "interval": "5s"}}


def _option(args: list, i: int, table: dict, values: dict):
    """Parse the option at ``args[i]`` into ``values``; the index after it, or None if
    click should parse it (unknown, short options run together, a bad value...)."""
    arg = args[i]
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
    elif len(arg) == 2:
        name, eq, value = arg, "", ""
    else:
        return None
    if name not in table:
        return None
    key, kind = table[name]
    if kind == "flag":
        if eq:
            return None
        values[key] = True
        return i + 1
    if not eq:
        if i + 1 >= len(args):
            return None
        i += 1
        value = args[i]
    if isinstance(kind, range):
        if not value.isascii() or not value.isdigit() or int(value) not in kind:
            return None
        value = int(value)
    elif kind != "str" and value not in kind:
        return None
    values[key] = value
    return i + 1


def parse(argv: list):
    """(global flags, command, the command's parameters) as click would parse ``argv``,
    or None if click should."""
    flags, i = {}, 0
    while i < len(argv) and argv[i][:1] == "-" and len(argv[i]) > 1:
        i = _option(argv, i, GLOBAL_OPTIONS, flags)  # "--" too ends up with click
        if i is None:
            return None
    if i >= len(argv) or argv[i] not in COMMANDS:
        return None
    name, args = argv[i], argv[i + 1:]
    table, (arg_names, required, variadic) = COMMANDS[name]
    params, positional, i = dict(COMMAND_DEFAULTS.get(name, {})), [], 0
    while i < len(args):
        if args[i] == "--":
            positional += args[i + 1:]
            break
        if args[i][:1] == "-" and len(args[i]) > 1:
            i = _option(args, i, table, params)
            if i is None:
                return None
        else:
            positional.append(args[i])
            i += 1
    if len(positional) < required or (len(positional) > len(arg_names) and not variadic):
        return None
    if variadic:
        head = len(arg_names) - 1
        positional = positional[:head] + [tuple(positional[head:])]
    params.update(zip(arg_names, positional))
    return flags, name, params


def global_options(flags: dict) -> dict:
    """The group's parameters: from the command line, else the environment, else the
    defaults, as click takes them (an empty environment variable counts as unset)."""
    values = global_defaults()
    for key, var in GLOBAL_ENV.items():
        if os.environ.get(var) and key in values:
            values[key] = os.environ[var]
    values.update((k, v) for k, v in flags.items() if k in values)
    return values


def dispatch(argv: list) -> None:
    """Run ``argv`` if it is a hot command click would parse the same way, then exit as
    click does; return, having done nothing, if click should handle it."""
    if any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ):
        return  # shell completion is click's
    parsed = parse(argv)
    if parsed is None:
        return
    flags, name, params = parsed
    from . import hot, make_options, runtime_errors, setup_logging
    values = global_options(flags)
    if values["log_file"] or values["debug"]:
        setup_logging(values["debug"], values["log_file"], values["log_format"])
    else:  # click's group sets up logging for stderr: done if anything imports logging
        _configure_logging_on_import(values)
    opts = make_options(**values)
    command = {"state": runtime_errors(hot.state), "list": hot.list_containers,
               "kill": runtime_errors(hot.kill), "ps": runtime_errors(hot.ps),
               "events": runtime_errors(hot.events)}[name]
    try:
        try:
            command(opts, **params)
        except (EOFError, KeyboardInterrupt):
            from . import echo
            echo("", err=True)
            echo("Aborted!", err=True)
            sys.exit(1)
        except OSError as e:
            import errno
            if e.errno != errno.EPIPE:
                raise
            from click.utils import PacifyFlushWrapper
            sys.stdout = PacifyFlushWrapper(sys.stdout)
            sys.stderr = PacifyFlushWrapper(sys.stderr)
            sys.exit(1)
    finally:
        _stop_configuring_logging()
    sys.exit(0)


class _LoggingOnImport:
    """A meta path finder that sets up logging as ``setup_logging`` would the moment the
    logging module is loaded: the hot commands' modules do not log, and do not import
    logging, and so do not pay for it; if one ever does, its records are formatted as
    under click."""

    def __init__(self, values: dict):
        self.values = values

    def find_spec(self, name, path=None, target=None):
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load, values = spec.loader.exec_module, self.values

        def exec_module(module):
            load(module)
            from . import setup_logging
            setup_logging(values["debug"], values["log_file"], values["log_format"])
        spec.loader.exec_module = exec_module
        return spec


def _configure_logging_on_import(values: dict) -> None:
    if "logging" in sys.modules:
        from . import setup_logging
        setup_logging(values["debug"], values["log_file"], values["log_format"])
    else:
        sys.meta_path.insert(0, _LoggingOnImport(values))


def _stop_configuring_logging() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _LoggingOnImport)]
