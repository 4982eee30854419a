"""The QEMU driver: builds QEMU's command line, launches and supervises it, talks QMP.

One VM is one QEMU process on ``-machine microvm`` with the guest kernel booted as an
uncompressed PVH vmlinux. The agent's two virtio-serial ports, QMP and the serial console
live as files in the VM's directory; QEMU runs with that directory as its working
directory so socket paths stay short whatever the container id.
"""
import dataclasses
import logging
import os
import subprocess

from . import DriverError, jail, terminate, virtfs_proxy, virtiofs
from .qemu_vm import (CONSOLE_LOG, CONTROL_SOCKET, QEMU_LOG, QMP_SOCKET, SHARE_TAG,
                      STREAM_SOCKET, QemuVM)

log = logging.getLogger("runv_py.drivers.qemu")



def host_tsc_khz() -> int:
    """The host's TSC rate. Under TCG the guest TSC follows the host's, and telling the
    guest its rate avoids the calibration that hung 1 boot in 8 here."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


def share_kind(config, memory_file: str = "") -> str:
    """The share a VM gets: virtio-fs if asked for, except for a VM whose RAM is a
    template's file (vhost-user cannot serve a clone's private copy of it)."""
    return "virtiofs" if config.share == "virtiofs" and not memory_file else "9p"


# The TCG translation cache, in MiB. QEMU 7.2 reserves 1 GiB by default and a small
# guest filled about 46 MiB of it. Below 32 MiB retranslation shows: a cold boot took
# 15% longer at 16 and twice as long at 8; a clone's `run true` 27% longer at 16.
TB_SIZE_MIB = int(os.environ.get("RUNV_TB_SIZE", "32"))


class QemuDriver:
    supports_templates = True

    def __init__(self, qemu: str, accel: str, reason: str):
        self.qemu = qemu
        self.accel = accel
        self.reason = reason
        self.name = "kvm" if accel == "kvm" else "qemu-tcg"

    def describe(self) -> dict:
        return {"driver": self.name, "hypervisor": "qemu", "binary": self.qemu,
                "accelerator": self.accel, "reason": self.reason}

    def kernel_cmdline(self, config) -> str:
        # no_timer_check: the IO-APIC timer test waits for 4 ticks, and a TCG guest on a
        # busy host missed them and panicked (setup_IO_APIC, seen with 5 boots at once).
        args = ["console=ttyS0", "reboot=t", "panic=-1", "rdinit=/init", "no_timer_check",
                "loglevel=7" if config.debug else "quiet"]
        if self.accel == "tcg":
            khz = host_tsc_khz()
            if khz:
                args.append(f"tsc_early_khz={khz}")
            # TCG's vCPUs read one virtual clock: without this the guest distrusts its
            # TSC, falls back to jiffies, and every vCPU ticks at HZ even when idle (an
            # idle 2-vCPU VM took 6.6% of a host CPU; 0.1% with it).
            args.append("tsc=reliable")
        # Room to grow (a pod's VM): the VM has the maximum, the guest starts on less and
        # onlines the rest when told (ONLINECPUMEM).
        if config.max_cpus > config.cpus:
            args.append(f"maxcpus={config.cpus}")
        if config.max_memory_mib > config.memory_mib:
            args.append(f"mem={config.memory_mib}M")
        return " ".join(args + list(config.extra_cmdline))

    def command(self, config, name: str, share_dir: str, memory_file: str = "",
                shared_memory: bool = False, incoming: bool = False, nics=(),
                jailed: bool = False, proxy_fd: int = -1) -> list:
        """QEMU's command line. A ``jailed`` QEMU runs under its seccomp sandbox; with
        ``proxy_fd`` its 9p share is served by virtfs-proxy-helper over that socket."""
        machine = "microvm,acpi=off,rtc=on,pit=on,pic=on,isa-serial=on"
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
                ["-accel", f"tcg,thread=multi,tb-size={TB_SIZE_MIB}"]
        cmd = [self.qemu, "-name", f"runv-py:{name}", *accel,
               "-smp", str(max(config.cpus, config.max_cpus)),
               "-m", f"{max(config.memory_mib, config.max_memory_mib)}M",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               # An incoming VM (a template's clone) never boots: its RAM holds the
               # kernel already, and loading 30 MB of boot files would cost time and memory.
               *([] if incoming else ["-kernel", config.kernel, "-initrd", config.initrd,
                                      "-append", self.kernel_cmdline(config)]),
               "-serial", f"file:{CONSOLE_LOG}",
               "-device", "virtio-serial-device,max_ports=4",
               "-chardev", f"socket,id=ctl,path={CONTROL_SOCKET},server=on,wait=off",
               "-device", "virtserialport,chardev=ctl,name=sh.hyper.channel.0",
               "-chardev", f"socket,id=stream,path={STREAM_SOCKET},server=on,wait=off",
               "-device", "virtserialport,chardev=stream,name=sh.hyper.channel.1",
               "-object", "rng-random,id=rng0,filename=/dev/urandom",
               "-device", "virtio-rng-device,rng=rng0",
               # The guest reports the memory it frees (the unpacked initramfs archive,
               # dropped caches) and QEMU gives it back to the host. Not where the RAM is
               # a template's file: QEMU 7.2 punches the reported pages out of the file
               # itself, under every other clone (a template and its clones must agree).
               "-device", "virtio-balloon-device,free-page-reporting="
                          f"{'off' if memory_file else 'on'}",
               "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]
        if share_kind(config, memory_file) == "virtiofs":
            args, memory_option = virtiofs.qemu_args(
                SHARE_TAG, max(config.memory_mib, config.max_memory_mib))
            cmd += args
            machine += memory_option
        elif proxy_fd >= 0:
            cmd += virtfs_proxy.qemu_args(proxy_fd, SHARE_TAG)
        else:
            cmd += ["-fsdev", f"local,id=share,path={share_dir},security_model=passthrough,"
                              "multidevs=remap",
                    "-device", f"virtio-9p-device,fsdev=share,mount_tag={SHARE_TAG}"]
        if memory_file:
            # Guest RAM in a file: shared by a template, a private copy-on-write map for a clone.
            size = max(config.memory_mib, config.max_memory_mib)  # as -m: room to grow too
            cmd += ["-object", f"memory-backend-file,id=mem0,size={size}M,"
                               f"mem-path={memory_file},share={'on' if shared_memory else 'off'}"]
            machine += ",memory-backend=mem0"
        for i, nic in enumerate(nics):
            # The tap is opened in the pod's namespace; QEMU gets its fd (vhost off: TCG).
            cmd += ["-netdev", f"tap,id=net{i},fd={nic.fd},vhost=off",
                    "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]
        if incoming:
            cmd += ["-incoming", "defer"]
        if jailed:
            cmd += ["-sandbox", jail.QEMU_SANDBOX]
        cmd += ["-machine", machine]
        return cmd

    def launch(self, config, workdir: str, name: str, share_dir: str, memory_file: str = "",
               shared_memory: bool = False, incoming: bool = False, network=None,
               detached: bool = False) -> "QemuVM":
        """Start QEMU for ``config`` in ``workdir``; returns at once (the guest boots).
        A ``detached`` VM (the node factory's) does not die with the launching thread:
        its owner changes after it has booted. QEMU runs in its jail (host/jail.py)
        unless the jail is turned off."""
        for path, what in ((config.kernel, "guest kernel"), (config.initrd, "initrd")):
            if not os.path.isfile(path):
                raise DriverError(f"{what} {path} not found (run 'runv-py setup' or pass "
                                  f"--{'kernel' if what == 'guest kernel' else 'initrd'})")
        os.makedirs(workdir, exist_ok=True)
        for stale in (CONTROL_SOCKET, STREAM_SOCKET, QMP_SOCKET):
            try:
                os.unlink(os.path.join(workdir, stale))
            except FileNotFoundError:
                pass
        share = share_kind(config, memory_file)
        if share != config.share:
            log.info("%s shares over 9p, not virtio-fs: its RAM is a template's file, and "
                     "vhost-user cannot serve a clone's private copy of it", name)
        jailed = jail.enabled()
        share_dir = os.path.abspath(share_dir)
        proxy_end = None
        if share == "virtiofs":
            server = virtiofs.start(share_dir, workdir, detached, jailed)
        elif jailed:  # QEMU cannot serve a container's files without root: a helper does
            server, proxy_end = virtfs_proxy.start(share_dir, workdir, detached)
        else:
            server = None
        try:
            nics = network.attach() if network is not None else []
            fds = [n.fd for n in nics] + ([proxy_end.fileno()] if proxy_end else [])
            try:
                proc = self._spawn(config, workdir, name, share_dir, memory_file,
                                   shared_memory, incoming, nics, detached, jailed,
                                   proxy_end.fileno() if proxy_end else -1,
                                   getattr(network, "netns", ""), fds)
            finally:
                if network is not None:
                    network.close_fds()
                if proxy_end is not None:
                    proxy_end.close()
        except BaseException:
            if server is not None:
                terminate(server)
            raise
        if incoming:
            # A clone is driven over QMP at once: load the client while QEMU starts.
            import qemu.qmp.legacy  # noqa: F401
        return QemuVM(self, proc, workdir, share, server)

    def _spawn(self, config, workdir, name, share_dir, memory_file, shared_memory, incoming,
               nics, detached, jailed, proxy_fd, netns, fds):
        if jailed:
            files = {} if incoming else {jail.INSIDE_KERNEL: config.kernel,
                                         jail.INSIDE_INITRD: config.initrd}
            if memory_file:
                files[jail.INSIDE_MEMORY] = memory_file
                memory_file = jail.INSIDE_MEMORY
            inside = dataclasses.replace(config, kernel=jail.INSIDE_KERNEL,
                                         initrd=jail.INSIDE_INITRD)
            cmd = self.command(inside, name, share_dir, memory_file, shared_memory, incoming,
                               nics, jailed=True, proxy_fd=proxy_fd)
            try:
                argv = jail.QemuJail(workdir, files, netns, not detached).argv(cmd)
            except OSError as e:
                raise DriverError(f"cannot set up QEMU's jail: {e}") from None
        else:
            cmd = self.command(config, name, share_dir, memory_file, shared_memory, incoming,
                               nics)
            argv = jail.tied_to_launcher(cmd, not detached)
        log.debug("launching %s", " ".join(cmd))
        with open(os.path.join(workdir, QEMU_LOG), "wb") as qlog:
            try:
                proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                        stdout=qlog, stderr=qlog, start_new_session=True,
                                        pass_fds=fds)
            except OSError as e:
                raise DriverError(f"cannot start {self.qemu}: {e}") from None
        return jail.JailedProcess(proc) if jailed else proc
