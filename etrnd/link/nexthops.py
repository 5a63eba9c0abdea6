"""Nexthop objects and RTA_NH_ID for pyroute2 0.9.7, which decodes neither."""

from __future__ import annotations

import struct
from typing import Any

from etrnd.link.rtnl import NetlinkError, nlmsg, rtmsg
from etrnd.link.state import NexthopEvent

RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
# RTNLGRP_NEXTHOP is group 32: bit 31 of the legacy bind() mask.
RTMGRP_NEXTHOP = 1 << 31
_GRP = struct.Struct("=IBBH")  # struct nexthop_grp: id, weight, weight_high, reserved


class nhmsg(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """struct nhmsg and its NHA_* attributes, as far as a watcher needs them."""

    fields = (("family", "B"), ("scope", "B"), ("protocol", "B"), ("resvd", "B"),
              ("flags", "I"))
    nla_map = (
        ("NHA_UNSPEC", "none"),
        ("NHA_ID", "uint32"),
        ("NHA_GROUP", "cdata"),
        ("NHA_GROUP_TYPE", "uint16"),
        ("NHA_BLACKHOLE", "flag"),
        ("NHA_OIF", "uint32"),
        ("NHA_GATEWAY", "target"),
        ("NHA_ENCAP_TYPE", "uint16"),
        ("NHA_ENCAP", "cdata"),
        ("NHA_GROUPS", "flag"),
        ("NHA_MASTER", "uint32"),
        ("NHA_FDB", "flag"),
    )


class rtmsg_nh(rtmsg):  # type: ignore[misc]
    """rtmsg plus the attributes up to RTA_NH_ID (30): a route by nexthop object."""

    # pyroute2 compiles nla_map once per class but keeps the "compiled" mark in a class
    # attribute that a subclass inherits: without these, rtmsg's table would be used.
    _nlmsg_base__compiled_nla = False
    _nlmsg_base__t_nla_map = None
    _nlmsg_base__r_nla_map = None

    nla_map = (*rtmsg.nla_map,
               ("RTA_PAD", "hex"),
               ("RTA_UID", "uint32"),
               ("RTA_TTL_PROPAGATE", "uint8"),
               ("RTA_IP_PROTO", "uint8"),
               ("RTA_SPORT", "uint16"),
               ("RTA_DPORT", "uint16"),
               ("RTA_NH_ID", "uint32"))


def register(ipr: Any) -> None:
    """Teach one pyroute2 socket to decode nexthop messages and RTA_NH_ID."""
    ipr.register_policy({RTM_NEWNEXTHOP: nhmsg, RTM_DELNEXTHOP: nhmsg, RTM_GETNEXTHOP: nhmsg,
                         24: rtmsg_nh, 25: rtmsg_nh, 26: rtmsg_nh})


def group_ids(raw: bytes | str | None) -> tuple[int, ...]:
    """The member ids of an NHA_GROUP attribute (an array of struct nexthop_grp)."""
    if not raw:
        return ()
    data = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
    usable = len(data) - len(data) % _GRP.size
    return tuple(_GRP.unpack_from(data, off)[0] for off in range(0, usable, _GRP.size))


def to_nexthop(msg: Any, deleted: bool) -> NexthopEvent:
    oif = msg.get("NHA_OIF")
    gateway = msg.get("NHA_GATEWAY")
    return NexthopEvent(id=int(msg.get("NHA_ID") or 0), oif=int(oif) if oif else None,
                        gateway=str(gateway) if gateway else None,
                        group=group_ids(msg.get("NHA_GROUP")), deleted=deleted)


async def dump(ipr: Any) -> tuple[NexthopEvent, ...]:
    """Every nexthop object; () where the kernel has none (older than 5.3, or refused)."""

    try:
        reply = await ipr.nlm_request(nhmsg(), RTM_GETNEXTHOP)
        msgs = [m async for m in reply]
    except NetlinkError:
        return ()
    return tuple(to_nexthop(m, False) for m in msgs
                 if m["header"]["type"] == RTM_NEWNEXTHOP)
