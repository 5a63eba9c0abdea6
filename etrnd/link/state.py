"""Pure link state machine: rtnetlink events in, "is the WAN up, and why" out."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

UpWhen = Literal["carrier", "address", "default-route"]
Family = Literal["ipv4", "ipv6", "any"]

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_LOWER_UP = 0x10000
IFF_DORMANT = 0x20000
IF_LINK_MODE_DORMANT = 1
# RFC 2863 operstates that hold a link back although IFF_LOWER_UP is set: 802.1X or a modem
# still authenticating (DORMANT), a self-test (TESTING), a missing component (NOTPRESENT).
# UNKNOWN (PPP, tunnels, ifb) and a stale LOWERLAYERDOWN (veth) are decided by the flags.
HELD_BACK = frozenset({"DORMANT", "TESTING", "NOTPRESENT"})
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
# Deprecated is still usable: the kernel keeps it (and routes from it) until its valid
# lifetime ends, then removes it with RTM_DELADDR. dhcpcd deprecates its lease at rebind.
_UNUSABLE = IFA_F_DADFAILED | IFA_F_TENTATIVE
# IPv4 ranges an ISP cannot connect back to: RFC 1918 private, RFC 6598 shared (CGNAT).
NOT_PUBLIC_V4 = (
    (ipaddress.ip_network("100.64.0.0/10"), "shared (CGNAT, RFC 6598)"),
    (ipaddress.ip_network("10.0.0.0/8"), "private (RFC 1918)"),
    (ipaddress.ip_network("172.16.0.0/12"), "private (RFC 1918)"),
    (ipaddress.ip_network("192.168.0.0/16"), "private (RFC 1918)"),
)
_FAMILIES = {"ipv4": (socket.AF_INET,), "ipv6": (socket.AF_INET6,),
             "any": (socket.AF_INET, socket.AF_INET6)}


# Events: what the netlink adapter (etrnd.link.netlink) yields, decoded and immutable.

@dataclass(frozen=True)
class LinkEvent:
    index: int
    name: str
    flags: int
    operstate: str
    deleted: bool = False
    linkmode: int = 0  # IFLA_LINKMODE: 1 = dormant (userspace must say when it is up)


@dataclass(frozen=True)
class AddrEvent:
    index: int
    family: int
    address: str
    prefixlen: int
    flags: int
    scope: int
    deleted: bool = False


@dataclass(frozen=True)
class RouteEvent:
    """A default route (dst_len 0); every other route is dropped before it gets here.

    `gateways` lines up with `oifs` (one per hop of a multipath route) when known; `nhid`
    is the nexthop object the route uses (its hops are then the object's); `replace` is
    NLM_F_REPLACE: the route takes the place of the one with the same table and metric.
    """

    family: int
    oifs: tuple[int, ...]
    gateway: str | None
    table: int
    priority: int
    deleted: bool = False
    gateways: tuple[str | None, ...] = ()
    nhid: int | None = None
    replace: bool = False
    # RTA_CACHEINFO rta_expires as a clock time (an RA route's router lifetime); None: never.
    expires: float | None = None


@dataclass(frozen=True)
class NexthopEvent:
    """A nexthop object (`ip nexthop`): one hop (oif, gateway) or a group of other ids."""

    id: int
    oif: int | None = None
    gateway: str | None = None
    group: tuple[int, ...] = ()
    deleted: bool = False


@dataclass(frozen=True)
class DefaultRoutes:
    """The complete set of default routes of one family through one interface, re-queried."""

    index: int
    family: int
    routes: tuple[RouteEvent, ...]


@dataclass(frozen=True)
class Snapshot:
    """Full state read from the kernel; replaces everything known before."""

    links: tuple[LinkEvent, ...]
    addrs: tuple[AddrEvent, ...]
    routes: tuple[RouteEvent, ...]
    reason: str
    nexthops: tuple[NexthopEvent, ...] = ()


Event = LinkEvent | AddrEvent | RouteEvent | NexthopEvent | DefaultRoutes | Snapshot


@dataclass(frozen=True)
class Verdict:
    up: bool
    why: str
    iface: str | None = None  # the interface that satisfies the condition, when up


@dataclass(frozen=True)
class _Link:
    name: str
    flags: int
    operstate: str = ""
    linkmode: int = 0


def usable_address(addr: AddrEvent) -> bool:
    """Global scope, not link-local, DAD finished and passed; deprecated still counts."""
    if addr.scope != RT_SCOPE_UNIVERSE or addr.flags & _UNUSABLE:
        return False
    try:
        ip = ipaddress.ip_address(addr.address)
    except ValueError:
        return False
    return not (ip.is_link_local or ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def _fam(family: int) -> str:
    return "ipv4" if family == socket.AF_INET else "ipv6"


def _shown(addr: AddrEvent) -> str:
    note = " (deprecated)" if addr.flags & IFA_F_DEPRECATED else ""
    return f"{addr.address}/{addr.prefixlen}{note}"


def not_public(v4: Iterable[str], v6: Iterable[str]) -> str | None:
    """Why a WAN with these usable addresses cannot be reached from the Internet, or None.

    Only when every IPv4 address is shared (100.64.0.0/10) or private (RFC 1918) and there
    is no global IPv6 address: the ISP cannot open the SMTP connection that ETRN asks for.
    """
    if any(ipaddress.ip_address(a).is_global for a in v6):
        return None
    kinds = []
    for address in v4:
        ip = ipaddress.ip_address(address)
        kind = next((k for net, k in NOT_PUBLIC_V4 if ip in net), None)
        if kind is None:
            return None
        kinds.append(f"{address} is {kind}")
    return "; ".join(kinds) or None


class LinkState:
    """Follows interfaces by name; derives what the kernel removes without telling."""

    def __init__(self, interfaces: Iterable[str] = (), up_when: UpWhen = "default-route",
                 family: Family = "any") -> None:
        self.patterns = tuple(interfaces)
        self.up_when: UpWhen = up_when
        self.family: Family = family
        self._links: dict[int, _Link] = {}
        self._addrs: dict[tuple[int, int, str, int], AddrEvent] = {}
        self._routes: set[RouteEvent] = set()
        self._nexthops: dict[int, NexthopEvent] = {}
        self._expires: dict[RouteEvent, float] = {}  # routes that carry a lifetime

    def matches(self, name: str, flags: int = 0) -> bool:
        if not self.patterns:
            return not flags & IFF_LOOPBACK  # "any interface" never means loopback
        return any(fnmatchcase(name, p) for p in self.patterns)

    def apply(self, event: Event) -> None:
        if isinstance(event, Snapshot):
            self._links.clear()
            self._addrs.clear()
            self._routes.clear()
            self._expires.clear()
            self._nexthops = {nh.id: nh for nh in event.nexthops if not nh.deleted}
            for link in event.links:
                self._link(link)
            for addr in event.addrs:
                self._addr(addr)
            for route in event.routes:
                self._route(route)
        elif isinstance(event, LinkEvent):
            self._link(event)
        elif isinstance(event, AddrEvent):
            self._addr(event)
        elif isinstance(event, RouteEvent):
            self._route(event)
        elif isinstance(event, NexthopEvent):
            self._nexthop(event)
        elif isinstance(event, DefaultRoutes):
            stale = {r for r in self._routes if r.family == event.family
                     and any(oif == event.index for oif, _ in self.hops(r))}
            self._routes -= stale
            for r in stale:
                self._expires.pop(r, None)
            for route in event.routes:
                self._route(route)

    def _link(self, ev: LinkEvent) -> None:
        if ev.deleted:
            self._links.pop(ev.index, None)
            self._forget(ev.index, addresses=True)
            return
        self._links[ev.index] = _Link(ev.name, ev.flags, ev.operstate, ev.linkmode)
        if not ev.flags & IFF_UP:
            # Admin-down drops IPv4 routes with no RTM_DELROUTE; carrier loss keeps them.
            self._forget(ev.index, addresses=False)
        elif not ev.flags & IFF_LOWER_UP:
            # ...but carrier loss flushes the interface's nexthop objects and the routes that
            # use them, again without a word (measured: no RTM_DELNEXTHOP, no RTM_DELROUTE).
            self._flush_nexthops(ev.index)

    def _forget(self, index: int, *, addresses: bool) -> None:
        self._flush_nexthops(index)
        # A route by nexthop id goes with its nexthop (flushed above); one whose nexthop we
        # never saw is judged by the hops it carried, like any other route.
        self._routes = {r for r in self._routes
                        if index not in r.oifs or (r.nhid is not None and r.nhid in self._nexthops)}
        if addresses:
            self._addrs = {k: a for k, a in self._addrs.items() if a.index != index}

    def _flush_nexthops(self, index: int) -> None:
        for nh in [nh for nh in self._nexthops.values() if nh.oif == index]:
            self._drop_nexthop(nh.id)

    def _drop_nexthop(self, nhid: int) -> None:
        # The kernel deletes the routes that use a deleted nexthop and says nothing of them.
        self._nexthops.pop(nhid, None)
        self._routes = {r for r in self._routes if r.nhid != nhid}

    def _nexthop(self, ev: NexthopEvent) -> None:
        if ev.deleted:
            self._drop_nexthop(ev.id)
        else:
            self._nexthops[ev.id] = ev

    def _addr(self, ev: AddrEvent) -> None:
        key = (ev.index, ev.family, ev.address, ev.prefixlen)
        if ev.deleted:
            self._addrs.pop(key, None)
        else:
            self._addrs[key] = ev

    def _route(self, ev: RouteEvent) -> None:
        live = RouteEvent(ev.family, ev.oifs, ev.gateway, ev.table, ev.priority,
                          gateways=ev.gateways, nhid=ev.nhid)
        if ev.expires is not None and not ev.deleted:
            self._expires[live] = ev.expires
        else:
            self._expires.pop(live, None)
        same_slot = {r for r in self._routes if (r.family, r.table, r.priority)
                     == (ev.family, ev.table, ev.priority)}
        if ev.deleted:
            if ev.nhid is not None:
                # A route by nexthop id is that id: its expanded hops may be out of date.
                self._routes -= {r for r in same_slot if r.nhid == ev.nhid}
            self._routes.discard(live)
            return
        if ev.replace:
            # NLM_F_REPLACE: the new route takes the place of the old one (table, metric).
            self._routes -= same_slot
        self._routes.add(live)

    def hops(self, route: RouteEvent) -> list[tuple[int, str | None]]:
        """(oif, gateway) of each hop; a nexthop id (or group) is resolved, not trusted."""
        if route.nhid is None or route.nhid not in self._nexthops:
            gws = route.gateways or (route.gateway,) * len(route.oifs)
            return list(zip(route.oifs, gws, strict=False))
        out: list[tuple[int, str | None]] = []
        nh = self._nexthops[route.nhid]
        members = [self._nexthops.get(m) for m in nh.group] if nh.group else [nh]
        for member in members:
            if member is not None and member.oif:
                out.append((member.oif, member.gateway))
        return out

    def _check(self, index: int, link: _Link) -> tuple[bool, str]:
        """Whether one interface satisfies up_when, and a short reason either way."""
        if not link.flags & IFF_UP:
            return False, f"{link.name}: admin down"
        if not link.flags & IFF_LOWER_UP:
            return False, f"{link.name}: no carrier"
        if link.operstate in HELD_BACK or link.flags & IFF_DORMANT:
            return False, f"{link.name}: carrier up but {(link.operstate or 'dormant').lower()}"
        if link.linkmode == IF_LINK_MODE_DORMANT and link.operstate not in ("UP", "UNKNOWN"):
            # Link mode dormant: only userspace (a supplicant, a modem manager) says "UP"; the
            # first message after carrier-on may still carry a stale operstate.
            return False, f"{link.name}: carrier up but dormant (link mode dormant)"
        if self.up_when == "carrier":
            return True, f"{link.name}: carrier up"
        families = _FAMILIES[self.family]
        missing = []
        for family in families:
            # Preferred addresses first: a deprecated one is named only when it is all.
            addrs = [_shown(a) for a in sorted(
                (a for a in self._addrs.values()
                 if a.index == index and a.family == family and usable_address(a)),
                key=lambda a: (bool(a.flags & IFA_F_DEPRECATED), a.address, a.prefixlen))]
            if not addrs:
                missing.append(f"no global {_fam(family)} address")
                continue
            if self.up_when == "address":
                return True, f"{link.name}: carrier up, {addrs[0]}"
            # The best (lowest metric) default route with a hop through this interface, and
            # that hop's gateway: a multipath route names the hop that concerns us.
            vias = sorted((r.priority, gw or "") for r in self._routes if r.family == family
                          for oif, gw in self.hops(r) if oif == index)
            if not vias:
                missing.append(f"{addrs[0]} but no {_fam(family)} default route")
                continue
            gateway = vias[0][1]
            via = f"via {gateway}" if gateway else f"dev {link.name}"
            return True, f"{link.name}: carrier up, {addrs[0]}, default {via}"
        return False, f"{link.name}: " + "; ".join(missing)

    def verdict(self) -> Verdict:
        reasons = []
        for index, link in sorted(self._links.items(), key=lambda kv: kv[1].name):
            if not self.matches(link.name, link.flags):
                continue
            ok, why = self._check(index, link)
            if ok:
                return Verdict(True, why, link.name)
            reasons.append(why)
        if not reasons:
            wanted = ", ".join(self.patterns) or "any interface"
            return Verdict(False, f"no interface matches {wanted}")
        return Verdict(False, "; ".join(reasons))

    def addresses(self, name: str, family: int) -> list[str]:
        """Usable global addresses of one interface (by name), preferred ones first."""
        return [a.address for a in sorted(
            (a for a in self._addrs.values() if a.family == family and usable_address(a)
             and self._links.get(a.index, _Link("", 0)).name == name),
            key=lambda a: (bool(a.flags & IFA_F_DEPRECATED), a.address))]

    # --- route lifetimes (RA default routes): the kernel says nothing when one runs out ----
    def _watched(self, index: int) -> bool:
        link = self._links.get(index)
        return link is not None and self.matches(link.name, link.flags)

    def next_expiry(self) -> tuple[float, int, int] | None:
        """(clock time, interface index, family) of the first watched route to expire."""
        due = [(at, oif, r.family) for r, at in self._expires.items() if r in self._routes
               for oif, _ in self.hops(r) if self._watched(oif)]
        return min(due) if due else None

    def expired(self, now: float) -> set[tuple[int, int]]:
        """(index, family) of the watched interfaces with a route whose lifetime ran out."""
        return {(oif, r.family) for r, at in self._expires.items()
                if at <= now and r in self._routes for oif, _ in self.hops(r)
                if self._watched(oif)}

    def drop_expired(self, now: float) -> None:
        """Forget routes whose lifetime ran out: the kernel no longer routes by them (a
        lookup answers ENETUNREACH) although it deletes them only at its next GC."""
        gone = {r for r, at in self._expires.items() if at <= now}
        self._routes -= gone
        for r in gone:
            del self._expires[r]

    def has_route(self, index: int, family: int) -> bool:
        return any(r.family == family and oif == index
                   for r in self._routes for oif, _ in self.hops(r))
