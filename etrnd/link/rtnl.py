"""etrnd's rtnetlink socket on the asyncio loop: requests, multi-part replies, events.

pyroute2's socket (`AsyncIPRoute`) cost ~90 ms of imports at every start (its IPRoute pulls
in ipmock, tcmsg, unittest, multiprocessing...) and a few hundred µs of Python per message
on the link-up path; what etrnd asks of the kernel is five kinds of request (link, address
and nexthop dumps, a route look-up by destination or by interface), framed here with
`struct` (linux/netlink.h, linux/rtnetlink.h). Decoding is etrnd.link.codec's.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections import deque
from typing import NamedTuple

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
RTA = struct.Struct("=HH")  # rtattr: len, type
_ERRNO = struct.Struct("=i")

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI = 0x1, 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTA_DST, RTA_SRC, RTA_OIF = 1, 2, 4
RTM_F_FIB_MATCH = 0x2000
# A dump datagram is at most 32 KiB (the kernel's netlink_dump); events are smaller.
BUFSIZE = 1 << 16
REQUEST_TIMEOUT = 5.0  # seconds for one request's whole answer (a dump: every part of it)
DUMP_RETRIES = 5


class NetlinkError(OSError):
    """The kernel refused a request (NLMSG_ERROR): `errno` is its error number."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


class Message(NamedTuple):
    """One netlink message: `data` is all of it, its nlmsghdr included (NLMSGHDR.size bytes)."""

    type: int
    flags: int
    seq: int
    pid: int
    data: bytes


def messages(data: bytes) -> list[Message]:
    """The messages of one datagram, in order (a truncated tail is dropped)."""
    out = []
    offset, size = 0, len(data)
    while offset + NLMSGHDR.size <= size:
        length, mtype, flags, seq, pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > size:
            break
        out.append(Message(mtype, flags, seq, pid, data[offset:offset + length]))
        offset += (length + 3) & ~3
    return out


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    pad = -len(payload) % 4
    return RTA.pack(RTA.size + len(payload), kind) + payload + b"\0" * pad


def route_get(family: int, dst: str | None, *, src: str | None = None, oif: int = 0,
              rtm_flags: int = 0) -> tuple[int, bytes]:
    """An RTM_GETROUTE as `ip route get DST [from SRC] [oif N] [fibmatch]` sends it: the
    route the kernel would take to `dst`; with RTM_F_FIB_MATCH the table entry that matched."""
    bits = 128 if family == socket.AF_INET6 else 32
    # rtm_table is left 0: the kernel reads it only with RTM_F_LOOKUP_TABLE (rules decide).
    body = RTMSG.pack(family, bits if dst else 0, bits if src else 0, 0, 0, 0, 0, 0, rtm_flags)
    if dst:
        body += attr(RTA_DST, socket.inet_pton(family, dst))
    if src:
        body += attr(RTA_SRC, socket.inet_pton(family, src))
    if oif:
        body += attr(RTA_OIF, struct.pack("=I", oif))
    return RTM_GETROUTE, body


class Rtnl:
    """One NETLINK_ROUTE socket used on the running loop, subscribed to `groups`.

    Replies are told from events by sequence number and port id; events read while a request
    waits for its answer are kept, in order, for `events()`. One request at a time (a lock);
    `events()` has one reader, which may make requests between its reads.
    """

    def __init__(self, groups: int = 0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, groups))
            self.portid = int(self.sock.getsockname()[0])
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0
        self.last_flags = 0  # of the last request's answer, every part ORed
        self._backlog: deque[Message] = deque()
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self.sock.close()

    def _mine(self, msg: Message) -> bool:
        # An answer to us (events carry the port id of whoever made the change, or 0).
        return msg.pid == self.portid and msg.seq != 0

    async def request(self, mtype: int, body: bytes,
                      flags: int = NLM_F_REQUEST) -> list[Message]:
        """Send one request and read its whole answer (every part of a multi-part one).

        Raises NetlinkError (the kernel's errno), OSError (the socket's, e.g. ENOBUFS),
        TimeoutError after REQUEST_TIMEOUT seconds. The answer's NLMSG_DONE is left out; its flags
        are kept in `last_flags` (NLM_F_DUMP_INTR).
        """
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._seq = self._seq % 0x7FFFFFFF + 1
            seq = self._seq
            self.last_flags = 0
            replies: list[Message] = []
            # The kernel answers a request within the send (a dump's later parts within the
            # recv that makes room for them): the answer is usually there at once, and the
            # time-out (a timer, some µs) is armed only when it is not.
            packet = NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body
            try:
                self.sock.send(packet)
            except BlockingIOError:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await loop.sock_sendall(self.sock, packet)
            deadline = loop.time() + REQUEST_TIMEOUT
            while True:
                try:
                    data = self.sock.recv(BUFSIZE)
                except BlockingIOError:
                    async with asyncio.timeout_at(deadline):
                        data = await loop.sock_recv(self.sock, BUFSIZE)
                if self._answer(messages(data), seq, replies):
                    return replies

    def _answer(self, msgs: list[Message], seq: int, replies: list[Message]) -> bool:
        """Sort one datagram's messages into `replies` (to request `seq`) and the backlog of
        events; True once the answer is complete. Raises NetlinkError."""
        for msg in msgs:
            if not self._mine(msg):
                self._backlog.append(msg)
                continue
            if msg.seq != seq:
                continue  # the late answer to a request that timed out
            self.last_flags |= msg.flags
            if msg.type in (NLMSG_ERROR, NLMSG_DONE):
                # Both carry an int: -errno, 0 for an acknowledgement or a clean end.
                code = (-_ERRNO.unpack_from(msg.data, NLMSGHDR.size)[0]
                        if len(msg.data) >= NLMSGHDR.size + 4 else 0)
                if code > 0:
                    raise NetlinkError(code)
                return True
            replies.append(msg)
            if not msg.flags & NLM_F_MULTI:
                return True
        return False

    async def dump(self, mtype: int, body: bytes) -> list[Message]:
        """A whole table; read again (up to DUMP_RETRIES times) while the kernel says the
        table changed under the dump (NLM_F_DUMP_INTR): entries it skipped would be lost."""
        for _ in range(DUMP_RETRIES):
            msgs = await self.request(mtype, body, NLM_F_REQUEST | NLM_F_DUMP)
            if not self.last_flags & NLM_F_DUMP_INTR:
                break
        return msgs

    async def events(self) -> list[Message]:
        """The next messages that answer no request (the subscribed groups' events): those
        read meanwhile first, else the next datagram. Raises OSError (ENOBUFS: some were lost)."""
        if self._backlog:
            out = list(self._backlog)
            self._backlog.clear()
            return out
        data = await asyncio.get_running_loop().sock_recv(self.sock, BUFSIZE)
        return [m for m in messages(data) if not self._mine(m)]


__all__ = ["BUFSIZE", "Message", "NetlinkError", "Rtnl", "attr", "messages", "route_get"]
