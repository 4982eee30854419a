"""Typed payloads of the hyperstart control channel, shared by the host and the agent.

Each command has a request class (carrying its code) and, where it answers more than an
empty ACK, a reply class. Both ends build and read these classes; on the wire they are
hyperstart's JSON objects with camelCase keys (``share_tag`` is ``shareTag``). The
``@message`` machinery is in typed.py.
"""
from __future__ import annotations

from . import protocol as p
from .errors import INTERNAL
from .typed import REQUESTS, decode, encode, message  # noqa: F401  (the module's API)


# ---- parts ----------------------------------------------------------------------------

@message()
class ConsoleSize:
    height: int = 0
    width: int = 0


@message()
class User:
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = []
    umask: int | None = None


@message()
class Rlimit:
    type: str
    soft: int
    hard: int


@message()
class Capabilities:
    bounding: list[str] | None = None
    effective: list[str] | None = None
    inheritable: list[str] | None = None
    permitted: list[str] | None = None
    ambient: list[str] | None = None


@message()
class ProcessSpec:
    """One process to run in a container, with the stream sequences of its stdio."""
    id: str
    args: list[str]
    env: list[str] = []
    cwd: str = "/"
    terminal: bool = False
    user: User = User
    rlimits: list[Rlimit] = []
    no_new_privileges: bool = False
    capabilities: Capabilities | None = None
    console_size: ConsoleSize | None = None
    oom_score_adj: int | None = None
    stdio: int = 0       # stream sequence of stdin and stdout (0: /dev/null)
    stderr: int = 0      # stream sequence of stderr (0: with stdout)


@message()
class Mount:
    destination: str
    type: str = ""
    source: str = ""
    options: list[str] = []
    shared: bool = False     # source is a path inside the sandbox's share
    # source is a pod volume: a path inside the share's volumes/, bound once per sandbox
    # for every container that asks for it with propagation, and bound in the guest from
    # one shared mount, so that mounts propagate between the pod's containers.
    volume: bool = False


@message()
class Device:
    """A device node to make in the container's /dev (OCI linux.devices)."""
    path: str
    type: str                # c, b, u or p
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@message()
class DeviceRule:
    """One rule of the device cgroup (OCI linux.resources.devices), in order."""
    allow: bool
    type: str = "a"          # a, c or b
    major: int | None = None  # None: any
    minor: int | None = None
    access: str = "rwm"


@message()
class IpAddress:
    ip_address: str
    net_mask: str            # a prefix length ("24"), as runV sends it


@message()
class Route:
    dest: str                # "default" or a CIDR
    gateway: str = ""
    device: str = ""


@message()
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    uid: int
    rss_kb: int
    cmd: str
    nspid: int


# ---- replies --------------------------------------------------------------------------

@message()
class PidReply:
    pid: int


@message()
class VersionReply:
    version: int


@message()
class FileData:
    data: str = ""           # base64


@message()
class ProcessListReply:
    processes: list[ProcessInfo] = []


@message(code=p.ERROR)
class ErrorReply:
    message: str
    code: str = INTERNAL     # an errors.* code: the host raises the matching class


@message(code=p.PROCESSASYNCEVENT)
class ProcessExited:
    """Sent unasked once a process has exited and its output has drained."""
    container: str
    process: str
    status: int
    event: str = "finished"
    oom: bool = False
    signal: int = 0          # the signal that ended it (0: it exited); status is 128+signal


# ---- commands -------------------------------------------------------------------------

@message(code=p.GETVERSION, reply=VersionReply)
class GetVersion:
    pass


@message(code=p.PING)
class Ping:
    pass


@message(code=p.STARTPOD)
class StartPod:
    hostname: str = ""
    share_tag: str = ""      # mount the sandbox's share with this tag
    share_kind: str = "9p"   # 9p or virtiofs


@message(code=p.DESTROYPOD)
class DestroyPod:
    pass


