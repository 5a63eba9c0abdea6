"""etrnd's own netlink socket and decoders (link/rtnl.py, link/codec.py) against pyroute2's.

pyroute2's codec is the reference (issue 21 replaced it on the link-up path: ~350 µs per
RTM_NEWLINK against ~15). A probe in a namespace of the test's own subscribes (no BPF
filter: every route too) while `ip` makes what the field sends: veth up/down, link mode
dormant, IPv4/IPv6 addresses (point-to-point IFA_LOCAL, IFA_FLAGS beyond 8 bits, deprecated),
default routes with gateways, replace, multipath of both families, a route by nexthop
object (RTA_NH_ID), an RA-style route with a lifetime (RTA_CACHEINFO expires), a table other
than main, deletions; it also dumps the tables and asks the kernel for each interface's
default route (RTM_F_FIB_MATCH) through both sockets. Every message must decode to the
same event by etrnd's decoder as by pyroute2's decoding and the mapping etrnd used on it
until issue 21 (kept below as the reference).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from etrnd.link import codec
from etrnd.link.rtnl import Message, messages
from etrnd.link.state import AddrEvent, LinkEvent, RouteEvent
from tests.support.nettools import netns, unique

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]
NOW = 1000.0


class rtmsg_nh(rtmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """rtmsg plus the attributes up to RTA_NH_ID (30), which pyroute2 0.9.7 lacks."""

    # pyroute2 keeps the "compiled" mark of nla_map in a class attribute a subclass inherits.
    _nlmsg_base__compiled_nla = False
    _nlmsg_base__t_nla_map = None
    _nlmsg_base__r_nla_map = None
    nla_map = (*rtmsg.nla_map, ("RTA_PAD", "hex"), ("RTA_UID", "uint32"),
               ("RTA_TTL_PROPAGATE", "uint8"), ("RTA_IP_PROTO", "uint8"),
               ("RTA_SPORT", "uint16"), ("RTA_DPORT", "uint16"), ("RTA_NH_ID", "uint32"))


def reference(msg: Message, now: float) -> LinkEvent | AddrEvent | RouteEvent | None:
    """pyroute2's decoding, mapped to events as etrnd.link.netlink did until issue 21."""
    kind = msg.type
    if kind in (16, 17):
        m = ifinfmsg(msg.data)
        m.decode()
        return LinkEvent(index=int(m["index"]), name=str(m.get("ifname") or ""),
                         flags=int(m["flags"]), operstate=str(m.get("IFLA_OPERSTATE") or ""),
                         deleted=kind == 17, linkmode=int(m.get("IFLA_LINKMODE") or 0))
    if kind in (20, 21):
        m = ifaddrmsg(msg.data)
        m.decode()
        flags = m.get("IFA_FLAGS")
        return AddrEvent(index=int(m["index"]), family=int(m["family"]),
                         address=str(m.get("IFA_LOCAL") or m.get("IFA_ADDRESS") or ""),
                         prefixlen=int(m["prefixlen"]),
                         flags=int(flags if flags is not None else m["flags"]),
                         scope=int(m["scope"]), deleted=kind == 21)
    if kind in (24, 25):
        m = rtmsg_nh(msg.data)
        m.decode()
        if m["dst_len"] != 0 or m["type"] != 1:
            return None
        table = int(m.get("RTA_TABLE") or m["table"])
        if table == 255:
            return None
        gateway, oif = m.get("RTA_GATEWAY"), m.get("RTA_OIF")
        oifs: tuple[int, ...] = (int(oif),) if oif else ()
        gateways: tuple[str | None, ...] = (str(gateway) if gateway else None,) if oif else ()
        for hop in m.get("RTA_MULTIPATH") or ():
            hop_gw = hop.get("RTA_GATEWAY")
            oifs += (int(hop["oif"]),)
            gateways += (str(hop_gw) if hop_gw else None,)
            gateway = gateway or hop_gw
        nhid = m.get("RTA_NH_ID")
        ticks = int((m.get("RTA_CACHEINFO") or {}).get("rta_expires") or 0)
        return RouteEvent(family=int(m["family"]), oifs=oifs,
                          gateway=str(gateway) if gateway else None, table=table,
                          priority=int(m.get("RTA_PRIORITY") or 0), deleted=kind == 25,
                          gateways=gateways, nhid=int(nhid) if nhid else None,
                          replace=kind == 24 and bool(msg.flags & 0x100),
                          expires=now + ticks / codec.CLK_TCK if ticks else None)
    return None


