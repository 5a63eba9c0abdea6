"""ODMR's reversed role (RFC 2645 4.3): aiosmtpd's SMTP server on the provider's own connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.odmr.hangup import STOP_DRAIN, Line
from etrnd.protocols.odmr.office import (
    LateReply,
    LocalMta,
    OfficeLost,
    Reply,
    queue_id,
    unavailable,
)
from etrnd.protocols.odmr.stream import Received, pass_on
from etrnd.protocols.replies import clean_text
from etrnd.protocols.seam import Messages, keeps_session, message_key, recipient_key
from etrnd.protocols.transcript import Transcript, tls_state

# aiosmtpd logs each session to the stdlib; etrnd's own events say what matters, once.
logging.getLogger("mail.log").addHandler(logging.NullHandler())
logging.getLogger("mail.log").propagate = False

# The idle timer restarts on every byte (a big message on a slow link is fine), so a provider
# trickling bytes could otherwise hold the round for ever. An hour moves ~450 MB at 1 Mbit/s;
# what was confirmed by then stays delivered, and the next attempt takes the rest.
MAX_TURNAROUND = 3600.0
# RFC 5321 4.5.3.2.6: the provider waits 10 min for the reply to the final dot, then gives up
# and sends the message again later. An office MTA silent for this long gets the provider a
# 451 from us well before that, so no copy is delivered that the provider thinks failed.
FINAL_REPLY_BOUND = 300.0
_late: set[asyncio.Task[None]] = set()  # late office replies still awaited (strong refs)


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
                 live: Messages | None = None, limit: int | None = None,
                 relay: str = "") -> None:
        self.local = local
        self.relay = relay  # its name, for metrics
        self.log = log
        self.result = result
        self.live = live  # the round's counts, kept current (see attempt.SendAttempt)
        self.configured_limit = limit  # max_message_size; None: the office MTA's SIZE
        self.limit: int | None = limit
        self.server: Receiver | None = None
        self.last_error: Reply | None = None  # the last 4xx/5xx the provider heard
        self._txn: _Transaction | None = None

    @contextlib.contextmanager
    def _busy(self, seconds: float | None = None) -> Iterator[None]:
        # The provider waits while the office MTA works: that is not an idle provider.
        if self.server is not None:
            self.server.hold_timer(seconds or self.local.timeout * 3)
        try:
            yield
        finally:
            if self.server is not None:
                self.server.hold_timer(None)

    async def handle_EHLO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Advertise SIZE (RFC 1870): max_message_size, else the office MTA's own."""
        session.host_name = hostname
        if self.configured_limit is None:
            with self._busy():
                self.limit = await self.local.size_limit()
        if self.limit is not None:
            responses.insert(1, f"250-SIZE {self.limit}")
        return responses

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self._finish_transaction()
        self._txn, self.last_error = _Transaction(sender=address), None
        declared = next((o.partition("=")[2] for o in options
                         if o.upper().startswith("SIZE=")), "")
        if self.limit is not None and declared.isdigit() and int(declared) > self.limit:
            reply = Reply(552, "5.3.4 message size exceeds fixed maximum message size")
            self._txn = None
            self._count("refused", reply, size=int(declared), sender=address, recipients=0,
                        offered=0)
            return reply.line
        with self._busy():
            reply = await self.local.mail(address, options)  # RSETs a leftover first
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

    async def begin_data(self) -> Reply:
        """DATA to the office MTA: 354 when it waits for the message, else its verdict."""
        with self._busy():
            reply = await self.local.start_data()
        if reply.code != 354:
            self._settle(reply, Received(), [])
        return reply

    async def send(self, octets: bytes, message: Received) -> None:
        """Part of the message to the office MTA; if it broke off, the rest is not sent
        (`message.problem` says why)."""
        if message.problem is not None:
            return
        try:
            with self._busy():
                await self.local.send(octets)
        except OfficeLost as exc:
            message.problem = unavailable(f"lost during DATA: {exc}")

    async def end_data(self, message: Received, envelope: Envelope) -> Reply:
        """The provider's final dot came: the office MTA's verdict, or why there is none."""
        if message.problem is not None:
            self.local.abort()  # no final dot: the office MTA discards what it got
            reply = message.problem
        else:
            with self._busy(FINAL_REPLY_BOUND + self.local.timeout):
                verdict = await self.local.end_data(FINAL_REPLY_BOUND)
            if isinstance(verdict, LateReply):
                reply = Reply(451, "4.4.2 the office MTA has not confirmed the message in "
                                   "time; try again later")
                self._duplicate_risk(verdict, message, envelope)
            else:
                reply = verdict
        self._settle(reply, message, envelope.rcpt_tos)
        return reply

    def lost_data(self, message: Received, envelope: Envelope) -> None:
        """The provider's leg broke off mid-DATA: the office MTA must not keep a part."""
        self.local.abort()
        self._settle(unavailable("the provider's connection broke off during DATA"),
                     message, envelope.rcpt_tos)

    def _settle(self, reply: Reply, message: Received, recipients: list[str]) -> None:
        txn, self._txn = self._txn or _Transaction(), None
        outcome = _outcome(reply)
        if outcome == "relayed":
            self.result.deferred_recipients += sum(1 for f in txn.failures if f.code < 500)
        mid, _ = message.ids()
        self._keep_keys(outcome, txn, mid, list(recipients), message.size)
        self._count(outcome, reply, size=message.size, sender=txn.sender or "",
                    recipients=len(recipients), offered=txn.recipients)

    def _duplicate_risk(self, late: LateReply, message: Received,
                        envelope: Envelope) -> None:
        """Log the risk now and, once the office MTA answers after all, what it said."""
        _, provider_id = message.ids()
        fields = {"provider_queue_id": provider_id, "size": message.size,
                  "sender": clean_text(envelope.mail_from or "", 200) or "<>",
                  "waited_s": FINAL_REPLY_BOUND}
        self.log.warning("odmr_duplicate_risk", office_queue_id="", office_code=0, **fields)

        async def settle_late() -> None:
            reply = await late.wait()
            if reply is None:
                self.log.info("odmr_duplicate_risk", office_queue_id="", office_code=0,
                              **fields)
                return
            level = self.log.warning if reply.ok else self.log.info
            level("odmr_duplicate_risk", office_queue_id=queue_id(reply.text),
                  office_code=reply.code, **fields)

        task = asyncio.get_running_loop().create_task(settle_late())
        _late.add(task)
        task.add_done_callback(_late.discard)

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
        """A transaction that ended without DATA: refused, deferred, or left by the provider."""
        txn, self._txn = self._txn, None
        if txn is None or (not txn.failures and txn.sender is None):
            return
        # Booked by the last error the provider heard (the office MTA's or aiosmtpd's own).
        last = txn.failures[-1] if txn.failures else self.last_error or Reply(
            0, "the provider ended the transaction before DATA")
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
        level("odmr_message", size=size, size_limit=self.limit or 0,
              sender=clean_text(sender, 200) or "<>", recipients=recipients,
              offered_recipients=offered, code=reply.code, text=reply.text, outcome=outcome)

    def finish(self) -> None:
        """At the end of the session: a transaction left open stays with the provider."""
        self._finish_transaction()


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
        # data_size_limit=None: SIZE is advertised and enforced by the handler (its limit).
        super().__init__(handler, hostname=hostname, ident="etrnd ODMR", timeout=timeout,
                         data_size_limit=None, enable_SMTPUTF8=True,
                         loop=asyncio.get_running_loop())
        handler.server = self
        self.relaying = handler
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
        raw = status if isinstance(status, bytes) else status.encode("utf-8", "replace")
        # The office leg in step: a reply that leaves no transaction open here (aiosmtpd's
        # own 5xx, a refused DATA, EHLO) must not leave one open at the office MTA, else the
        # provider's next MAIL meets "503 nested MAIL" there, a permanent refusal.
        envelope = self.envelope
        if self.relaying.local.in_transaction and (envelope is None
                                                   or envelope.mail_from is None):
            await self.relaying.local.rset()
        if raw[:1] in (b"4", b"5"):
            text = raw[4:].decode("utf-8", "replace")
            self.relaying.last_error = Reply(int(raw[:3]) if raw[:3].isdigit() else 0,
                                             clean_text(text, 200))
        await super().push(status)
        if self.transcript is not None:
            self.transcript.sent(raw + b"\r\n", tls_state(self.transport))

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, streamed: each line goes on to the office MTA as it arrives
        instead of the whole message being collected first, so memory does not grow with
        the message. The reply to the final dot is the office MTA's (RFC 5321 4.1.1.4);
        too long a line (500) or message (552) is read to its end and refused, the office
        MTA's copy aborted without the final dot."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler = self.relaying
        started = await handler.begin_data()
        if started.code != 354:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(started.line)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = Received()
        try:
            await pass_on(self._reader, message, handler.limit, handler.send)
        except asyncio.CancelledError:
            # aiosmtpd cancels us when the provider's connection ends (EOF or lost).
            handler.lost_data(message, envelope)
            raise
        reply = await handler.end_data(message, envelope)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply.line)

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
                  live: Messages | None = None, relay: str = "",
                  max_message_size: int | None = None) -> Turnaround:
    """Greet (220) on `transport` and serve the provider until it leaves; see Turnaround.

    Each message is also counted into `live` (the round's counts) as soon as it is settled.
    The provider may stay silent for `idle_timeout` seconds at most, and keep the connection
    for MAX_TURNAROUND seconds in all. Messages over `max_message_size` octets (None: the
    office MTA's SIZE, or no limit) are refused with 552. The connection ends by the
    provider's QUIT or close, or by our hang-up (hangup.Line: 421, FIN, drain; never a
    reset). Cancelled because the link went down (seam.keeps_session), the session goes on:
    a link back within `idle_timeout` lets TCP resume, and the cancel is raised once the
    session is over. Any other cancel hangs up (the drain bounded by hangup.STOP_DRAIN).
    Only CancelledError escapes; the office MTA's connection is closed either way.
    """
    result = Turnaround()
    handler = Relaying(local, log, result, live, max_message_size, relay)
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
