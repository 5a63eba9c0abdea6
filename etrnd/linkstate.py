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
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
_UNUSABLE = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
_FAMILIES = {"ipv4": (socket.AF_INET,), "ipv6": (socket.AF_INET6,),
             "any": (socket.AF_INET, socket.AF_INET6)}


# Events: what the netlink adapter (etrnd.netlink) yields, decoded and immutable.

@dataclass(frozen=True)
class LinkEvent:
    index: int
    name: str
    flags: int
    operstate: str
    deleted: bool = False


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
    """A default route (dst_len 0); every other route is dropped before it gets here."""

    family: int
    oifs: tuple[int, ...]
    gateway: str | None
    table: int
    priority: int
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


Event = LinkEvent | AddrEvent | RouteEvent | DefaultRoutes | Snapshot


@dataclass(frozen=True)
class Verdict:
    up: bool
    why: str
    iface: str | None = None  # the interface that satisfies the condition, when up


@dataclass(frozen=True)
class _Link:
    name: str
    flags: int


def usable_address(addr: AddrEvent) -> bool:
    """Global scope, not link-local, DAD finished and passed, not deprecated."""
    if addr.scope != RT_SCOPE_UNIVERSE or addr.flags & _UNUSABLE:
        return False
    try:
        ip = ipaddress.ip_address(addr.address)
    except ValueError:
        return False
    return not (ip.is_link_local or ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def _fam(family: int) -> str:
    return "ipv4" if family == socket.AF_INET else "ipv6"


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

    def matches(self, name: str, flags: int = 0) -> bool:
        if not self.patterns:
            return not flags & IFF_LOOPBACK  # "any interface" never means loopback
        return any(fnmatchcase(name, p) for p in self.patterns)

    def apply(self, event: Event) -> None:
        if isinstance(event, Snapshot):
            self._links.clear()
            self._addrs.clear()
            self._routes.clear()
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
        elif isinstance(event, DefaultRoutes):
            self._routes = {r for r in self._routes
                            if not (r.family == event.family and event.index in r.oifs)}
            self._routes.update(event.routes)

    def _link(self, ev: LinkEvent) -> None:
        if ev.deleted:
            self._links.pop(ev.index, None)
            self._forget(ev.index, addresses=True)
            return
        self._links[ev.index] = _Link(ev.name, ev.flags)
        if not ev.flags & IFF_UP:
            # Admin-down drops IPv4 routes with no RTM_DELROUTE; carrier loss keeps them.
            self._forget(ev.index, addresses=False)

    def _forget(self, index: int, *, addresses: bool) -> None:
        self._routes = {r for r in self._routes if index not in r.oifs}
        if addresses:
            self._addrs = {k: a for k, a in self._addrs.items() if a.index != index}

    def _addr(self, ev: AddrEvent) -> None:
        key = (ev.index, ev.family, ev.address, ev.prefixlen)
        if ev.deleted:
            self._addrs.pop(key, None)
        else:
            self._addrs[key] = ev

    def _route(self, ev: RouteEvent) -> None:
        live = RouteEvent(ev.family, ev.oifs, ev.gateway, ev.table, ev.priority)
        if ev.deleted:
            self._routes.discard(live)
        else:
            self._routes.add(live)

    def _check(self, index: int, link: _Link) -> tuple[bool, str]:
        """Whether one interface satisfies up_when, and a short reason either way."""
        if not link.flags & IFF_UP:
            return False, f"{link.name}: admin down"
        if not link.flags & IFF_LOWER_UP:
            return False, f"{link.name}: no carrier"
        if self.up_when == "carrier":
            return True, f"{link.name}: carrier up"
        families = _FAMILIES[self.family]
        missing = []
        for family in families:
            addrs = sorted(f"{a.address}/{a.prefixlen}" for a in self._addrs.values()
                           if a.index == index and a.family == family and usable_address(a))
            if not addrs:
                missing.append(f"no global {_fam(family)} address")
                continue
            if self.up_when == "address":
                return True, f"{link.name}: carrier up, {addrs[0]}"
            routes = sorted((r for r in self._routes if r.family == family and index in r.oifs),
                            key=lambda r: r.priority)
            if not routes:
                missing.append(f"{addrs[0]} but no {_fam(family)} default route")
                continue
            via = f"via {routes[0].gateway}" if routes[0].gateway else f"dev {link.name}"
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