PROBE = r"""
import asyncio, dataclasses, json, socket, subprocess, sys, time
from pyroute2.iproute.linux import AsyncIPRoute
from etrnd.link import codec, netlink
from etrnd.link.rtnl import RTM_GETADDR, RTM_GETLINK, Rtnl, messages

steps, wan, wan2 = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
rtnl = Rtnl(netlink.GROUPS)  # no BPF filter: every route message too
raw = []

def drain():
    while True:
        try:
            raw.append(rtnl.sock.recv(1 << 16).hex())
        except BlockingIOError:
            return

def wait_for(name, operstate):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for data in list(raw):
            for m in messages(bytes.fromhex(data)):
                e = codec.decode(m)
                if getattr(e, "name", None) == name and e.operstate == operstate:
                    return
        time.sleep(0.01)
        drain()
    raise SystemExit(f"no {operstate} for {name}")

for step in steps:
    if step[0] == "wait":
        wait_for(step[1], step[2])
        continue
    subprocess.run(["ip", *step], check=True)
    drain()

async def dumps():
    q = Rtnl()
    out = [m.data.hex() for kind, body in ((RTM_GETLINK, bytes(16)), (RTM_GETADDR, bytes(8)))
           for m in await q.dump(kind, body)]
    ipr = AsyncIPRoute()
    mine, theirs = [], []
    for name in (wan, wan2):
        index = socket.if_nametoindex(name)
        for family, dst in ((socket.AF_INET, "0.0.0.1"), (socket.AF_INET6, "::")):
            found = await netlink.query_default_routes(q, index, family, lambda: 0.0)
            # A lifetime counts down between the two look-ups: the events compare it.
            mine.append([repr(dataclasses.replace(r, expires=None)) for r in found])
            try:
                answer = await ipr.route("get", dst=dst, oif=index, flags=0x2000,
                                         family=family)
            except Exception:
                answer = []
            theirs.append([m.data[m.offset:m.offset + m.length].hex() for m in answer])
    return out, mine, theirs

out, mine, theirs = asyncio.run(dumps())
print(json.dumps({"events": raw, "dumps": out, "mine": mine, "theirs": theirs}))
"""


def scenario(wan: str, peer: str, wan2: str, peer2: str) -> list[list[str]]:
    """`ip` arguments, and `wait NAME OPERSTATE` for what the kernel's linkwatch says later."""
    return [s.split() for s in (
        f"link add {wan} type veth peer name {peer}",
        f"link add {wan2} type veth peer name {peer2}",
        f"link set {peer} up", f"link set {peer2} up", f"link set {wan} up",
        f"link set {wan2} up", f"wait {wan} UP", f"wait {wan2} UP",
        f"link set {wan} mode dormant", f"link set {wan} mode default",
        f"addr add 198.51.100.2/24 dev {wan}",
        f"addr add 192.0.2.2/24 dev {wan2}",
        f"addr add 203.0.113.2 peer 203.0.113.1/32 dev {wan}",
        f"-6 addr add 2001:db8:1::2/64 dev {wan} nodad",
        f"-6 addr add 2001:db8:2::2/64 dev {wan} nodad noprefixroute preferred_lft 0",
        f"-6 addr add 2001:db8:3::2/64 dev {wan2} nodad",
        f"route add default via 198.51.100.1 dev {wan} metric 100",
        f"route replace default via 198.51.100.3 dev {wan} metric 100",
        f"route add default via 198.51.100.1 dev {wan} table 100",
        f"route add default metric 200 nexthop via 198.51.100.1 dev {wan} "
        f"nexthop via 192.0.2.1 dev {wan2}",
        f"-6 route add default via 2001:db8:1::1 dev {wan} metric 100",
        f"-6 route add default metric 300 nexthop via 2001:db8:1::1 dev {wan} "
        f"nexthop via 2001:db8:3::1 dev {wan2}",
        f"-6 route add default via fe80::1 dev {wan} metric 1024 expires 600",
        f"nexthop add id 10 via 198.51.100.1 dev {wan}",
        "route add default nhid 10 metric 400",
        "route del default metric 200",
        f"-6 addr del 2001:db8:2::2/64 dev {wan}",
        f"addr del 203.0.113.2 peer 203.0.113.1/32 dev {wan}",
        "nexthop del id 10",
        f"link set {wan2} down",
        f"link del {wan2}",
        # wan2 again, for the look-ups: a line with no default route.
        f"link add {wan2} type veth peer name {peer2}",
        f"link set {wan2} up")]


