"""ODMR's reversed role (RFC 2645 4.3): aiosmtpd's SMTP server on the provider's own connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.odmr.hangup import STOP_DRAIN, Line
from etrnd.protocols.odmr.office import LocalMta, Reply
from etrnd.protocols.replies import clean_text
from etrnd.protocols.seam import Messages, keeps_session, message_key, recipient_key
from etrnd.protocols.transcript import Transcript, tls_state

# aiosmtpd logs each session to the stdlib; etrnd's own events say what matters, once.
logging.getLogger("mail.log").addHandler(logging.NullHandler())
logging.getLogger("mail.log").propagate = False

# The largest message taken from the provider: held in memory while the office MTA takes it.
DATA_SIZE_LIMIT = 64 * 1024 * 1024
# The idle timer restarts on every byte (a big message on a slow link is fine), so a provider
# trickling bytes could otherwise hold the round for ever. An hour moves ~450 MB at 1 Mbit/s;
# what was confirmed by then stays delivered, and the next attempt takes the rest.
MAX_TURNAROUND = 3600.0


@dataclass
class Turnaround:
    """How the reversed session went: messages by outcome, and how it ended."""

    messages: Messages = field(default_factory=Messages)
    deferred_recipients: int = 0  # 4xx to a RCPT: the provider still holds mail for them
    quit: bool = False  # the provider said QUIT: it has nothing more for us now
    ended: str = "dropped"  # quit | dropped | timeout


@dataclass
class _Transaction:
    sender: str | None = None
    recipients: int = 0
    failures: list[Reply] = field(default_factory=list)  # MAIL/RCPT replies that were not 2xx
    deferred: list[str] = field(default_factory=list)  # recipients the office MTA answered 4xx


class Relaying:
    """aiosmtpd handler: each step goes to the office MTA first; its reply goes back.

    So the provider hears 250 at the end of DATA only once the office MTA has taken the
    message, and a 4xx/5xx of the office MTA as the same class: it keeps what was not taken.
    """

    def __init__(self, local: LocalMta, log: Any, result: Turnaround,
                 live: Messages | None = None, relay: str = "") -> None:
        self.local = local
        self.relay = relay  # its name, for metrics
        self.log = log
        self.result = result
        self.live = live  # the round's counts, kept current (see attempt.SendAttempt)
        self.server: Receiver | None = None
        self._txn: _Transaction | None = None

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        # The provider waits while the office MTA works: that is not an idle provider.
        if self.server is not None:
            self.server.hold_timer(self.local.timeout * 3)
        try:
            yield
        finally:
            if self.server is not None:
                self.server.hold_timer(None)

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self._finish_transaction()
        self._txn = _Transaction(sender=address)
        with self._busy():
            reply = await self.local.mail(address, options)
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        else:
            self._txn.failures.append(reply)
            self._finish_transaction()
        return reply.line

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        with self._busy():
            reply = await self.local.rcpt(address)
        txn = self._txn or _Transaction()
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        else:
            txn.failures.append(reply)
            if reply.code < 500:
                txn.deferred.append(address)
        txn.recipients += 1
        return reply.line

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        with self._busy():
            reply = await self.local.data(content)
        txn, self._txn = self._txn or _Transaction(envelope.mail_from), None
        outcome = _outcome(reply)
        if outcome == "relayed":
            self.result.deferred_recipients += sum(1 for f in txn.failures if f.code < 500)
        self._keep_keys(outcome, txn, message_id(content), envelope.rcpt_tos, len(content))
        self._count(outcome, reply, size=len(content), sender=envelope.mail_from or "",
                    recipients=len(envelope.rcpt_tos), offered=txn.recipients)
        return reply.line

    async def handle_RSET(self, server: Any, session: Session, envelope: Envelope) -> str:
        self._finish_transaction()
        await self.local.rset()
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: Any, session: Session, envelope: Envelope) -> str:
        self._finish_transaction()
        self.result.quit, self.result.ended = True, "quit"
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        self.log.warning("odmr_server_error", error=type(error).__name__,
                         text=clean_text(str(error)))
        return "451 4.3.0 local error, try again later"

    def _finish_transaction(self) -> None:
        """A transaction that ended without an accepted DATA: refused or deferred."""
        txn, self._txn = self._txn, None
        if txn is None or (not txn.failures and txn.sender is None):
            return
        last = txn.failures[-1] if txn.failures else Reply(451, "4.0.0 no DATA was sent")
        # Only when every failure was permanent did the office MTA refuse the message.
        outcome = "refused" if all(f.code >= 500 for f in txn.failures) and txn.failures \
            else "deferred"
        self._keep_keys(outcome, txn, None, [], 0)
        self._count(outcome, last, size=0, sender=txn.sender or "", recipients=0,
                    offered=txn.recipients)

    def _keep_keys(self, outcome: str, txn: _Transaction, mid: str | None,
                   recipients: list[str], size: int) -> None:
        """The settled message's keys (attempt.message_key) into deferred_ids / relayed_ids."""
        sender = txn.sender or ""
        relayed: set[str] = set()
        deferred = {recipient_key(sender, r) for r in txn.deferred}
        if outcome == "relayed":
            relayed = {message_key(mid, sender, recipients, size)}
            relayed |= {recipient_key(sender, r) for r in recipients}
        elif outcome == "deferred" and (recipients or not deferred):
            # Deferred after DATA (or before any recipient): the message as a whole.
            deferred.add(message_key(mid, sender, recipients, size))
        for counts in (self.result.messages, self.live):
            if counts is not None:
                counts.relayed_ids |= relayed
                counts.deferred_ids |= deferred

    def _count(self, outcome: str, reply: Reply, *, size: int, sender: str, recipients: int,
               offered: int) -> None:
        for counts in (self.result.messages, self.live):
            if counts is not None:
                setattr(counts, outcome, getattr(counts, outcome) + 1)
        metrics.odmr_message(self.relay, outcome)
        level = self.log.info if outcome == "relayed" else self.log.warning
        level("odmr_message", size=size, sender=clean_text(sender, 200) or "<>",
              recipients=recipients, offered_recipients=offered, code=reply.code,
              text=reply.text, outcome=outcome)

    def finish(self) -> None:
        """At the end of the session: a transaction left open stays with the provider."""
        self._finish_transaction()


