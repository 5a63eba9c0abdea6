"""Thin rtnetlink adapter: subscribe, dump, filter in the kernel, yield typed immutable events."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from etrnd.link import nexthops
from etrnd.link.nexthops import RTM_DELNEXTHOP, RTM_NEWNEXTHOP, RTMGRP_NEXTHOP, to_nexthop
from etrnd.link.rtnl import AsyncIPRoute, NetlinkError
from etrnd.link.state import (
    IFF_UP,
    AddrEvent,
    DefaultRoutes,
    Event,
    LinkEvent,
    NexthopEvent,
    RouteEvent,
    Snapshot,
)
from etrnd.outputs.logs import get_logger

log = get_logger()

# rtnetlink constants (linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h)
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255
RTM_F_FIB_MATCH = 0x2000
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
# LINK, IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE, NEXTHOP
GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400 | RTMGRP_NEXTHOP
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
DEFAULT_RCVBUF = 8 << 20
REQUEST_TIMEOUT = 5.0
# A destination no sane table routes more specifically than the default route; with
# RTM_F_FIB_MATCH and an oif the kernel answers with the default route through that oif.
_PROBE: dict[int, str] = {socket.AF_INET: "0.0.0.1", socket.AF_INET6: "::"}

# rta_expires counts USER_HZ clock ticks (linux/rtnetlink.h: jiffies_to_clock_t).
_CLK_TCK = os.sysconf("SC_CLK_TCK")

_rcvbuf_warned = False


def bpf_program(portid: int, little_endian: bool = sys.byteorder == "little",
                ) -> list[tuple[int, int, int, int]]:
    """Classic BPF: pass replies to us, multipart, non-route messages and default routes only.

    Nexthop objects (RTM_NEWNEXTHOP/RTM_DELNEXTHOP) are non-route messages: they all pass.
    """
    # BPF loads are big-endian, so host-order u16 fields are read a byte at a time and
    # the u32 port id is compared in its byte-swapped form.
    type_lo, type_hi, flags_lo = (4, 5, 6) if little_endian else (5, 4, 7)
    pid_be = int.from_bytes(portid.to_bytes(4, "little" if little_endian else "big"), "big")
    ld_w, ld_b, jeq, jset, ret = 0x20, 0x30, 0x15, 0x45, 0x06
    accept, drop = 12, 11

    def j(pc: int, op: int, k: int, t: int, f: int) -> tuple[int, int, int, int]:
        return (op, t - pc - 1, f - pc - 1, k)

    return [
        (ld_w, 0, 0, 12),                           # 0: nlmsg_pid
        j(1, jeq, pid_be, accept, 2),               # 1: a reply to our own request
        (ld_b, 0, 0, flags_lo),                     # 2
        j(3, jset, NLM_F_MULTI, accept, 4),         # 3: dump replies
        (ld_b, 0, 0, type_hi),                      # 4
        j(5, jeq, 0, 6, accept),                    # 5: types >= 256 are not routes
        (ld_b, 0, 0, type_lo),                      # 6
        j(7, jeq, RTM_NEWROUTE, 9, 8),              # 7
        j(8, jeq, RTM_DELROUTE, 9, accept),         # 8: links and addresses pass
        (ld_b, 0, 0, 16 + 1),                       # 9: rtm_dst_len
        j(10, jeq, 0, accept, drop),                # 10
        (ret, 0, 0, 0),                             # 11: drop
        (ret, 0, 0, 0xFFFFFFFF),                    # 12: accept whole message
    ]


def attach_filter(sock: Any, portid: int) -> None:
    prog = bpf_program(portid)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def raise_rcvbuf(sock: Any, size: int) -> int:
    """Ask for `size` bytes; without CAP_NET_ADMIN the kernel caps it at rmem_max."""
    global _rcvbuf_warned
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    # The kernel reports twice what it grants (the other half is its bookkeeping).
    got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2
    if got < size and not _rcvbuf_warned:
        _rcvbuf_warned = True
        log.warning("netlink_rcvbuf_limited", wanted=size, got=got,
                    hint="raise net.core.rmem_max or grant CAP_NET_ADMIN")
    return got


def _header(msg: Any) -> tuple[int, int]:
    hdr = msg["header"]
    return int(hdr["type"]), int(hdr.get("flags", 0))


def to_link(msg: Any) -> LinkEvent:
    mtype, _ = _header(msg)
    return LinkEvent(index=int(msg["index"]), name=str(msg.get("ifname") or ""),
                     flags=int(msg["flags"]), operstate=str(msg.get("IFLA_OPERSTATE") or ""),
                     deleted=mtype == RTM_DELLINK, linkmode=int(msg.get("IFLA_LINKMODE") or 0))


def to_addr(msg: Any) -> AddrEvent:
    mtype, _ = _header(msg)
    # IFA_LOCAL is our end of a point-to-point IPv4 link; IFA_ADDRESS is then the peer.
    address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS") or ""
    flags = msg.get("IFA_FLAGS")
    return AddrEvent(index=int(msg["index"]), family=int(msg["family"]), address=str(address),
                     prefixlen=int(msg["prefixlen"]),
                     flags=int(flags if flags is not None else msg["flags"]),
                     scope=int(msg["scope"]), deleted=mtype == RTM_DELADDR)


def to_route(msg: Any, now: float | None = None) -> RouteEvent | None:
    """A RouteEvent for a unicast default route, else None.

    `now` (clock time of the message) turns a lifetime (RTA_CACHEINFO rta_expires, ticks
    left; negative once run out) into RouteEvent.expires; 0 means the route never expires.
    """
    mtype, flags = _header(msg)
    if msg["dst_len"] != 0 or msg["type"] != RTN_UNICAST:
        return None
    table = int(msg.get("RTA_TABLE") or msg["table"])
    if table == RT_TABLE_LOCAL:
        return None
    gateway = msg.get("RTA_GATEWAY")
    oif = msg.get("RTA_OIF")
    oifs: tuple[int, ...] = (int(oif),) if oif else ()
    gateways: tuple[str | None, ...] = (str(gateway) if gateway else None,) if oif else ()
    for hop in msg.get("RTA_MULTIPATH") or ():
        hop_gw = hop.get("RTA_GATEWAY")
        oifs += (int(hop["oif"]),)
        gateways += (str(hop_gw) if hop_gw else None,)
        gateway = gateway or hop_gw
    nhid = msg.get("RTA_NH_ID")
    ticks = int((msg.get("RTA_CACHEINFO") or {}).get("rta_expires") or 0)
    expires = None if not ticks or now is None else now + ticks / _CLK_TCK
    return RouteEvent(family=int(msg["family"]), oifs=oifs,
                      gateway=str(gateway) if gateway else None, table=table,
                      priority=int(msg.get("RTA_PRIORITY") or 0),
                      deleted=mtype == RTM_DELROUTE, gateways=gateways,
                      nhid=int(nhid) if nhid else None,
                      replace=mtype == RTM_NEWROUTE and bool(flags & NLM_F_REPLACE),
                      expires=expires)


def decode(msg: Any, now: float | None = None,
           ) -> LinkEvent | AddrEvent | RouteEvent | NexthopEvent | None:
    mtype, _ = _header(msg)
    if mtype in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
        return to_nexthop(msg, mtype == RTM_DELNEXTHOP)
    if mtype in (RTM_NEWLINK, RTM_DELLINK):
        return to_link(msg)
    if mtype in (RTM_NEWADDR, RTM_DELADDR):
        return to_addr(msg)
    if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
        return to_route(msg, now)
    return None


async def query_default_routes(ipr: Any, index: int, family: int,
                               now: Callable[[], float]) -> tuple[RouteEvent, ...]:
    """Ask the kernel for the default route through one interface: no table dump.

    ENETUNREACH and friends mean there is none; an RA route whose lifetime ran out is
    already not found, although `ip route` lists it until the kernel's next GC.
    """
    try:
        msgs = await ipr.route("get", dst=_PROBE[family], oif=index,
                               flags=RTM_F_FIB_MATCH, family=family)
    except NetlinkError:
        return ()
    found = (to_route(m, now()) for m in msgs)
    return tuple(r for r in found if r is not None and r.deleted is False)


class RouteReader:
    """A second, unsubscribed socket for re-reading routes at a clock's say-so (an RA
    route's expiry): the event socket's reader owns its socket. Opened on first use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ipr: Any = None

    async def default_routes(self, index: int, family: int) -> tuple[RouteEvent, ...]:
        """As query_default_routes; raises OSError/TimeoutError if the kernel cannot say."""
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await query_default_routes(self._ipr, index, family, self._clock)
        except BaseException:
            self.close()  # a socket that failed once keeps failing (ENOBUFS, EBUSY)
            raise

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            with contextlib.suppress(OSError):
                ipr.close()


