"""OCI hooks: every kind run the same way, whatever the entry point.

Each hook is ``path`` executed with ``args`` as its argv (``args[0]`` is argv[0], which
docker's libnetwork-setkey dispatches on), ``env`` as its whole environment, the
container's state JSON on stdin, and ``timeout`` seconds (default 60) to finish.
Failures of the hooks that run before the user's process starts fail the operation;
poststart and poststop failures are logged warnings, as runc does.
"""
import json
import logging
import subprocess

from ..hyperstart.errors import Internal

log = logging.getLogger("runv_py.hooks")

CREATE_RUNTIME = "createRuntime"
CREATE_CONTAINER = "createContainer"
START_CONTAINER = "startContainer"
PRESTART = "prestart"
POSTSTART = "poststart"
POSTSTOP = "poststop"
KINDS = (PRESTART, CREATE_RUNTIME, CREATE_CONTAINER, START_CONTAINER, POSTSTART, POSTSTOP)
FATAL = (PRESTART, CREATE_RUNTIME, CREATE_CONTAINER, START_CONTAINER)
DEFAULT_TIMEOUT = 60


class HookError(Internal):
    """A hook that must succeed failed; the text names it and says why."""


def run_hooks(hooks: dict, kind: str, state: dict) -> None:
    """Run the ``kind`` hooks of a spec's ``hooks`` with ``state`` (runc's state JSON)."""
    for hook in (hooks or {}).get(kind) or []:
        error = run_one(hook, state)
        if not error:
            continue
        message = f"{kind} hook {hook.get('path', '')} failed: {error}"
        if kind in FATAL:
            raise HookError(message)
        log.warning("%s", message)


def run_one(hook: dict, state: dict) -> str:
    """Run one hook; '' if it succeeded, else why not."""
    path = hook.get("path", "")
    args = hook.get("args") or [path]
    env = dict(e.split("=", 1) for e in hook.get("env") or [] if "=" in e)
    timeout = hook.get("timeout") or DEFAULT_TIMEOUT
    try:
        result = subprocess.run(args, executable=path, env=env, input=json.dumps(state).encode(),
                                capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout}s"
    except OSError as e:
        return e.strerror or str(e)
    if result.returncode != 0:
        return f"exit status {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
    return ""