@message(code=p.NEWCONTAINER, reply=PidReply)
class NewContainer:
    id: str
    rootfs: str              # relative to the share, or absolute in the guest
    process: ProcessSpec
    readonly: bool = False
    hostname: str = ""
    mounts: list[Mount] = []
    limits: dict[str, str] = {}   # cgroup v2 file name -> value
    wait: bool = False       # set up, then hold the process until StartContainer
    # The rest of OCI's linux section, applied in the container as runc applies it.
    domainname: str = ""
    masked_paths: list[str] = []
    readonly_paths: list[str] = []
    sysctl: dict[str, str] = {}
    devices: list[Device] = []
    device_rules: list[DeviceRule] = []
    rootfs_propagation: str = ""
    seccomp: dict | None = None   # OCI linux.seccomp, compiled in the guest by libseccomp
    # Namespaces joined rather than made: type (ipc, uts, pid) -> the container whose
    # init's namespace it is (a pod's sandbox container).
    share: dict[str, str] = {}
    # The rootfs and the files bound from the share are copied into guest memory, and
    # the container's mounts hold nothing of the share: the VM can be checkpointed.
    rootfs_in_guest: bool = False


@message(code=p.STARTCONTAINER)
class StartContainer:
    container: str


@message(code=p.EXECCMD, reply=PidReply)
class ExecCmd:
    container: str
    process: ProcessSpec


@message(code=p.KILLCONTAINER)
class KillContainer:
    container: str
    signal: int = 15
    all: bool = False


@message(code=p.SIGNALPROCESS)
class SignalProcess:
    container: str
    process: str
    signal: int = 15


@message(code=p.REMOVECONTAINER)
class RemoveContainer:
    container: str


@message(code=p.WINSIZE)
class WinSize:
    seq: int
    row: int
    column: int


@message(code=p.WRITEFILE)
class WriteFile:
    container: str
    file: str
    data: str = ""           # base64
    cgroup: bool = False     # file names the container's cgroup file


@message(code=p.READFILE, reply=FileData)
class ReadFile:
    container: str
    file: str
    cgroup: bool = False


@message(code=p.PROCESSLIST, reply=ProcessListReply)
class ProcessList:
    container: str


@message(code=p.RESEED)
class Reseed:
    data: str = ""           # base64 entropy
    hostname: str = ""
    time_ns: int = 0         # the host's wall clock: a VM that waited stopped lags behind


@message(code=p.STREAMCLOSED)
class StreamClosed:
    seq: int


@message(code=p.FORWARDPORT, reply=PidReply)
class ForwardPort:
    """A TCP connection to ``port`` on the guest's loopback (the pod's: its containers
    share the guest's network), its bytes both ways on stream ``stdio``. It ends as a
    process ``id`` of ``container`` (a ProcessExited) when the guest side closes."""
    container: str
    id: str
    port: int
    stdio: int


@message(code=p.SETUPINTERFACE)
class SetupInterface:
    """Configure the guest NIC with MAC ``device`` (hyperstart names it by its guest name;
    the host knows only the MAC it gave it) as the pod's interface ``new_device_name``."""
    device: str
    new_device_name: str
    ip_addresses: list[IpAddress] = []
    mtu: int = 1500
    mac: str = ""          # a MAC to take first (a pooled VM's NIC becomes the veth's)


@message(code=p.SETUPROUTE)
class SetupRoute:
    routes: list[Route] = []


@message(code=p.RELEASESHARE)
class ReleaseShare:
    """Unmount the sandbox's share in the guest: QEMU 7.2 will not save a VM while its
    guest has a 9p share mounted. Refused while anything uses it."""


@message(code=p.RESETNETWORK)
class ResetNetwork:
    """Drop the addresses and routes of every NIC: a restored VM takes its new
    network's (SetupInterface, SetupRoute follow)."""


@message(code=p.RENAMECONTAINER)
class RenameContainer:
    """A restored container: it goes by ``new_id`` (podman's restore --name), its UTS
    namespace takes ``hostname`` (its new spec's) and it reads ``boot_id`` as its boot
    id, if they are given."""
    container: str
    new_id: str
    hostname: str = ""
    boot_id: str = ""


@message(code=p.WARMUP)
class WarmUp:
    """Run what a pod's start runs in the guest's kernel, once, in a child thrown away
    (hyperstart/warmup.py): a ready clone's translation cache is then warm."""


@message(code=p.ONLINECPUMEM)
class OnlineCpuMem:
    """Bring the guest up to ``cpus`` online CPUs and ``memory_mib`` of memory (the VM
    has them already, offline: hyperstart's ONLINECPUMEM, with the targets given)."""
    cpus: int
    memory_mib: int