class NetlinkSource:
    """Owns one rtnetlink socket at a time; `events()` survives overflows by re-reading."""

    def __init__(self, *, route_iface: Callable[[str], bool] = lambda _: True,
                 rcvbuf: int = DEFAULT_RCVBUF, bpf: bool = True,
                 debug_rcvbuf: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._route_iface = route_iface
        self._clock = clock
        self._rcvbuf = rcvbuf
        self._bpf = bpf
        self._debug_rcvbuf = debug_rcvbuf
        self._ipr: Any = None
        self._names: dict[int, str] = {}
        self.resyncs = 0
        self.messages = 0

    async def _open(self) -> None:
        ipr = AsyncIPRoute()
        try:
            nexthops.register(ipr)
            await ipr.bind(groups=GROUPS)
            sock = ipr.socket
            if self._debug_rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._debug_rcvbuf)
            else:
                raise_rcvbuf(sock, self._rcvbuf)
            if self._bpf:
                attach_filter(sock, int(sock.getsockname()[0]))
        except BaseException:
            ipr.close()
            raise
        self._ipr = ipr

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            # Closing a socket that already failed must not hide why it failed.
            with contextlib.suppress(OSError):
                ipr.close()

    async def _dump(self, what: str) -> list[Any]:
        # NLM_F_DUMP_INTR: the table changed under the dump; the events cover the changes,
        # but entries the kernel skipped would be lost, so read it again.
        for _ in range(5):
            msgs = [m async for m in await getattr(self._ipr, what)("dump")]
            if not any(_header(m)[1] & NLM_F_DUMP_INTR for m in msgs):
                break
        return msgs

    async def default_routes(self, index: int, family: int) -> tuple[RouteEvent, ...]:
        """Ask the kernel for the default route through one interface: no table dump."""
        return await query_default_routes(self._ipr, index, family, self._clock)

    async def _snapshot(self, reason: str) -> Snapshot:
        # Nexthops first: the routes read next may refer to them by id only.
        nhs = await nexthops.dump(self._ipr)
        links = tuple(to_link(m) for m in await self._dump("link"))
        addrs = tuple(to_addr(m) for m in await self._dump("addr"))
        self._names = {link.index: link.name for link in links}
        routes: list[RouteEvent] = []
        for link in links:
            if link.flags & IFF_UP and self._route_iface(link.name):
                for family in _PROBE:
                    routes += await self.default_routes(link.index, family)
        return Snapshot(links=links, addrs=addrs, routes=tuple(dict.fromkeys(routes)),
                        reason=reason, nexthops=nhs)

    async def _resync(self, reason: str) -> Snapshot:
        """(Re)open, subscribe, then dump: changes during the dump queue up behind it."""
        delay = 0.05
        while True:
            self.close()
            try:
                await self._open()
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancel.
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    return await self._snapshot(reason)
            except (OSError, NetlinkError, TimeoutError) as exc:
                if reason == "start":
                    raise  # at start, a clear failure beats retrying a sandbox refusal forever
                log.warning("netlink_resync_failed", reason=reason, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def events(self) -> AsyncIterator[Event]:
        """A Snapshot, then live events; after ENOBUFS a fresh Snapshot, and on."""
        yield await self._resync("start")
        while True:
            try:
                async for event in self._read():
                    yield event
            except (OSError, NetlinkError, TimeoutError) as exc:
                overflow = getattr(exc, "code", getattr(exc, "errno", None)) == errno.ENOBUFS
                self.resyncs += 1
                if overflow:
                    log.warning("netlink_overflow", resyncs=self.resyncs)
                else:
                    log.error("netlink_error", error=str(exc) or type(exc).__name__,
                              resyncs=self.resyncs)
                yield await self._resync("overflow" if overflow else "error")

    async def _read(self) -> AsyncIterator[Event]:
        # pyroute2's get() ends after one datagram, hence the outer loop.
        while True:
            batch = [m async for m in self._ipr.get()]
            for msg in batch:
                self.messages += 1
                event = decode(msg, self._clock())
                if event is None:
                    continue
                if isinstance(event, LinkEvent):
                    if event.deleted:
                        self._names.pop(event.index, None)
                    else:
                        self._names[event.index] = event.name
                yield event
                # Removing an address can silently take IPv4 routes with it: ask again.
                if isinstance(event, AddrEvent) and event.deleted:
                    name = self._names.get(event.index)
                    if name is not None and self._route_iface(name):
                        async with asyncio.timeout(REQUEST_TIMEOUT):
                            routes = await self.default_routes(event.index, event.family)
                        yield DefaultRoutes(event.index, event.family, routes)
