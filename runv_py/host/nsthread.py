"""Running a function inside another process's namespace without moving the process:
a short-lived thread enters it (network and mount namespaces are per thread once the
thread has its own filesystem context), runs the function, and ends."""
import os
import threading
from typing import Callable, List

from ..hyperstart import syscalls as sc
from ..hyperstart.errors import Internal

TIMEOUT = 30.0


def in_namespace(path: str, nstype: int, fn: Callable, timeout: float = TIMEOUT):
    """``fn()`` run by a thread that has entered the namespace at ``path`` (of kind
    ``nstype``: sc.CLONE_NEWNET, sc.CLONE_NEWNS); its result or exception comes back."""
    box: List = []

    def body():
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if nstype == sc.CLONE_NEWNS:
                    # A thread sharing its root and cwd with the others may not move.
                    sc.unshare(sc.CLONE_FS)
                sc.setns(target, nstype)
            finally:
                os.close(target)
            box.append((True, fn()))
        except BaseException as e:  # handed back to the caller
            box.append((False, e))
        # The thread ends here: the namespace goes with it, not with the process.
    thread = threading.Thread(target=body, name="in-namespace", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        raise Internal(f"entering {path} did not finish within {timeout:.0f}s")
    ok, value = box[0]
    if not ok:
        raise value
    return value