def message_id(content: bytes) -> str | None:
    """The Message-ID header's value (RFC 5322 3.6.4), or None; only the header is read."""
    head = content.split(b"\r\n\r\n", 1)[0]
    value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID")
    # An msg-id has no white space: what a folded header adds is not part of it.
    return clean_text("".join(str(value).split()), 998) or None if value else None


def _outcome(reply: Reply) -> str:
    if reply.ok:
        return "relayed"
    return "refused" if reply.code >= 500 else "deferred"


def _collect(task: asyncio.Future[None]) -> None:
    """aiosmtpd's client task may end on a reply written to a connection we closed (a stop or
    link-down mid-command): that is how a turnaround ends, not an error for asyncio to report
    as "never retrieved". Anything else is left for the loop's handler to report."""
    if task.cancelled():
        return
    exc = task.exception()  # retrieved, so asyncio stays quiet; we say what matters
    if exc is not None and not isinstance(exc, ConnectionError):
        get_logger().error("odmr_receiver_failed", error=f"{type(exc).__name__}: {exc}")


class Receiver(SMTPServer):
    """aiosmtpd's SMTP server, taking over a connection that is already open (after ATRN).

    `closed` resolves when the connection is gone (QUIT, drop, or `timeout` seconds without
    a byte from the provider). The idle timer restarts on every byte received, so a large
    message on a slow link is not cut off, and is held while the office MTA works.
    """

    def __init__(self, handler: Relaying, hostname: str, timeout: float,
                 transcript: Transcript | None = None) -> None:
        super().__init__(handler, hostname=hostname, ident="etrnd ODMR", timeout=timeout,
                         data_size_limit=DATA_SIZE_LIMIT, enable_SMTPUTF8=True,
                         loop=asyncio.get_running_loop())
        handler.server = self
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timed_out = False
        self.transcript = transcript  # the client leg's, so the debug dialogue reads on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = self._handler_coroutine
        if task is not None:
            task.add_done_callback(_collect)

    def data_received(self, data: bytes) -> None:
        self._reset_timeout()
        if self.transcript is not None:
            self.transcript.received(data, tls_state(self.transport))
        super().data_received(data)

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        if self.transcript is not None:
            raw = status if isinstance(status, bytes) else status.encode("utf-8", "replace")
            self.transcript.sent(raw + b"\r\n", tls_state(self.transport))

    def hold_timer(self, seconds: float | None) -> None:
        """Restart the idle timer: `seconds` from now, or the session's timeout (None)."""
        self._reset_timeout(seconds)

    def _timeout_cb(self) -> None:
        line = self.transport
        if isinstance(line, Line) and not line.hung_up:
            self.timed_out = True
            line.hang_up(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self.closed.done():
            self.closed.set_result(None)


async def receive(transport: asyncio.Transport, local: LocalMta, *, hostname: str,
                  idle_timeout: float, log: Any,
                  transcript: Transcript | None = None,
                  live: Messages | None = None, relay: str = "") -> Turnaround:
    """Greet (220) on `transport` and serve the provider until it leaves; see Turnaround.

    Each message is also counted into `live` (the round's counts) as soon as it is settled.
    The provider may stay silent for `idle_timeout` seconds at most, and keep the connection
    for MAX_TURNAROUND seconds in all. The connection ends by the provider's QUIT or close,
    or by our hang-up (hangup.Line: 421, FIN, drain; never a reset). Cancelled because the
    link went down (seam.keeps_session), the session goes on: a link back within
    `idle_timeout` lets TCP resume, and the cancel is raised once the session is over. Any
    other cancel hangs up (the drain bounded by hangup.STOP_DRAIN). Only CancelledError
    escapes; the office MTA's connection is closed either way.
    """
    result = Turnaround()
    handler = Relaying(local, log, result, live, relay)
    server = Receiver(handler, hostname, idle_timeout, transcript)
    line = Line(transport, log)
    line.set_protocol(server)
    server.connection_made(line)
    try:
        async with asyncio.timeout(MAX_TURNAROUND):
            await _serve(server, line, log, idle_timeout)
    except TimeoutError:
        server.timed_out = True
        log.warning("odmr_turnaround_too_long", limit_s=MAX_TURNAROUND)
        line.hang_up(f"421 4.4.2 {hostname} session too long, try again later")
        await asyncio.wait({server.closed})  # the drain's own limit bounds it
    except asyncio.CancelledError:
        # The provider keeps what it has not heard 250 for.
        local.abort()
        handler.finish()
        raise
    handler.finish()
    await local.close()
    if not result.quit:
        result.ended = "timeout" if server.timed_out else "dropped"
    return result


async def _serve(server: Receiver, line: Line, log: Any, idle_timeout: float) -> None:
    """Until the provider's connection is gone, or a cancel that does not keep it."""
    kept: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.shield(server.closed)
            break
        except asyncio.CancelledError as exc:
            if kept is None and keeps_session(exc) and not line.hung_up:
                kept = exc
                log.info("odmr_session_kept", reason=str(exc.args[0]),
                         idle_timeout_s=idle_timeout)
                continue
            line.hang_up(f"421 4.3.2 {server.hostname} closing the session, try again later",
                         STOP_DRAIN)
            await asyncio.wait({server.closed})  # bounded by STOP_DRAIN
            raise
    if kept is not None:
        raise kept
