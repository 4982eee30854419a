"""Drive containerd's CRI plugin as kubelet would, against a private containerd.

``CriContainerd`` starts a containerd 1.6 of its own (root, state, gRPC and ttrpc
sockets, config file, runc state, netns mounts, CNI config and IPAM data all under one
temporary directory; never the system's /run/containerd or /var/lib/containerd) with:

- the CRI plugin enabled; its sandbox ("pause") image and a busybox image are built by
  tests/images.py and imported into the ``k8s.io`` namespace;
- two runtime handlers: ``runc`` (io.containerd.runc.v2, the default) and ``runvpy``
  (io.containerd.runvpy.v2, i.e. ``containerd-shim-runvpy-v2`` on containerd's PATH);
- a CNI network of its own: a ``bridge`` (own bridge device, own subnet, host-local IPAM
  with its own data directory, ``isGateway``, no masquerading, no default route unless
  asked for), ``portmap``, and CRI's ``loopback``;
- pods under a cgroup parent of their own, so that clean-up can find every process.

``CriClient`` (client.py) wraps the CRI v1 RuntimeService and ImageService with typed
helpers and remembers what it created so that ``cleanup()`` can remove it; logs.py reads
CRI log files; config.py writes containerd's config.toml and the CNI .conflist. This
module re-exports all of it.

Example::

    with CriContainerd() as cri:
        client = cri.client
        pod = client.run_pod("web", log_dir=str(tmp_path / "logs"))
        cid = client.create_container(pod, "c", cri.BUSYBOX, command=["sleep", "60"])
        client.start_container(cid)
        assert client.exec_sync(cid, ["echo", "hi"]) == (0, b"hi\\n", b"")
"""
import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
import uuid
from typing import List, Optional, Sequence

import grpc

from . import config
from .client import CriClient, ExecSyncTimeout, KUBELET_NAMESPACES
from .config import (BUSYBOX_IMAGE, CNI_CACHE_DIR, CONTAINERD, CTR, NAMESPACE, PAUSE_IMAGE,
                     RUNC_HANDLER, RUNVPY_HANDLER, RUNVPY_RUNTIME_TYPE, SHIM_SOCKET_DIR,
                     missing_prerequisites)
from .logs import cri_log_text, parse_cri_time, read_cri_log

__all__ = ["CriContainerd", "CriClient", "ExecSyncTimeout", "KUBELET_NAMESPACES",
           "missing_prerequisites", "read_cri_log", "cri_log_text", "parse_cri_time",
           "PAUSE_IMAGE", "BUSYBOX_IMAGE", "RUNC_HANDLER", "RUNVPY_HANDLER",
           "RUNVPY_RUNTIME_TYPE"]


