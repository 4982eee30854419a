"""Log files as runc writes them (``--log``, ``--log-format text|json``): the CLI and the
shims it starts write the same file in the same format, so that a caller that reads it
back (go-runc: containerd's runc shim, docker, podman) finds the runtime's errors."""
import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """One JSON object a line with ``level``, ``msg`` and ``time``, as runc's logrus."""

    def format(self, record: logging.LogRecord) -> str:
        # RFC 3339 in UTC, which go's time.Parse (go-runc reading it back) accepts.
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return json.dumps({"level": record.levelname.lower(), "msg": record.getMessage(),
                           "time": f"{when}.{int(record.msecs):03d}Z"})


def handler(path: str, log_format: str = "text") -> logging.Handler:
    """A handler writing to ``path`` (stderr if empty) in ``log_format``."""
    out = logging.FileHandler(path) if path else logging.StreamHandler()
    if log_format == "json":
        out.setFormatter(JsonFormatter())
    else:
        out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return out
