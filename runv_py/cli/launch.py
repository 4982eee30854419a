"""runv-py's fast launcher: ``python3 -S /path/to/runv_py/cli/launch.py ARGS`` is
``runv-py ARGS``, less the interpreter's site start-up for the commands tools poll with.

With -S, Python does not process site-packages, whose .pth files (setuptools' editable
finder, distutils' shim, whatever else is installed) cost more than a `runv-py state`
does. The launcher finds runv_py from its own place (a checkout, as `pip install -e`
leaves it, or an installed package) through a finder of its own, so ``sys.path`` stays the
interpreter's: site-packages are added (without their .pth files) only for what the
standard library lacks. If the fast path (fast.py) declines the command line, the click
CLI runs, still without the .pth hooks: they cost 30-40 ms here (setuptools' editable
finder, a certifi hook) and runv-py's dependencies are plain packages. Only if the CLI
cannot be imported so does the launcher run ``site.main()``, which does exactly what the
interpreter would have done at start-up, and try again.

The `runv-py` console script that pip writes cannot pass -S (pip writes a shebang
without flags), so callers that poll (containerd's runc shim, a runtime configured by
path) get this speed from a wrapper such as::

    #!/bin/sh
    exec /path/to/python3 -S /path/to/runv_py/cli/launch.py "$@"

or a script whose first line is ``#!/path/to/python3 -S`` and that runs this file.
"""
import os
import sys

# Where runv_py is: the directory holding the runv_py package (a checkout, or site-packages).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Subpackages that a checkout keeps beside runv_py/ (pyproject.toml's package-dir).
BESIDE = {"runv_py.drivers": "drivers", "runv_py.hyperstart": "hyperstart"}


class Finder:
    """runv_py from ROOT, and in a checkout the subpackages kept beside it."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "runv_py" and (name not in BESIDE or os.path.isdir(
                os.path.join(ROOT, "runv_py", BESIDE[name]))):
            return None
        from importlib.machinery import PathFinder
        return PathFinder.find_spec(name, [ROOT])


def exit_now(e: SystemExit) -> None:
    """End the process as ``raise e`` would at its top, less the interpreter's tear-down
    (some 4 ms): atexit's functions (logging's flush) run, the standard streams are
    flushed, nothing else is left to do. Anything unusual takes the ordinary way."""
    code = e.code
    if code is not None and not isinstance(code, int):
        raise e
    if "threading" in sys.modules and sys.modules["threading"].active_count() > 1:
        raise e  # the interpreter would wait for them
    import atexit
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        raise e from None  # as at an ordinary exit, the interpreter reports it
    os._exit(code or 0)


def install() -> list:
    """runv_py importable, and under -S site-packages on sys.path without their .pth
    files (for protobuf, click, ...); returns the directories added."""
    if Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)
    if not sys.flags.no_site:
        return []
    import site
    extra = [d for d in site.getsitepackages() if d not in sys.path and os.path.isdir(d)]
    sys.path.extend(extra)
    return extra


def run(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = install()
    if not sys.flags.no_site:  # started without -S: nothing to save
        from runv_py.cli import main
        main(argv)
        return
    import site
    from runv_py.cli.fast import dispatch
    try:
        dispatch(argv)  # exits if it ran a command
    except SystemExit as e:
        exit_now(e)
    try:
        from runv_py.cli.app import cli
    except ImportError:  # a dependency that only a .pth hook makes importable
        for d in extra:
            sys.path.remove(d)
        site.main()
        from runv_py.cli.app import cli
    cli(argv)


if __name__ == "__main__":
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # this file's directory: not a place to import from
    if os.path.basename(sys.argv[0]) == "launch.py":
        sys.argv[0] = "runv-py"  # click's program name, as under the console script
    run()
