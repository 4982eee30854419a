"""What a per-sandbox shim is started with (JSON on its command line when exec'd)."""
import dataclasses
import json
from typing import Optional


@dataclasses.dataclass
class ShimParams:
    cid: str
    state_dir: str
    bundle: str
    config: dict                       # a BootConfig's fields
    driver: str = ""
    console_socket: str = ""
    tty_on_stdio: bool = False         # `run` in a terminal: the init's tty is our stdio
    factory_policy: Optional[str] = None
    template_dir: str = ""
    die_with_parent: bool = False      # `run` in the foreground: gone with its caller
    log_file: str = ""                 # the caller's --log (else shim.log in state_dir)
    log_format: str = "text"
    restore_from: str = ""             # a checkpoint's directory: restore, do not boot

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShimParams":
        return cls(**json.loads(text))
