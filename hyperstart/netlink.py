"""The few rtnetlink requests the guest's network set-up makes, on one socket; the host
uses them too, for a pod's namespace (from a thread that entered it: runv_py/net).

busybox's `ip` cost a fork and an exec per step, about 10 ms each under TCG, five to seven
of them on every pod's start (and nsenter with iproute2 about 12 ms a step on the host).
pyroute2 would do this, but it is not in the initrd and its import alone costs more than
the steps it saves in a guest.
"""
import os
import struct

import _socket as socket

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_NET_NS_FD = 1, 3, 4, 28
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
ARPHRD_ETHER = 1
RTPROT_KERNEL = 2
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
HEADER = struct.Struct("=IHHII")        # nlmsghdr
IFINFO = struct.Struct("=BxHiII")       # ifinfomsg
IFADDR = struct.Struct("=BBBBi")        # ifaddrmsg
RTMSG = struct.Struct("=BBBBBBBBI")     # rtmsg


def attribute(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def parse_attributes(data: bytes, offset: int, end: int) -> dict:
    """{type: payload} of the rtattrs in ``data[offset:end]``."""
    attrs = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return attrs


class Netlink:
    """A NETLINK_ROUTE socket; each request waits for its acknowledgement, and a refusal
    raises OSError with the kernel's errno."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.settimeout(10.0)
        self.seq = 0

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _exchange(self, kind: int, flags: int, body: bytes) -> list:
        """Send one request; the messages answering it (type, message bytes) until its
        acknowledgement or the end of a dump. A refusal raises OSError."""
        self.seq += 1
        self.sock.send(HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | flags,
                                   self.seq, 0) + body)
        messages = []
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, mtype, _, seq, _ = HEADER.unpack_from(data, offset)
                if seq == self.seq:
                    if mtype == NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, offset + HEADER.size)[0]
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return messages
                    if mtype == NLMSG_DONE:
                        return messages
                    messages.append((mtype, data[offset:offset + length]))
                offset += max((length + 3) & ~3, HEADER.size)

    def request(self, kind: int, flags: int, body: bytes) -> None:
        self._exchange(kind, NLM_F_ACK | flags, body)

    def dump(self, kind: int, body: bytes) -> list:
        """The messages a dump request answers with: (type, message bytes) each."""
        return self._exchange(kind, NLM_F_DUMP, body)

    def links(self) -> list:
        """Every link: {"index", "name", "ethernet", "mac", "mtu"}."""
        links = []
        for _, msg in self.dump(RTM_GETLINK, IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _, kind, index, _, _ = IFINFO.unpack_from(msg, HEADER.size)
            attrs = parse_attributes(msg, HEADER.size + IFINFO.size, len(msg))
            links.append({"index": index, "ethernet": kind == ARPHRD_ETHER,
                          "name": attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                          "mac": ":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b"")),
                          "mtu": struct.unpack("=I", attrs[IFLA_MTU])[0]
                          if IFLA_MTU in attrs else 1500})
        return links

    def addresses(self, family: int = socket.AF_INET) -> list:
        """(link index, address, prefix length) of every address of ``family``."""
        found = []
        for _, msg in self.dump(RTM_GETADDR, IFADDR.pack(family, 0, 0, 0, 0)):
            fam, prefix, _, _, index = IFADDR.unpack_from(msg, HEADER.size)
            attrs = parse_attributes(msg, HEADER.size + IFADDR.size, len(msg))
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if fam == family and raw:
                found.append((index, socket.inet_ntop(family, raw), prefix))
        return found

    def routes(self, family: int = socket.AF_INET) -> list:
        """The main table's unicast routes that a program or a person added (not the
        kernel's own): {"dest" ("default", an address or "a.b.c.d/n"), "gateway", "oif"}."""
        found = []
        for _, msg in self.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dst_len, _, _, table, protocol, _, kind, _ = RTMSG.unpack_from(msg, HEADER.size)
            attrs = parse_attributes(msg, HEADER.size + RTMSG.size, len(msg))
            if RTA_TABLE in attrs:
                table = struct.unpack("=I", attrs[RTA_TABLE])[0]
            if fam != family or table != RT_TABLE_MAIN or kind != RTN_UNICAST or \
                    protocol == RTPROT_KERNEL:
                continue
            dest = "default"
            if RTA_DST in attrs:
                dest = socket.inet_ntop(family, attrs[RTA_DST])
                if dst_len != (32 if family == socket.AF_INET else 128):
                    dest += f"/{dst_len}"
            gateway = socket.inet_ntop(family, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else ""
            oif = struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0
            found.append({"dest": dest, "gateway": gateway, "oif": oif})
        return found

    def set_link(self, index: int, up: bool = None, name: str = "", mac: str = "",
                 mtu: int = 0, netns_fd: int = -1) -> None:
        """Change what is given of link ``index``: up or down, name, MAC, MTU, or the
        network namespace it is in (an fd of it)."""
        attrs = b""
        if netns_fd >= 0:
            attrs += attribute(IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
        if name:
            attrs += attribute(IFLA_IFNAME, name.encode() + b"\0")
        if mac:
            attrs += attribute(IFLA_ADDRESS, bytes(int(x, 16) for x in mac.split(":")))
        if mtu:
            attrs += attribute(IFLA_MTU, struct.pack("=I", mtu))
        change = 0 if up is None else IFF_UP
        body = IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change)
        self.request(RTM_NEWLINK, 0, body + attrs)

    def add_address(self, index: int, address: str, prefix: int) -> None:
        family = family_of(address)
        packed = socket.inet_pton(family, address)
        body = IFADDR.pack(family, prefix, 0, RT_SCOPE_UNIVERSE, index)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                     body + attribute(IFA_LOCAL, packed) + attribute(IFA_ADDRESS, packed))

    def add_route(self, dest: str, gateway: str = "", device: str = "") -> None:
        """``dest`` is "default", an address or a network "a.b.c.d/n"; a route without a
        gateway is a link-scope one, as `ip route add` makes it."""
        network, _, prefix = ("" if dest == "default" else dest).partition("/")
        family = family_of(network or gateway or "0.0.0.0")
        bits = 32 if family == socket.AF_INET else 128
        dst_len = int(prefix) if prefix else (bits if network else 0)
        attrs = b""
        if network:
            attrs += attribute(RTA_DST, socket.inet_pton(family, network))
        if gateway:
            attrs += attribute(RTA_GATEWAY, socket.inet_pton(family, gateway))
        if device:
            attrs += attribute(RTA_OIF, struct.pack("=i", socket.if_nametoindex(device)))
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope,
                          RTN_UNICAST, 0)
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body + attrs)
