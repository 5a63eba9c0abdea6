"""Egress: does the route to a relay leave through the interface that made the link up?

ISPs authorise ETRN by the client's address (Postfix `smtpd_etrn_restrictions`), so a
session that leaves through another interface gets a 554 or 459 nobody can explain. Before
each session the kernel is asked (RTM_GETROUTE, as `ip route get`) how it would reach the
relay; a different interface is logged as `etrn_egress_mismatch` with both names, and the
relay's `source:` decides which address the session binds to (no privileges needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from etrnd.logs import get_logger

if TYPE_CHECKING:
    from etrnd.config import Relay, Watch

# Per family (AF_INET/AF_INET6), the usable global addresses of an interface, by name.
Addresses = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Expected:
    """What the route should look like: set per round by the daemon, once by `etrnd send`.

    `iface` is the interface that made the link up (None: not known, e.g. `send` while no
    watched interface is up); then any interface matching `patterns` is fine.
    """

    iface: Callable[[], str | None]
    patterns: tuple[str, ...]
    addresses: Addresses

    def allows(self, name: str | None) -> bool:
        want = self.iface()
        if want is not None:
            return name == want
        return not self.patterns or (name is not None
                                     and any(fnmatchcase(name, p) for p in self.patterns))


EXPECTED: ContextVar[Expected | None] = ContextVar("etrnd_egress", default=None)


@contextlib.contextmanager
def expecting(expected: Expected | None) -> Iterator[None]:
    """Sessions started inside (and in tasks created inside) check against `expected`."""
    token = EXPECTED.set(expected)
    try:
        yield
    finally:
        EXPECTED.reset(token)


@dataclass(frozen=True)
class Route:
    """The kernel's answer for one destination: the interface it leaves through."""

    dst: str
    family: int
    iface: str | None


@dataclass(frozen=True)
class Choice:
    """What to do for one session: bind to `source` (None: let the kernel choose)."""

    source: str | None
    mismatch: bool
    reason: str


def choose(mode: str, route: Route, expected: Expected,
           routed_from: Callable[[str], str | None]) -> Choice:
    """Pure decision. `routed_from(addr)`: the interface a packet from `addr` would take.

    - `source: ADDRESS`: always that address.
    - `source: kernel`: never bind; only say so when the route leaves elsewhere.
    - `source: auto` (default): when the route leaves elsewhere, bind to the watched
      interface's address *if* the kernel routes packets from that address through it
      (a policy rule, `ip rule add from ADDR table N`); binding otherwise would send that
      address out of the wrong line, where the ISP's ingress filter drops it.
    """
    ok = expected.allows(route.iface)
    if mode not in ("auto", "kernel"):
        return Choice(mode, not ok, "source: configured address")
    if ok:
        return Choice(None, False, "route leaves through the watched interface")
    if mode == "kernel":
        return Choice(None, True, "source: kernel")
    want = expected.iface()
    if want is None:
        return Choice(None, True, "no watched interface is up to take an address from")
    addrs = expected.addresses(want, route.family)
    if not addrs:
        return Choice(None, True, f"{want} has no usable address of this family")
    via = routed_from(addrs[0])
    if via != want:
        return Choice(None, True, f"packets from {addrs[0]} would also leave through {via}; "
                                  f"add a policy rule (ip rule add from {addrs[0]} table N)")
    return Choice(addrs[0], True, f"sending from {addrs[0]}, which is routed through {want}")


async def _route_get(ipr: Any, dst: str, src: str | None = None) -> str | None:
    kwargs: dict[str, Any] = {"dst": dst}
    if src is not None:
        kwargs["src"] = src
    try:
        msgs = await ipr.route("get", **kwargs)
    except Exception:  # ENETUNREACH and friends: no route at all (connect will say so)
        return None
    for msg in msgs:
        oif = msg.get("RTA_OIF")
        if oif:
            with contextlib.suppress(OSError):
                return socket.if_indextoname(int(oif))
    return None


async def source_for(relay: Relay, host: str, limit: float) -> tuple[str, int] | None:
    """The address a session to `host` binds to, after checking its route; never raises.

    Name resolution runs in the loop's executor and everything is bounded by `limit`
    (seconds): a slow check costs one session its check, never the loop.
    """
    mode = getattr(relay, "source", "auto")
    expected = EXPECTED.get()
    if expected is None:  # no link knowledge here (a test calling a session directly)
        return (mode, 0) if mode not in ("auto", "kernel") else None
    log = get_logger().bind(relay=relay.label, host=host)
    try:
        async with asyncio.timeout(limit):
            choice, route = await _check(relay, host, mode, expected)
    except (TimeoutError, OSError) as exc:
        log.warning("etrn_egress_unchecked", error=type(exc).__name__, text=str(exc)[:200])
        return (mode, 0) if mode not in ("auto", "kernel") else None
    if route is not None and choice.mismatch:
        log.warning("etrn_egress_mismatch", dst=route.dst, expected_iface=expected.iface()
                    or ",".join(expected.patterns), route_iface=route.iface,
                    source=choice.source, reason=choice.reason)
    elif route is not None:
        log.debug("etrn_egress", dst=route.dst, route_iface=route.iface, source=choice.source)
    return (choice.source, 0) if choice.source else None


async def _check(relay: Relay, host: str, mode: str,
                 expected: Expected) -> tuple[Choice, Route | None]:
    from pyroute2 import AsyncIPRoute

    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, relay.effective_port, type=socket.SOCK_STREAM)
    if not infos:
        return Choice(None, False, "no address"), None
    family, dst = int(infos[0][0]), str(infos[0][4][0])
    ipr = AsyncIPRoute()
    try:
        route = Route(dst, family, await _route_get(ipr, dst))
        choice = choose(mode, route, expected, lambda _: None)
        if choice.mismatch and mode == "auto" and expected.iface() is not None:
            addrs = expected.addresses(expected.iface() or "", family)
            via = await _route_get(ipr, dst, addrs[0]) if addrs else None
            choice = choose(mode, route, expected, lambda _: via)
        return choice, route
    finally:
        ipr.close()


async def expected_now(watch: Watch) -> Expected | None:
    """For `etrnd send` (no watcher): read the link state once, by the daemon's own rules.

    The interface that is up by `watch:` is what the route should use; when none is up,
    any interface matching `watch.interfaces` (any at all when the list is empty).
    """
    from etrnd.linkstate import LinkState, Snapshot
    from etrnd.netlink import NetlinkSource

    state = LinkState(watch.interfaces, watch.up_when, watch.family)
    source = NetlinkSource(route_iface=state.matches)
    events = source.events()
    try:
        async with asyncio.timeout(5.0):
            snapshot = await anext(events)
    except Exception as exc:  # netlink refused (a sandbox), NetlinkError, time-out
        get_logger().warning("etrn_egress_unchecked", error=type(exc).__name__,
                             text=f"cannot read the link state: {exc}"[:200])
        return None
    finally:
        await events.aclose()  # type: ignore[attr-defined]  # an async generator
        source.close()
    assert isinstance(snapshot, Snapshot)
    state.apply(snapshot)
    iface = state.verdict().iface
    return Expected(lambda: iface, tuple(watch.interfaces), state.addresses)


__all__ = ["EXPECTED", "Choice", "Expected", "Route", "choose", "expected_now", "expecting",
           "source_for"]
