"""What runv-py supports, as runc's `features` JSON (opencontainers/runtime-spec's
features document): the hooks, mount options, namespaces, capabilities, cgroup
hierarchies and seccomp it applies."""
from .. import __version__
from ..hyperstart.rootfs import MOUNT_FLAGS, PROPAGATION
from ..hyperstart.security import CAPABILITIES
from .hooks import KINDS
from .state import OCI_VERSION

SECCOMP_ARCHS = ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64",
                 "SCMP_ARCH_ARM"]


def features() -> dict:
    from ..hyperstart import seccomp
    doc = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": list(KINDS),
        "mountOptions": sorted(set(MOUNT_FLAGS) | set(PROPAGATION) | {"tmpcopyup"}),
        "linux": {
            # Every container gets these of its own in the VM (a cgroup namespace too); its
            # network namespace is the VM's, shared by the containers of a sandbox.
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": [f"CAP_{name}" for name in CAPABILITIES],
            # cgroupsPath on the host: either hierarchy, cleaned as runc does; systemd-style
            # paths are made as cgroupfs directories (runv-py does not talk to systemd).
            # What the host cgroup holds: the annotations io.github.runv-py.hostCgroup.*.
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": sorted(seccomp.ACTIONS),
                        "operators": sorted(seccomp.COMPARE), "archs": SECCOMP_ARCHS},
            # The guest kernel has no LSM: profiles and labels are not applied.
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {"io.github.runv-py.version": __version__,
                        "io.github.runv-py.isolation": "vm",
                        # runc's key: checkpoint and restore work, of a whole VM, for
                        # containers created with the annotation below set to "true".
                        "org.opencontainers.runc.checkpoint.enabled": "true",
                        "io.github.runv-py.checkpoint": "true: the container's files in "
                                                        "guest memory, its VM checkpointable"},
    }
    from ..host.cglimits import rules
    from .resources import VM_MEMORY_OVERHEAD_MIB
    for kind, rule in rules(VM_MEMORY_OVERHEAD_MIB).items():
        doc["annotations"][f"io.github.runv-py.hostCgroup.{kind}"] = rule
    version = seccomp.library_version()
    if version:
        doc["annotations"]["io.github.seccomp.libseccomp.version"] = version
    return doc
