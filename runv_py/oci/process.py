"""An OCI process (config.json's ``process``, or an exec's process.json) as the agent's
ProcessSpec message."""
from ..hyperstart import messages as m


def process_spec(process: dict, process_id: str, stdio_seq: int, stderr_seq: int) -> m.ProcessSpec:
    """The agent's view of ``process``; ``stdio_seq``/``stderr_seq`` are the stream
    sequences of its stdin+stdout and of its stderr (0: none, or with stdout)."""
    user = process.get("user") or {}
    caps = process.get("capabilities")
    size = process.get("consoleSize") or {}
    return m.ProcessSpec(
        id=process_id,
        args=list(process["args"]),
        env=list(process.get("env") or []),
        cwd=process.get("cwd") or "/",
        terminal=bool(process.get("terminal")),
        user=m.User(uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                    additional_gids=[int(g) for g in user.get("additionalGids") or []],
                    umask=user.get("umask")),
        rlimits=[m.Rlimit(type=r["type"], soft=int(r.get("soft", 0)), hard=int(r.get("hard", 0)))
                 for r in process.get("rlimits") or []],
        no_new_privileges=bool(process.get("noNewPrivileges")),
        capabilities=m.Capabilities(**{k: list(caps[k]) for k in
                                       ("bounding", "effective", "inheritable", "permitted",
                                        "ambient") if caps.get(k) is not None})
        if caps is not None else None,
        console_size=m.ConsoleSize(height=int(size.get("height", 0)),
                                   width=int(size.get("width", 0))) if size else None,
        oom_score_adj=process.get("oomScoreAdj"),
        stdio=stdio_seq,
        stderr=stderr_seq,
    )