class CriContainerd:
    """A private containerd with the CRI plugin, a CNI bridge network and two runtime
    handlers (``runc`` default, ``runvpy``). Use as a context manager, or start() and
    stop() (stop is idempotent and cleans up whatever it finds, also after failures).

    bridge/subnet: the CNI bridge device and pod subnet (default: the first free
    ``runvtestN``, which start() creates, with 10.91.N.0/24). routes: IPAM routes handed to pods, e.g.
    ``[{"dst": "0.0.0.0/0"}]`` for a default route through the bridge (none by
    default: a test pod can then reach only its subnet and the host's bridge address).
    """

    PAUSE = PAUSE_IMAGE
    BUSYBOX = BUSYBOX_IMAGE

    def __init__(self, base: str = None, bridge: str = None, subnet: str = None,
                 routes: Sequence[dict] = (), default_handler: str = RUNC_HANDLER,
                 runvpy_options: dict = None, env: dict = None, log_level: str = "debug",
                 netns_under_state_dir: bool = True, start_timeout: float = 60):
        self.base = base or tempfile.mkdtemp(prefix="rvcri-", dir="/tmp")
        os.makedirs(self.base, exist_ok=True)
        self.tag = uuid.uuid4().hex[:8]
        self.bridge = bridge  # chosen by start() when None
        self.subnet = ipaddress.ip_network(subnet) if subnet else None
        self._own_bridge_name = bridge is None
        self.network = f"runvtest-{self.tag}"  # the CNI network's name
        self.routes = list(routes)
        self.default_handler = default_handler
        self.runvpy_options = runvpy_options or {}
        self.extra_env = env or {}
        self.log_level = log_level
        self.netns_under_state_dir = netns_under_state_dir
        self.start_timeout = start_timeout
        self.cgroup_parent = f"/runvtest-{self.tag}"
        self.sock = os.path.join(self.base, "c.sock")
        self.root = os.path.join(self.base, "root")
        self.state = os.path.join(self.base, "state")
        self.logs = os.path.join(self.base, "logs")
        self.cni_conf_dir = os.path.join(self.base, "cni", "net.d")
        self.cni_data_dir = os.path.join(self.base, "cni", "ipam")
        self.runc_root = os.path.join(self.base, "runc")
        self.config = os.path.join(self.base, "config.toml")
        self.proc: Optional[subprocess.Popen] = None
        self.client: Optional[CriClient] = None
        self._bridge_existed = False
        self._cni_cache_existed = True

    def _reserve_bridge(self) -> None:
        """Create the bridge device (the CNI bridge plugin adopts it and gives it the
        gateway address): creating it is what reserves a ``runvtestN`` name, and with
        it the subnet 10.91.N.0/24, against another harness starting meanwhile."""
        if not self._own_bridge_name:
            self._bridge_existed = os.path.exists(f"/sys/class/net/{self.bridge}")
            if not self._bridge_existed:
                subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"],
                               capture_output=True, check=True)
            self.subnet = self.subnet or ipaddress.ip_network("10.91.0.0/24")
            return
        for index in range(256):
            name = f"runvtest{index}"
            if subprocess.run(["ip", "link", "add", "name", name, "type", "bridge"],
                              capture_output=True).returncode == 0:
                self.bridge = name
                self.subnet = self.subnet or ipaddress.ip_network(f"10.91.{index}.0/24")
                return
        raise RuntimeError("no free runvtestN bridge name")

    # Set-up

    def write_config(self) -> None:
        for d in (self.logs, self.cni_conf_dir, self.cni_data_dir, self.runc_root):
            os.makedirs(d, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(config.containerd_toml(self))
        with open(os.path.join(self.cni_conf_dir, "10-runvtest.conflist"), "w") as f:
            json.dump(config.cni_conflist(self), f, indent=2)

    def build_images(self) -> List[str]:
        """The pause and busybox OCI archives (tests/images.py)."""
        import images  # tests/ is on sys.path under pytest
        work = os.path.join(self.base, "images")
        os.makedirs(work, exist_ok=True)
        pause = images.pause_archive(os.path.join(work, "pause.tar"), work, PAUSE_IMAGE)
        busybox = images.oci_archive(os.path.join(work, "busybox.tar"), work, BUSYBOX_IMAGE)
        return [pause, busybox]

    def env(self) -> dict:
        """containerd's environment: the directory of the installed
        containerd-shim-runvpy-v2 first on PATH (not pyenv's shim wrapper)."""
        scripts = sysconfig.get_path("scripts")
        env = dict(os.environ, RUNVPY_SHIM_LOG_DIR=self.logs,
                   PATH=scripts + ":" + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
        env.update(self.extra_env)
        return env

    def start(self) -> "CriContainerd":
        try:
            self._reserve_bridge()
            self._cni_cache_existed = os.path.exists(CNI_CACHE_DIR)
            self.write_config()
            tars = self.build_images()
            self.start_daemon()
            for tar in tars:
                self.check("images", "import", "--snapshotter", "native", tar)
            self.client = CriClient(self.sock, default_cgroup_parent=self.cgroup_parent,
                                    default_handler="" if self.default_handler == RUNC_HANDLER
                                    else self.default_handler)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def start_daemon(self) -> None:
        log = open(os.path.join(self.logs, "containerd.log"), "ab")
        self.proc = subprocess.Popen([CONTAINERD, "--config", self.config], env=self.env(),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.sock) and self.ctr("version", timeout=10).returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError("containerd exited: " + self.log_tail())
            time.sleep(0.2)
        raise RuntimeError("containerd did not come up: " + self.log_tail())

    def wait_ready(self) -> None:
        """CRI answers, its runtime and CNI network are ready, and both images are in
        CRI's image store (it learns of imports through containerd's events)."""
        deadline = time.monotonic() + self.start_timeout
        last = None
        while time.monotonic() < deadline:
            try:
                conditions = self.client.conditions()
                have = [self.client.image_status(i) is not None for i in (PAUSE_IMAGE, BUSYBOX_IMAGE)]
                last = (conditions, have)
                if conditions.get("RuntimeReady") and conditions.get("NetworkReady") and all(have):
                    return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"CRI not ready: {last}\n" + self.log_tail())

    def restart_daemon(self) -> None:
        """Stop containerd alone (its shims and pods stay) and start it again."""
        self._stop_daemon()
        self.start_daemon()
        self.wait_ready()

    def __enter__(self) -> "CriContainerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ctr

    def ctr(self, *args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([CTR, "-a", self.sock, "-n", NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout, **kw)

    def check(self, *args, **kw) -> str:
        r = self.ctr(*args, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {r.returncode} {r.stdout} {r.stderr}")
        return r.stdout

    # Inspection

    def log_tail(self, chars: int = 4000) -> str:
        out = []
        if os.path.isdir(self.logs):
            for name in sorted(os.listdir(self.logs)):
                with open(os.path.join(self.logs, name), errors="replace") as f:
                    out.append(f"--- {name}\n" + f.read()[-chars:])
        return "\n".join(out)

    def mounts(self, *needles: str) -> List[str]:
        """Mount points under this containerd's directory, or naming any of ``needles``."""
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4]
                if self.base in point or any(n and n in point for n in needles):
                    found.append(point)
        return found

    def bridge_ports(self) -> List[str]:
        """Interfaces (the pods' host-side veths) attached to the CNI bridge."""
        d = f"/sys/class/net/{self.bridge}/brif"
        return sorted(os.listdir(d)) if self.bridge and os.path.isdir(d) else []

    def cgroup_dirs(self) -> List[str]:
        """This containerd's pod cgroup parents, one per hierarchy."""
        name = self.cgroup_parent.strip("/")
        dirs = []
        for hierarchy in sorted(os.listdir("/sys/fs/cgroup")):
            path = os.path.join("/sys/fs/cgroup", hierarchy, name)
            if os.path.isdir(path):
                dirs.append(path)
        return dirs

    def cgroup_pids(self) -> List[int]:
        """Processes in the pods' cgroup parent (any hierarchy, any depth)."""
        pids = set()
        for top in self.cgroup_dirs():
            for d, _, _ in os.walk(top):
                with contextlib.suppress(OSError):
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids.update(int(x) for x in f.read().split())
        return sorted(pids)

    def shim_pids(self) -> List[int]:
        """Shims (runc's and runv-py's) serving this containerd: their command line
        names its socket."""
        out = subprocess.run(["pgrep", "-f", "--", self.sock], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split() if int(p) != os.getpid()]

    def sandbox_ids(self) -> List[str]:
        """Pod sandboxes CRI still keeps directories for."""
        ids = set()
        for top in (self.root, self.state):
            d = os.path.join(top, "io.containerd.grpc.v1.cri", "sandboxes")
            if os.path.isdir(d):
                ids.update(os.listdir(d))
        return sorted(ids)

    def task_ids(self) -> List[str]:
        """Tasks (sandboxes and containers) with a bundle directory left."""
        d = os.path.join(self.state, "io.containerd.runtime.v2.task", NAMESPACE)
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def shim_sockets(self, *ids: str) -> List[str]:
        """Shim sockets of ``ids`` (and of the tasks and sandboxes still known) that
        exist: containerd's shims listen on /run/containerd/s/sha256(address/ns/group)
        (runv-py's on its first 32 digits), the group being the pod's id under CRI."""
        found = []
        for i in set(ids) | set(self.sandbox_ids()) | set(self.task_ids()):
            digest = hashlib.sha256(f"{self.sock}/{NAMESPACE}/{i}".encode()).hexdigest()
            for name in (digest, digest[:32]):  # runc's shim; runv-py's shim
                path = os.path.join(SHIM_SOCKET_DIR, name)
                if os.path.lexists(path):
                    found.append(path)
        return sorted(found)

    def cni_cache_files(self, *ids: str) -> List[str]:
        """libcni's result cache entries (CNI_CACHE_DIR/results, which containerd 1.6
        does not let us move) of this network, and the ``cni-loopback`` entries of the
        pods in ``ids`` or still known to CRI."""
        d = os.path.join(CNI_CACHE_DIR, "results")
        ids = set(ids) | set(self.sandbox_ids())
        return sorted(os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else [])
                      if n.startswith(self.network + "-")
                      or (n.startswith("cni-loopback-") and any(i and i in n for i in ids)))

    def leaks(self, *ids: str) -> List[str]:
        """What pods and containers that are gone left behind: mounts (under our
        directory or naming one of ``ids``), netns files, bridge ports, processes in
        the pods' cgroups, CNI cache entries, IPAM leases."""
        found = [f"mount {m}" for m in self.mounts(*ids)]
        netns_dir = os.path.join(self.state, "io.containerd.grpc.v1.cri", "netns")
        if os.path.isdir(netns_dir):
            found += [f"netns {n}" for n in os.listdir(netns_dir)]
        found += [f"bridge port {p}" for p in self.bridge_ports()]
        found += [f"process {p}" for p in self.cgroup_pids()]
        found += [f"cni cache {c}" for c in self.cni_cache_files(*ids)]
        found += [f"shim socket {p}" for p in self.shim_sockets(*ids)]
        leases = os.path.join(self.cni_data_dir, self.network)
        if os.path.isdir(leases):
            found += [f"ipam lease {n}" for n in os.listdir(leases)
                      if n[0].isdigit() and n != "last_reserved_ip.0"]
        return found

    # Tear-down

    def _stop_daemon(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> List[str]:
        """Remove every pod through CRI (CNI DEL, netns), stop containerd, then remove
        by force whatever is left: shims, processes in the pods' cgroups, the cgroups,
        mounts, the bridge, CNI cache entries, the directory. Returns what had to be
        forced (empty when CRI cleaned up after itself)."""
        forced = []
        alive = self.proc is not None and self.proc.poll() is None
        if self.client is not None:
            if alive:
                forced += [f"cri: {e}" for e in self.client.cleanup(every_pod=True)]
            self.client.close()
            self.client = None
        self._stop_daemon()
        # The shims of the tasks CRI just deleted may still be on their way out.
        deadline = time.monotonic() + (5 if alive else 0)
        while self.shim_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        shims = self.shim_pids()
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        forced += [f"shim {p}" for p in shims]
        for _ in range(50):
            pids = self.cgroup_pids()
            if not pids:
                break
            forced += [f"process {p}" for p in pids if f"process {p}" not in forced]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for top in self.cgroup_dirs():
            for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        for point in sorted(self.mounts(), key=len, reverse=True):
            forced.append(f"mount {point}")
            subprocess.run(["umount", "-l", point], capture_output=True)
        if self.bridge and not self._bridge_existed \
                and os.path.exists(f"/sys/class/net/{self.bridge}"):
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for path in self.shim_sockets():  # the shims we killed could not remove them
            forced.append(f"shim socket {path}")
            with contextlib.suppress(OSError):
                os.unlink(path)
        for path in self.cni_cache_files():
            forced.append(f"cni cache {path}")
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not self._cni_cache_existed:  # libcni made it for us: remove it if empty
            for d in (os.path.join(CNI_CACHE_DIR, "results"), CNI_CACHE_DIR):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        shutil.rmtree(self.base, ignore_errors=True)
        return forced


@contextlib.contextmanager
def checked_containerd(rpc_timeout: Optional[float] = None):
    """A started CriContainerd; on the way out it is stopped, and must have left
    nothing and had to force nothing away (what it forced fails the caller)."""
    c = CriContainerd()
    c.start()
    if rpc_timeout is not None:
        c.client.rpc_timeout = rpc_timeout
    try:
        yield c
    finally:
        logs = c.log_tail()
        bridge = c.bridge
        forced = c.stop()
        assert not os.path.exists(c.base)
        assert not os.path.exists(f"/sys/class/net/{bridge}")
        assert not forced, f"clean-up had to force: {forced}\n{logs}"
