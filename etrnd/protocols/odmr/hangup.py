"""The provider's connection after the turnaround: it ends with a FIN and a drain, never a reset.

Why: closing a socket that still has data coming makes the kernel answer with a TCP reset
(RFC 1122 4.2.2.13), and Exim 4.100, the ODMR provider, books a reset in the middle of a data
block, after every RCPT got 250, as a *delivery* (smtp transport: "peer close after all rcpt
responses; converting i/o-error to no-error"): the message is gone from its queue and never
reached the office. So ours is the close RFC 5321 3.8 describes for a server that must stop:
a 421, our FIN, and reading on (discarding) until the provider closes its side, within a bound.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

# How long a hung-up connection is drained at most (seconds) before it is closed anyway.
# RFC 5321 4.5.3.2 has a client give up after 10 minutes at the longest (the reply to the
# final dot): by then a provider still sending into a dead link has given up on its own, and
# its transaction ends as a deferral, whatever our kernel says to a late segment.
DRAIN_LIMIT = 600.0
# ... and when the process is stopping: below systemd's TimeoutStopSec (30 s in our unit).
STOP_DRAIN = 20.0
# Once the provider's TCP has acknowledged our FIN, a reset can no longer catch it in the
# middle of a transfer: it knows we are gone, and its next write fails with EPIPE (which
# Exim defers) rather than ECONNRESET. The drain then ends after this long without data
# (seconds), or this long in all, so a provider that ignores the 421 cannot hold us:
DRAIN_QUIET = 2.0
FIN_GRACE = 5.0
_POLL = 0.5  # seconds between looks at the socket's TCP state during a drain
# Linux TCP states (tcp_states.h) after our FIN was acknowledged: FIN_WAIT2, TIME_WAIT, CLOSE.
_FIN_ACKED = (5, 6, 7)


class Line(asyncio.Transport):
    """The provider's connection as the SMTP server sees it (wrapping `real`, the transport
    the ATRN session used): its close() and abort() are a hang-up (see hang_up), so no code
    path of the server, ours or aiosmtpd's, can reset the provider.

    Stands between `real` and the server in both directions: `real` delivers to this line's
    tap, which passes everything on to the server until the hang-up and discards it after.
    """

    def __init__(self, real: asyncio.Transport, log: Any) -> None:
        super().__init__()
        self._real = real
        self._log = log
        self._server: asyncio.Protocol | None = None
        self._tap = _Tap(self)
        self._hung_up: float | None = None  # monotonic time of the hang-up
        self._peer_eof = False  # the provider closed its side: nothing more will come
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # loop time at which the drain gives up
        self._last_data = 0.0  # loop time of the last octet drained
        self._fin_acked_at: float | None = None  # loop time our FIN was seen acknowledged
        self.drained = 0  # octets read and discarded after the hang-up
        real.set_protocol(self._tap)

    @property
    def hung_up(self) -> bool:
        return self._hung_up is not None

    def hang_up(self, reply: str | None = None, limit: float = DRAIN_LIMIT, *,
                tell_server: bool = True) -> None:
        """End the session without a reset: stop passing the provider's bytes to the server,
        send `reply` (a 421, RFC 5321 4.2.2: it answers a DATA in progress too, since the
        provider reads it after its final dot), shut down our sending side (FIN), and read
        and discard what the provider still sends until it closes, for `limit` seconds at
        most. Calling it again only shortens the limit. The server learns of the end at once
        (as an EOF: aiosmtpd stops its session, an office copy in progress is aborted) unless
        it asked for it itself (`tell_server` False: close()), and of the connection's loss
        when the drain is over.
        """
        loop = asyncio.get_running_loop()
        if self._hung_up is not None:
            self._deadline = min(self._deadline, loop.time() + limit)
            return
        self._hung_up = time.monotonic()
        real = self._real
        if reply is not None and not real.is_closing():
            real.write(reply.encode("ascii", "replace") + b"\r\n")
        if self._peer_eof or real.is_closing():
            real.close()  # nothing more can come: what is queued goes out, then our FIN
        else:
            if real.can_write_eof():
                real.write_eof()  # a TLS transport cannot half-close: it closes after the drain
            real.resume_reading()  # the server may have paused it; the drain must read
            self._deadline = self._last_data = loop.time()
            self._deadline += limit
            self._timer = loop.call_later(_POLL, self._check)
            if tell_server:  # else the server's own close() after QUIT, nothing to report
                self._log.info("odmr_hangup", reply=reply, drain_limit_s=limit)
        if tell_server and self._server is not None and not self._peer_eof:
            self._server.eof_received()

    def _check(self) -> None:
        """The drain's timer: ends it once the provider has our FIN and is quiet (or has had
        it for FIN_GRACE), or at the deadline; else looks again in a moment."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        if now >= self._deadline:
            self._log.warning("odmr_hangup_forced", drained=self.drained,
                              after_s=round(time.monotonic() - (self._hung_up or 0), 1),
                              reason="the provider did not acknowledge our FIN within the "
                                     "drain limit (no link?); closing: a segment it sends "
                                     "later gets a reset")
            self._real.close()
            return
        if self._fin_acked_at is None and self._fin_acked():
            self._fin_acked_at = now
        if self._fin_acked_at is not None and (now - self._last_data >= DRAIN_QUIET
                                               or now - self._fin_acked_at >= FIN_GRACE):
            self._real.close()
        else:
            self._timer = asyncio.get_running_loop().call_later(_POLL, self._check)

    def _fin_acked(self) -> bool:
        """Whether the provider's TCP acknowledged our FIN (Linux TCP_INFO's state)."""
        sock = self._real.get_extra_info("socket")
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except (AttributeError, OSError):
            return False  # not TCP, or closed: the deadline decides
        return bool(info) and info[0] in _FIN_ACKED

    def _lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._hung_up is not None and self.drained:
            self._log.info("odmr_hangup_drained", drained=self.drained,
                           after_s=round(time.monotonic() - self._hung_up, 3))
        if self._server is not None:
            self._server.connection_lost(exc)

    # --- the transport, as the server uses it ---------------------------------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._server = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._server is not None
        return self._server

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._hung_up is not None or self._real.is_closing()

    def close(self) -> None:
        self.hang_up(tell_server=False)

    def abort(self) -> None:
        self.hang_up(tell_server=False)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._hung_up is None:  # after the hang-up the 421 was our last word
            self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False  # the server ends the session with close(): a hang-up

    def write_eof(self) -> None:
        raise NotImplementedError("a Line ends with close(), which hangs up")

    def pause_reading(self) -> None:
        if self._hung_up is None:
            self._real.pause_reading()

    def resume_reading(self) -> None:
        if self._hung_up is None:
            self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()


class _Tap(asyncio.Protocol):
    """The real transport's protocol: the provider's bytes go to the server, or, once the
    line is hung up, are counted and dropped."""

    def __init__(self, line: Line) -> None:
        self.line = line

    def data_received(self, data: bytes) -> None:
        line = self.line
        if line.hung_up:
            line.drained += len(data)
            line._last_data = asyncio.get_running_loop().time()
        elif line._server is not None:
            line._server.data_received(data)

    def eof_received(self) -> bool | None:
        line = self.line
        line._peer_eof = True
        if line.hung_up or line._server is None:
            return False  # drained to the end: close now, both FINs are out
        return line._server.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.line._lost(exc)

    def pause_writing(self) -> None:
        if self.line._server is not None:
            self.line._server.pause_writing()

    def resume_writing(self) -> None:
        if self.line._server is not None:
            self.line._server.resume_writing()
