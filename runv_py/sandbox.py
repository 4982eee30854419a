"""A sandbox: one VM, its agent, and the containers running in it.

Host directories reach the guest through the sandbox's 9p share: the container's rootfs
and every bind-mount source are bind-mounted into ``share/<container>/``. The process
that owns the sandbox first calls ``private_mount_namespace()``, so those bind mounts
exist only in its own mount namespace (and QEMU's, its child) and vanish with them: a
killed owner cannot leak a mount onto the host.
"""
import logging
import os

from . import bundle as oci
from .agent_client import AgentClient
from .factory import BootedVM
from .hyperstart import protocol as p
from .hyperstart import syscalls

log = logging.getLogger("runv_py.sandbox")


def private_mount_namespace() -> None:
    syscalls.private_mount_namespace()


class Sandbox:
    def __init__(self, sandbox_id: str, booted: BootedVM):
        self.id = sandbox_id
        self.booted = booted
        self.vm = booted.vm
        self.agent: AgentClient = booted.agent
        self.share_dir = booted.share_dir
        self.mounts = []          # host bind mounts to undo, innermost last

    def start_pod(self, hostname: str = "") -> None:
        self.agent.request(p.STARTPOD, {"hostname": hostname, "shareTag": "runvshare"})

    def _bind(self, source: str, target: str, readonly: bool = False) -> None:
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
        self.mounts.append(target)

    def guest_mounts(self, cid: str, spec_mounts: list) -> list:
        """The bundle's mounts as the guest sees them; host bind sources are shared."""
        out = []
        for i, m in enumerate(spec_mounts or []):
            m = dict(m)
            options = m.get("options") or []
            if m.get("type") in (None, "", "bind", "none") and ("bind" in options or "rbind" in options
                                                               or m.get("type") == "bind"):
                source = m.get("source", "")
                if not os.path.exists(source):
                    raise oci.BundleError(f"bind mount source {source} does not exist")
                rel = os.path.join(cid, "mounts", str(i))
                self._bind(source, os.path.join(self.share_dir, rel))
                m.update(source=rel, shared=True, type="bind")
            out.append(m)
        return out

    def create_container(self, cid: str, bundle: oci.Bundle, process: dict,
                         wait: bool = False) -> int:
        """Share the bundle into the VM and create the container; returns its guest pid.

        With ``wait`` the process is set up but held until ``start_container``."""
        rootfs_rel = os.path.join(cid, "rootfs")
        self._bind(bundle.rootfs, os.path.join(self.share_dir, rootfs_rel))
        message = {
            "id": cid,
            "rootfs": rootfs_rel,
            "readonly": bundle.readonly,
            "hostname": bundle.hostname,
            "mounts": self.guest_mounts(cid, bundle.spec.get("mounts")),
            "resources": oci.guest_resources(bundle.resources),
            "process": process,
            "wait": wait,
        }
        return self.agent.request(p.NEWCONTAINER, message)["pid"]

    def start_container(self, cid: str) -> None:
        self.agent.request(p.STARTCONTAINER, {"container": cid})

    def exec(self, cid: str, process: dict) -> int:
        return self.agent.request(p.EXECCMD, {"container": cid, "process": process})["pid"]

    def kill(self, cid: str, sig: int, all_processes: bool = False) -> None:
        self.agent.request(p.KILLCONTAINER, {"container": cid, "signal": sig, "all": all_processes})

    def signal_process(self, cid: str, process_id: str, sig: int) -> None:
        self.agent.request(p.SIGNALPROCESS, {"container": cid, "process": process_id, "signal": sig})

    def winsize(self, seq: int, rows: int, cols: int) -> None:
        self.agent.request(p.WINSIZE, {"seq": seq, "row": rows, "column": cols})

    def processes(self, cid: str) -> list:
        return self.agent.request(p.PROCESSLIST, {"container": cid})["processes"]

    def read_cgroup(self, cid: str, name: str) -> str:
        import base64
        reply = self.agent.request(p.READFILE, {"container": cid, "file": name, "cgroup": True})
        return base64.b64decode(reply["data"]).decode(errors="replace")

    def write_cgroup(self, cid: str, name: str, value: str) -> None:
        import base64
        self.agent.request(p.WRITEFILE, {"container": cid, "file": name, "cgroup": True,
                                         "data": base64.b64encode(value.encode()).decode()})

    def unmount_all(self) -> None:
        while self.mounts:
            target = self.mounts.pop()
            try:
                syscalls.umount(target, syscalls.MNT_DETACH)
            except OSError as e:
                log.warning("cannot unmount %s: %s", target, e)

    def destroy(self) -> None:
        """Stop the VM and undo the host bind mounts; safe to call twice."""
        self.booted.stop()
        self.unmount_all()
        self.booted.release()  # a cache's directory for this VM
