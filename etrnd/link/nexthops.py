"""Nexthop objects (`ip nexthop`), decoded by pyroute2's codec, imported only once one exists.

Most machines have no nexthop object (iproute2 and the kernel make routes with their hops
inline), so the dump at start is empty and pyroute2 (~20 ms of imports with its package
`__init__` skipped, ~100 ms with it) is not loaded; nor are nexthop messages on the link-up
path. pyroute2 0.9.7 has no nhmsg: it is declared here on its nlmsg base.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
import sys
import types
from typing import Any

from etrnd.link.rtnl import (
    RTM_DELNEXTHOP,
    RTM_GETNEXTHOP,
    RTM_NEWNEXTHOP,
    Message,
    NetlinkError,
    Rtnl,
)
from etrnd.link.state import NexthopEvent

# RTNLGRP_NEXTHOP is group 32: bit 31 of the legacy bind() mask.
RTMGRP_NEXTHOP = 1 << 31
_GRP = struct.Struct("=IBBH")  # struct nexthop_grp: id, weight, weight_high, reserved
_NHMSG_ANY = bytes(8)  # struct nhmsg for a dump: every family, no filter


def _package() -> None:
    """Put pyroute2's package module in place without running its `__init__`, which imports
    every netlink family it has (conntrack, ipset, nl80211, NDB, IPDB, plan9: 163 modules);
    it runs the real `__init__` on the first attribute it lacks (PEP 562), so other code in
    the same process that does `from pyroute2 import X` keeps working."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return  # not installed as a package: let the ordinary import say so
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    origin = spec.origin

    def complete(name: str) -> Any:
        # `from pyroute2 import config` asks for a subpackage: import it, nothing more.
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        # Any other name: the whole __init__, once; it defines every public name.
        del package.__dict__["__getattr__"]
        with open(origin, encoding="utf-8") as source:
            exec(compile(source.read(), origin, "exec"), package.__dict__)  # noqa: S102
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

    package.__dict__["__getattr__"] = complete  # PEP 562
    sys.modules["pyroute2"] = package


@functools.cache
def nhmsg() -> Any:
    """pyroute2's decoder class for struct nhmsg and its NHA_* attributes."""
    _package()
    from pyroute2.netlink import nlmsg

    class nhmsg(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
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

    return nhmsg


def group_ids(raw: bytes | str | None) -> tuple[int, ...]:
    """The member ids of an NHA_GROUP attribute (an array of struct nexthop_grp)."""
    if not raw:
        return ()
    data = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
    usable = len(data) - len(data) % _GRP.size
    return tuple(_GRP.unpack_from(data, off)[0] for off in range(0, usable, _GRP.size))


def decode(msg: Message) -> NexthopEvent:
    """RTM_NEWNEXTHOP/RTM_DELNEXTHOP as a NexthopEvent."""
    parsed = nhmsg()(msg.data)
    parsed.decode()
    oif = parsed.get("NHA_OIF")
    gateway = parsed.get("NHA_GATEWAY")
    return NexthopEvent(id=int(parsed.get("NHA_ID") or 0), oif=int(oif) if oif else None,
                        gateway=str(gateway) if gateway else None,
                        group=group_ids(parsed.get("NHA_GROUP")),
                        deleted=msg.type == RTM_DELNEXTHOP)


async def dump(rtnl: Rtnl) -> tuple[NexthopEvent, ...]:
    """Every nexthop object; () where the kernel has none (older than 5.3, or refused)."""
    try:
        msgs = await rtnl.dump(RTM_GETNEXTHOP, _NHMSG_ANY)
    except NetlinkError:
        return ()
    return tuple(decode(m) for m in msgs if m.type == RTM_NEWNEXTHOP)
