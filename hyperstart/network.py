"""The guest's network: what SETUPINTERFACE and SETUPROUTE ask for, done over rtnetlink
(netlink.py), RESETNETWORK with busybox's `ip` (in the initrd), and the loopback brought
up at boot with one ioctl."""
import fcntl
import os
import struct

import _socket as socket

from .errors import Internal, NotFound
from .netlink import Netlink
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
    index = socket.if_nametoindex(name)
    new_name = msg.new_device_name if msg.new_device_name != name else ""
    mac = msg.mac if msg.mac and msg.mac.lower() != msg.device.lower() else ""
    with Netlink() as nl:
        step = f"link {name}"
        try:
            if new_name or mac:  # neither changes on a link that is up
                nl.set_link(index, up=False)
            nl.set_link(index, name=new_name, mac=mac, mtu=msg.mtu)
            name = new_name or name
            for address in msg.ip_addresses:
                step = f"address {address.ip_address}/{address.net_mask} on {name}"
                nl.add_address(index, address.ip_address, int(address.net_mask))
            step = f"link {name} up"
            nl.set_link(index, up=True)
        except (OSError, ValueError) as e:
            raise Internal(f"{step}: {e}") from None


def reset() -> None:
    """Every NIC down, without addresses or routes (a restored VM's old network)."""
    for name in sorted(os.listdir("/sys/class/net")):
        if name != "lo":
            ip("link", "set", "dev", name, "down")
            ip("addr", "flush", "dev", name)


def setup_routes(msg) -> None:
    """Routes without a gateway first: a gateway must be reachable when its route is
    added, or the kernel says "Network unreachable"."""
    with Netlink() as nl:
        for route in sorted(msg.routes, key=lambda r: bool(r.gateway)):
            try:
                nl.add_route(route.dest or "default", route.gateway, route.device)
            except (OSError, ValueError) as e:
                via = f" via {route.gateway}" if route.gateway else ""
                raise Internal(f"route {route.dest or 'default'}{via}: {e}") from None
