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
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from etrnd.link.codec import route_oif
from etrnd.link.rtnl import RTM_NEWROUTE, NetlinkError, Rtnl, route_get
from etrnd.outputs.logs import get_logger

if TYPE_CHECKING:
    from etrnd.config.model import Relay, Watch

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
    router: Router
    # Set when only the interface names were read (etrnd send, see expected_for_send): the
    # full link state, read when the route does not leave through the one watched interface.
    full: Callable[[], Awaitable[Expected | None]] | None = None

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
    # A relay on this machine (a test, a local smarthost) is reached over loopback: there
    # is no line to choose, so nothing to warn about.
    ok = route.iface == "lo" or expected.allows(route.iface)
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


class Router:
    """One rtnetlink socket for route look-ups (`ip route get`), opened on first use and
    kept: a look-up on it costs a few dozen µs, opening one more than a loopback session.
    pyroute2 built and parsed the same two messages in ~0.5 ms of Python, which on a fast
    line sat on the session's critical path (the loop busy with it when the 220 arrived)."""

    def __init__(self) -> None:
        self._rtnl: Rtnl | None = None

    async def via(self, dst: str, src: str | None = None) -> str | None:
        """The interface the kernel would send a packet to `dst` (from `src`) through.

        Raises OSError when netlink itself fails (the socket is then reopened next time).
        """
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        try:
            self._rtnl = self._rtnl or Rtnl()
            try:
                answer = await self._rtnl.request(*route_get(family, dst, src=src))
            except NetlinkError:
                return None  # ENETUNREACH and friends: no route (connect will say so)
        except BaseException:
            self.close()  # a socket that failed keeps failing: the next call reopens
            raise
        oif = next((route_oif(m) for m in answer if m.type == RTM_NEWROUTE), 0)
        if oif:
            with contextlib.suppress(OSError):
                return socket.if_indextoname(oif)
        return None

    async def warm(self) -> None:
        """Open the socket and run the decoding path once, so the first round pays nothing."""
        with contextlib.suppress(Exception):
            await self.via("127.0.0.1")

    def close(self) -> None:
        rtnl, self._rtnl = self._rtnl, None
        if rtnl is not None:
            rtnl.close()


async def source_for(relay: Relay, host: str, limit: float) -> tuple[str, int] | None:
    """The address a session to `host` binds to, after checking its route; never raises.

    Name resolution runs in the loop's executor and everything is bounded by `limit`
    (seconds): a slow check costs one session its check, never the loop.
    """
    mode = relay.source
    expected = EXPECTED.get()
    if expected is None:  # no link knowledge here (a test calling a session directly)
        return (mode, 0) if mode not in ("auto", "kernel") else None
    log = get_logger().bind(relay=relay.label, host=host)
    try:
        async with asyncio.timeout(limit):
            choice, route = await _check(relay, host, mode, expected)
            if choice.mismatch and expected.full is not None:
                full = await expected.full()
                if full is None:  # the link state could not be read (expected_now said why)
                    return (mode, 0) if mode not in ("auto", "kernel") else None
                expected = full
                choice, route = await _check(relay, host, mode, expected)
    except Exception as exc:  # time-out, resolver or netlink failure: the session goes on
        log.warning("etrn_egress_unchecked", error=type(exc).__name__, text=str(exc)[:200])
        return (mode, 0) if mode not in ("auto", "kernel") else None
    # No address to bind means the kernel picks it: say so in words, not as a null/None that
    # each log format would print its own way.
    source = choice.source or "kernel"
    if route is not None and choice.mismatch:
        log.warning("etrn_egress_mismatch", dst=route.dst, expected_iface=expected.iface()
                    or ",".join(expected.patterns), route_iface=route.iface,
                    source=source, reason=choice.reason)
    elif route is not None:
        log.debug("etrn_egress", dst=route.dst, route_iface=route.iface, source=source)
    return (choice.source, 0) if choice.source else None


async def _check(relay: Relay, host: str, mode: str,
                 expected: Expected) -> tuple[Choice, Route | None]:
    try:
        family = int(socket.AF_INET6 if ":" in host else socket.AF_INET)
        socket.inet_pton(family, host)
        dst = host  # an address: no look-up (and no thread) needed
    except OSError:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, relay.effective_port, type=socket.SOCK_STREAM)
        if not infos:
            return Choice(None, False, "no address"), None
        family, dst = int(infos[0][0]), str(infos[0][4][0])
    route = Route(dst, family, await expected.router.via(dst))
    choice = choose(mode, route, expected, lambda _: None)
    want = expected.iface()
    if choice.mismatch and mode == "auto" and want is not None:
        addrs = expected.addresses(want, family)
        via = await expected.router.via(dst, addrs[0]) if addrs else None
        choice = choose(mode, route, expected, lambda _: via)
    return choice, route


async def expected_now(watch: Watch) -> Expected | None:
    """For `etrnd send` (no watcher): read the link state once, by the daemon's own rules.

    The interface that is up by `watch:` is what the route should use; when none is up,
    any interface matching `watch.interfaces` (any at all when the list is empty).
    """
    from etrnd.link.netlink import NetlinkSource
    from etrnd.link.state import LinkState, Snapshot

    state = LinkState(watch.interfaces, watch.up_when, watch.family)
    # One dump, no event stream to buffer: a small buffer, so an unprivileged `send` does not
    # warn about the daemon's 8 MiB being capped by rmem_max.
    source = NetlinkSource(route_iface=state.matches, rcvbuf=64 << 10)
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
    return Expected(lambda: iface, tuple(watch.interfaces), state.addresses,
                    Router())


async def expected_for_send(watch: Watch) -> Expected | None:
    """expected_now, read only when needed: with exactly one interface matching
    `watch.interfaces`, a route through it is right whether that interface is up or not (by
    the daemon's rules), so `etrnd send` from an ip-up script neither dumps the link state nor
    imports the netlink decoder for it; any other route reads the state (Expected.full)."""
    names = [name for _, name in socket.if_nameindex()
             if any(fnmatchcase(name, p) for p in watch.interfaces)]
    if len(names) != 1:
        return await expected_now(watch)
    reading: asyncio.Task[Expected | None] | None = None

    async def full() -> Expected | None:
        nonlocal reading
        reading = reading or asyncio.ensure_future(expected_now(watch))
        return await asyncio.shield(reading)  # relays' sessions share the one read

    return Expected(lambda: names[0], tuple(watch.interfaces), lambda _n, _f: [], Router(),
                    full)


__all__ = ["EXPECTED", "Choice", "Expected", "Route", "Router", "choose", "expected_for_send",
           "expected_now", "expecting", "source_for"]