def test_decoders_equal_pyroute2_on_real_kernel_messages() -> None:
    with netns("cdc") as ns:
        wan, peer, wan2, peer2 = (unique(p) for p in ("wan", "pr", "wwan", "pq"))
        steps = scenario(wan, peer, wan2, peer2)
        res = subprocess.run(ns.cmd(sys.executable, "-c", PROBE, json.dumps(steps), wan, wan2),
                             cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    msgs = [m for data in got["events"] + got["dumps"] for m in messages(bytes.fromhex(data))]
    pairs = [(codec.decode(m, NOW), reference(m, NOW)) for m in msgs]
    assert [mine for mine, _ in pairs] == [theirs for _, theirs in pairs]
    events: list[Any] = [e for e, _ in pairs if e is not None]
    links = [e for e in events if isinstance(e, LinkEvent)]
    addrs = [e for e in events if isinstance(e, AddrEvent)]
    routes = [e for e in events if isinstance(e, RouteEvent)]
    # What the scenario must have made the kernel say, or the comparison proves less.
    assert {(e.name, e.operstate) for e in links} >= {
        (wan, "UP"), (wan, "LOWERLAYERDOWN"), (wan2, "DOWN"), ("lo", "UNKNOWN")}
    assert any(e.linkmode == 1 for e in links) and any(e.deleted for e in links)
    assert any(e.address == "203.0.113.2" and e.prefixlen == 32 for e in addrs)  # IFA_LOCAL
    assert any(e.address == "2001:db8:2::2" and e.flags & 0x200 for e in addrs)  # IFA_FLAGS
    assert any(e.deleted for e in addrs)
    assert any(e.table == 100 for e in routes)
    assert {e.family for e in routes if len(e.oifs) == 2} == {2, 10}  # multipath, both
    assert any(e.nhid == 10 for e in routes)
    assert any(e.expires is not None and NOW + 500 < e.expires <= NOW + 600 for e in routes)
    assert any(e.replace for e in routes) and any(e.deleted for e in routes)
    assert any(e.gateway == "2001:db8:1::1" for e in routes)
    # The default-route look-ups (RTM_F_FIB_MATCH) answer as pyroute2's did.
    theirs = [[repr(dataclasses.replace(r, expires=None)) for m in answer
               if isinstance(r := reference(messages(bytes.fromhex(m))[0], 0.0), RouteEvent)]
              for answer in got["theirs"]]
    assert got["mine"] == theirs
    assert any(got["mine"]) and any(not answer for answer in got["mine"])


NEXTHOP_PROBE = r"""
import asyncio, subprocess, sys
from etrnd.link.netlink import NetlinkSource
from etrnd.link.state import NexthopEvent

async def main():
    events = NetlinkSource().events()
    snapshot = await anext(events)
    print("start", len(snapshot.nexthops), "pyroute2" in sys.modules, flush=True)
    for args in (["link", "add", "nh0", "type", "veth", "peer", "name", "nh1"],
                 ["link", "set", "nh1", "up"], ["link", "set", "nh0", "up"],
                 ["nexthop", "add", "id", "7", "dev", "nh0"]):
        subprocess.run(["ip", *args], check=True)
    async with asyncio.timeout(10):
        while not isinstance(event := await anext(events), NexthopEvent):
            pass
    print("nexthop", event.id, event.oif is not None, "pyroute2" in sys.modules, flush=True)

asyncio.run(main())
"""


def test_pyroute2_is_loaded_only_for_a_nexthop_object() -> None:
    """The start-up dump of a machine without nexthop objects (most) loads no pyroute2 (~60 ms
    of every start, with its socket); the first nexthop object is decoded by its codec."""
    with netns("cnh") as ns:
        res = subprocess.run(ns.cmd(sys.executable, "-c", NEXTHOP_PROBE), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["start 0 False", "nexthop 7 True True"]
