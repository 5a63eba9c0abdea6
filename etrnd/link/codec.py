"""Link, address and default-route messages to state's events, decoded with `struct`.

pyroute2's codec (the reference: tests/link/test_codec.py holds these decoders to its
answers for real kernel messages) spends 240-420 µs on one RTM_NEWLINK, whatever it is asked
for; a link-up brings several messages, each decoded on the loop before the round starts.
Reading just the fields the events carry takes ~7 µs (docs/architecture.md). Layouts:
linux/if_link.h, linux/if_addr.h, linux/rtnetlink.h.
"""

from __future__ import annotations

import os
import socket
import struct

from etrnd.link.rtnl import (
    NLM_F_REPLACE,
    NLMSGHDR,
    RTA,
    RTA_OIF,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMSG,
    Message,
)
from etrnd.link.state import AddrEvent, LinkEvent, RouteEvent

IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_EXPIRES = struct.Struct("=8xi")  # struct rta_cacheinfo: clntref, lastuse, expires (signed)
_HDR = NLMSGHDR.size
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
IFLA_IFNAME, IFLA_OPERSTATE, IFLA_LINKMODE = 3, 16, 17
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_CACHEINFO, RTA_TABLE, RTA_NH_ID = (
    5, 6, 9, 12, 15, 30)
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255
# RFC 2863 operstates by IF_OPER_* number, as pyroute2 names them.
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")
_LINK = frozenset({IFLA_IFNAME, IFLA_OPERSTATE, IFLA_LINKMODE})
_ADDR = frozenset({IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS})
_ROUTE = frozenset({RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_CACHEINFO,
                    RTA_TABLE, RTA_NH_ID})
_HOP = frozenset({RTA_GATEWAY})
_OIF = frozenset({RTA_OIF})
# rta_expires counts USER_HZ clock ticks (linux/rtnetlink.h: jiffies_to_clock_t).
CLK_TCK = os.sysconf("SC_CLK_TCK")


def attrs(data: bytes, offset: int, end: int, wanted: frozenset[int]) -> dict[int, bytes]:
    """The payloads of the `wanted` rtattrs in data[offset:end] (the first of each type)."""
    found: dict[int, bytes] = {}
    # A link's three come first of its ~50 (IFLA_STATS64, IFLA_AF_SPEC...): stop there.
    while offset + 4 <= end and len(found) < len(wanted):
        length, kind = RTA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            break
        kind &= NLA_TYPE_MASK
        if kind in wanted and kind not in found:
            found[kind] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def _u32(raw: bytes | None) -> int:
    return _U32.unpack(raw[:4])[0] if raw and len(raw) >= 4 else 0


def _ip(family: int, raw: bytes | None) -> str | None:
    if not raw:
        return None
    try:
        return socket.inet_ntop(family, raw)
    except ValueError:
        return None


def link(msg: Message) -> LinkEvent:
    """RTM_NEWLINK/RTM_DELLINK: ifinfomsg, IFLA_IFNAME, IFLA_OPERSTATE, IFLA_LINKMODE."""
    data = msg.data
    _, _, index, flags, _ = IFINFOMSG.unpack_from(data, _HDR)
    found = attrs(data, _HDR + IFINFOMSG.size, len(data), _LINK)
    name = found.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    oper = found.get(IFLA_OPERSTATE)
    operstate = OPERSTATES[oper[0]] if oper and oper[0] < len(OPERSTATES) else ""
    mode = found.get(IFLA_LINKMODE)
    return LinkEvent(index=index, name=name, flags=flags, operstate=operstate,
                     deleted=msg.type == RTM_DELLINK, linkmode=mode[0] if mode else 0)


def addr(msg: Message) -> AddrEvent:
    """RTM_NEWADDR/RTM_DELADDR. IFA_LOCAL is our end of a point-to-point IPv4 link (IFA_ADDRESS
    is then the peer); IFA_FLAGS holds the flags that do not fit ifa_flags' 8 bits."""
    data = msg.data
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(data, _HDR)
    found = attrs(data, _HDR + IFADDRMSG.size, len(data), _ADDR)
    raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS) or b""
    address = _ip(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw) or ""
    if IFA_FLAGS in found:
        flags = _u32(found[IFA_FLAGS])
    return AddrEvent(index=index, family=family, address=address, prefixlen=prefixlen,
                     flags=flags, scope=scope, deleted=msg.type == RTM_DELADDR)


def route(msg: Message, now: float | None = None) -> RouteEvent | None:
    """A RouteEvent for a unicast default route outside the local table, else None.

    `now` (clock time of the message) turns a lifetime (RTA_CACHEINFO rta_expires, ticks
    left; negative once run out) into RouteEvent.expires; without it, or without a lifetime,
    expires is None (the route never expires).
    """
    data = msg.data
    family, dst_len, _, _, rtm_table, _, _, rtm_type, _ = RTMSG.unpack_from(data, _HDR)
    if dst_len != 0 or rtm_type != RTN_UNICAST:
        return None
    found = attrs(data, _HDR + RTMSG.size, len(data), _ROUTE)
    table = _u32(found.get(RTA_TABLE)) or rtm_table
    if table == RT_TABLE_LOCAL:
        return None
    gateway = _ip(family, found.get(RTA_GATEWAY))
    oif = _u32(found.get(RTA_OIF))
    oifs: tuple[int, ...] = (oif,) if oif else ()
    gateways: tuple[str | None, ...] = (gateway,) if oif else ()
    hops = found.get(RTA_MULTIPATH) or b""
    at = 0
    while at + RTNEXTHOP.size <= len(hops):
        length, _, _, ifindex = RTNEXTHOP.unpack_from(hops, at)
        if length < RTNEXTHOP.size or at + length > len(hops):
            break
        hop_gw = _ip(family, attrs(hops, at + RTNEXTHOP.size, at + length, _HOP)
                     .get(RTA_GATEWAY))
        oifs += (ifindex,)
        gateways += (hop_gw,)
        gateway = gateway or hop_gw
        at += (length + 3) & ~3
    cache = found.get(RTA_CACHEINFO)
    ticks = _EXPIRES.unpack_from(cache)[0] if cache and len(cache) >= _EXPIRES.size else 0
    return RouteEvent(family=family, oifs=oifs, gateway=gateway, table=table,
                      priority=_u32(found.get(RTA_PRIORITY)),
                      deleted=msg.type == RTM_DELROUTE, gateways=gateways,
                      nhid=_u32(found.get(RTA_NH_ID)) or None,
                      replace=msg.type == RTM_NEWROUTE and bool(msg.flags & NLM_F_REPLACE),
                      expires=None if not ticks or now is None else now + ticks / CLK_TCK)


def route_oif(msg: Message) -> int:
    """The output interface of an RTM_NEWROUTE answer (an RTM_GETROUTE's), 0 for none."""
    return _u32(attrs(msg.data, _HDR + RTMSG.size, len(msg.data), _OIF).get(RTA_OIF))


def decode(msg: Message, now: float | None = None) -> LinkEvent | AddrEvent | RouteEvent | None:
    """The event of a link, address or route message; None for any other message (and for a
    route that is no unicast default route)."""
    mtype = msg.type
    if mtype in (RTM_NEWLINK, RTM_DELLINK):
        return link(msg)
    if mtype in (RTM_NEWADDR, RTM_DELADDR):
        return addr(msg)
    if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
        return route(msg, now)
    return None


__all__ = ["CLK_TCK", "OPERSTATES", "addr", "attrs", "decode", "link", "route", "route_oif"]
