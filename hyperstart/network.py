"""The guest's network: what SETUPINTERFACE and SETUPROUTE ask for, done with busybox's
`ip` (in the initrd), and the loopback brought up at boot with one ioctl."""
import fcntl
import os
import struct

import _socket as socket

from .errors import Internal, NotFound
from .spawn import read_all

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
BUSYBOX = "/bin/busybox"
NOBODY = 65534


def loopback_up() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        sock.close()


def ip(*args: str) -> None:
    """Run busybox's `ip` and wait for it; its failure becomes an error with its words."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(write_end, 2)
            os.execv(BUSYBOX, ["ip", *args])
        finally:
            os._exit(127)
    os.close(write_end)
    said = read_all(read_end)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise Internal(f"ip {' '.join(args)}: {said.decode(errors='replace').strip()}")


def forward(stdio: tuple, port: int) -> int:
    """Start busybox's nc to 127.0.0.1:``port`` with ``stdio`` (the child's ends, closed
    here), as nobody with no capabilities; its pid. nc half-closes the connection at the
    end of its stdin and exits at the end of the connection."""
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdio[0], 0)
            os.dup2(stdio[1], 1)
            os.dup2(os.open("/dev/null", os.O_WRONLY), 2)  # not into the connection
            os.setsid()
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)  # drops every capability too
            os.closerange(3, 65536)
            os.execv(BUSYBOX, ["nc", "127.0.0.1", str(port)])
        finally:
            os._exit(127)
    for fd in set(stdio):
        os.close(fd)
    return pid


def device_by_mac(mac: str) -> str:
    base = "/sys/class/net"
    for name in sorted(os.listdir(base)):
        try:
            with open(os.path.join(base, name, "address")) as f:
                if f.read().strip().lower() == mac.lower():
                    return name
        except OSError:
            continue
    raise NotFound(f"no network device with MAC {mac}")


def setup_interface(msg) -> None:
    name = device_by_mac(msg.device)
    if name != msg.new_device_name:
        ip("link", "set", "dev", name, "down")
        ip("link", "set", "dev", name, "name", msg.new_device_name)
        name = msg.new_device_name
    if msg.mac and msg.mac.lower() != msg.device.lower():
        ip("link", "set", "dev", name, "down")
        ip("link", "set", "dev", name, "address", msg.mac)
    ip("link", "set", "dev", name, "mtu", str(msg.mtu))
    for address in msg.ip_addresses:
        ip("addr", "add", f"{address.ip_address}/{address.net_mask}", "dev", name)
    ip("link", "set", "dev", name, "up")


def reset() -> None:
    """Every NIC down, without addresses or routes (a restored VM's old network)."""
    for name in sorted(os.listdir("/sys/class/net")):
        if name != "lo":
            ip("link", "set", "dev", name, "down")
            ip("addr", "flush", "dev", name)


def setup_routes(msg) -> None:
    """Routes without a gateway first: a gateway must be reachable when its route is
    added, or the kernel says "Network unreachable"."""
    for route in sorted(msg.routes, key=lambda r: bool(r.gateway)):
        args = ["route", "add", route.dest or "default"]
        if route.gateway:
            args += ["via", route.gateway]
        if route.device:
            args += ["dev", route.device]
        ip(*args)
