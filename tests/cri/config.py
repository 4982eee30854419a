"""The private containerd's config.toml (version 2, CRI plugin enabled) and its CNI
network (.conflist), from a CriContainerd's paths and settings."""
import json
import os
import shutil
from typing import Optional

CONTAINERD = "containerd"
CTR = "ctr"
CNI_BIN_DIR = "/usr/lib/cni"
SHIM_SOCKET_DIR = "/run/containerd/s"  # fixed in containerd 1.6's shim package
CNI_CACHE_DIR = "/var/lib/cni"  # libcni's default; containerd 1.6 has no setting for it
NAMESPACE = "k8s.io"  # CRI's containerd namespace
RUNC_HANDLER = "runc"
RUNVPY_HANDLER = "runvpy"
RUNVPY_RUNTIME_TYPE = "io.containerd.runvpy.v2"
PAUSE_IMAGE = "docker.io/runvpy/pause:test"
BUSYBOX_IMAGE = "docker.io/runvpy/busybox:test"

CRI = 'plugins."io.containerd.grpc.v1.cri"'
RUNTIMES = f"{CRI}.containerd.runtimes"


def containerd_toml(c) -> str:
    """``c``: a CriContainerd (its paths, handler names, sandbox image, options)."""
    runvpy_options = "".join(f"  {k} = {json.dumps(v)}\n" for k, v in c.runvpy_options.items())
    return f"""version = 2
root = "{c.root}"
state = "{c.state}"

[grpc]
  address = "{c.sock}"

[ttrpc]
  address = "{c.sock}.ttrpc"

[debug]
  level = "{c.log_level}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c.base}/opt"

[{CRI}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Lowering oom_score_adj is refused here, and CRI gives the sandbox -998: runc then
  # fails ("can't get final child's PID from pipe: EOF"). Clamp instead.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # The streaming server (exec/attach/port-forward URLs) on loopback only.
  enable_tls_streaming = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pod netns bind mounts under our state directory, not /var/run/netns.
  netns_mounts_under_state_dir = {str(c.netns_under_state_dir).lower()}
  max_container_log_line_size = 16384

[{CRI}.containerd]
  snapshotter = "native"
  default_runtime_name = "{RUNC_HANDLER}"

[{RUNTIMES}.{RUNC_HANDLER}]
  runtime_type = "io.containerd.runc.v2"

[{RUNTIMES}.{RUNC_HANDLER}.options]
  # runc's state (default /run/containerd/runc) stays ours too.
  Root = "{c.runc_root}"
  SystemdCgroup = false

[{RUNTIMES}.{RUNVPY_HANDLER}]
  runtime_type = "{RUNVPY_RUNTIME_TYPE}"
{runvpy_options}
[{CRI}.cni]
  # Debian's containernetworking-plugins; containerd's compiled default is /opt/cni/bin.
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{c.cni_conf_dir}"
  max_conf_num = 1
"""


def cni_conflist(c) -> dict:
    """A bridge of our own (the host side gets the subnet's first address: the host
    reaches pods directly), host-local IPAM with its own data directory, no
    masquerading, only the routes asked for; portmap for CRI's port mappings. CRI adds
    the loopback plugin by itself."""
    gateway = str(next(c.subnet.hosts()))
    return {
        "cniVersion": "1.0.0",
        "name": c.network,
        "plugins": [
            {"type": "bridge", "bridge": c.bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": c.cni_data_dir,
                      "ranges": [[{"subnet": str(c.subnet), "gateway": gateway}]],
                      "routes": list(c.routes)}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def missing_prerequisites() -> Optional[str]:
    """Why the CRI harness cannot run here, or None."""
    for tool in (CONTAINERD, CTR, "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install containerd iproute2)"
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        if not os.path.exists(os.path.join(CNI_BIN_DIR, plugin)):
            return (f"{CNI_BIN_DIR}/{plugin} is missing "
                    "(apt-get install containernetworking-plugins)")
    if os.geteuid() != 0:
        return "containerd's CRI plugin needs root"
    return None
