"""The rtnetlink adapter: subscribe, dump, filter in the kernel, yield typed immutable events."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from etrnd.link import codec, nexthops
from etrnd.link.nexthops import RTMGRP_NEXTHOP
from etrnd.link.rtnl import (
    NLM_F_MULTI,
    REQUEST_TIMEOUT,
    RTM_DELNEXTHOP,
    RTM_DELROUTE,
    RTM_F_FIB_MATCH,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTM_NEWNEXTHOP,
    RTM_NEWROUTE,
    Message,
    NetlinkError,
    Rtnl,
    route_get,
)
from etrnd.link.state import (
    IFF_UP,
    AddrEvent,
    DefaultRoutes,
    Event,
    LinkEvent,
    RouteEvent,
    Snapshot,
)
from etrnd.outputs.logs import get_logger

log = get_logger()

# LINK, IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE, NEXTHOP
GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400 | RTMGRP_NEXTHOP
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
DEFAULT_RCVBUF = 8 << 20
# A destination no sane table routes more specifically than the default route; with
# RTM_F_FIB_MATCH and an oif the kernel answers with the default route through that oif
# (IPv6: no destination at all, ::/0).
_PROBE: dict[int, str | None] = {socket.AF_INET: "0.0.0.1", socket.AF_INET6: None}
# Dump requests: an ifinfomsg / ifaddrmsg of family AF_UNSPEC (every family, no filter).
_IFINFOMSG_ANY, _IFADDRMSG_ANY = bytes(16), bytes(8)

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


def decode(msg: Message, now: float | None = None) -> Event | None:
    """The event of one live message (nexthop objects by pyroute2's codec, see nexthops)."""
    if msg.type in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP):
        return nexthops.decode(msg)
    return codec.decode(msg, now)


async def query_default_routes(rtnl: Rtnl, index: int, family: int,
                               now: Callable[[], float]) -> tuple[RouteEvent, ...]:
    """Ask the kernel for the default route through one interface: no table dump.

    ENETUNREACH and friends mean there is none; an RA route whose lifetime ran out is
    already not found, although `ip route` lists it until the kernel's next GC.
    """
    mtype, body = route_get(family, _PROBE[family], oif=index, rtm_flags=RTM_F_FIB_MATCH)
    try:
        msgs = await rtnl.request(mtype, body)
    except NetlinkError:
        return ()
    found = (codec.route(m, now()) for m in msgs if m.type == RTM_NEWROUTE)
    return tuple(r for r in found if r is not None)


class RouteReader:
    """A second, unsubscribed socket for re-reading routes at a clock's say-so (an RA
    route's expiry): the event socket's reader owns its socket. Opened on first use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rtnl: Rtnl | None = None

    async def default_routes(self, index: int, family: int) -> tuple[RouteEvent, ...]:
        """As query_default_routes; raises OSError/TimeoutError if the kernel cannot say."""
        if self._rtnl is None:
            self._rtnl = Rtnl()
        try:
            return await query_default_routes(self._rtnl, index, family, self._clock)
        except BaseException:
            self.close()  # a socket that failed once keeps failing (ENOBUFS, EBUSY)
            raise

    def close(self) -> None:
        rtnl, self._rtnl = self._rtnl, None
        if rtnl is not None:
            rtnl.close()


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
        self._rtnl: Rtnl | None = None
        self._names: dict[int, str] = {}
        self.resyncs = 0
        self.messages = 0

    def _open(self) -> Rtnl:
        rtnl = Rtnl(GROUPS)
        try:
            sock = rtnl.sock
            if self._debug_rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._debug_rcvbuf)
            else:
                raise_rcvbuf(sock, self._rcvbuf)
            if self._bpf:
                attach_filter(sock, rtnl.portid)
        except BaseException:
            rtnl.close()
            raise
        self._rtnl = rtnl
        return rtnl

    def close(self) -> None:
        rtnl, self._rtnl = self._rtnl, None
        if rtnl is not None:
            rtnl.close()

    async def default_routes(self, index: int, family: int) -> tuple[RouteEvent, ...]:
        """Ask the kernel for the default route through one interface: no table dump."""
        assert self._rtnl is not None, "not open"
        return await query_default_routes(self._rtnl, index, family, self._clock)

    async def _snapshot(self, rtnl: Rtnl, reason: str) -> Snapshot:
        # Nexthops first: the routes read next may refer to them by id only.
        nhs = await nexthops.dump(rtnl)
        links = tuple(codec.link(m) for m in await rtnl.dump(RTM_GETLINK, _IFINFOMSG_ANY)
                      if m.type == RTM_NEWLINK)
        addrs = tuple(codec.addr(m) for m in await rtnl.dump(RTM_GETADDR, _IFADDRMSG_ANY))
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
                rtnl = self._open()
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancel.
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    return await self._snapshot(rtnl, reason)
            except (OSError, TimeoutError) as exc:
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
            except (OSError, TimeoutError) as exc:
                overflow = isinstance(exc, OSError) and exc.errno == errno.ENOBUFS
                self.resyncs += 1
                if overflow:
                    log.warning("netlink_overflow", resyncs=self.resyncs)
                else:
                    log.error("netlink_error", error=str(exc) or type(exc).__name__,
                              resyncs=self.resyncs)
                yield await self._resync("overflow" if overflow else "error")

    async def _read(self) -> AsyncIterator[Event]:
        rtnl = self._rtnl
        assert rtnl is not None, "not open"
        while True:
            for msg in await rtnl.events():
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
                        routes = await self.default_routes(event.index, event.family)
                        yield DefaultRoutes(event.index, event.family, routes)


__all__ = ["DEFAULT_RCVBUF", "GROUPS", "NLM_F_MULTI", "RTM_DELROUTE", "RTM_NEWLINK",
           "RTM_NEWROUTE", "NetlinkSource", "RouteReader", "attach_filter", "bpf_program",
           "decode", "query_default_routes", "raise_rcvbuf"]
