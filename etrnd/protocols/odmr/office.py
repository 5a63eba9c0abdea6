"""The office MTA (`deliver_to`): each ODMR transaction replayed step by step over SMTP or LMTP."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from aiosmtplib import SMTP, SMTPException, SMTPResponseException

from etrnd.config.values import DeliverTo
from etrnd.protocols.replies import clean_text
from etrnd.protocols.transcript import TranscriptSMTP

QUIT_TIMEOUT = 2.0
# After the provider was answered 451 for a message the office MTA had not confirmed in time,
# how long its late reply is still awaited, to name its queue ID: RFC 5321 4.5.3.2.6's 10 min.
LATE_REPLY_WAIT = 600.0
# MAIL parameters passed on when the office MTA advertises the extension (RFC 1870, 6152,
# 6531); the provider sees SMTPUTF8 offered, so internationalised mail is not bounced for us.
_PASSED_ON = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}
# What the office MTA's 250 to the final dot names the message by: Postfix "queued as 4Xyz",
# Exim "id=1tAbc-000123-XY". Other wordings leave the queue ID empty (the text is logged).
_QUEUE_ID = re.compile(r"(?:queued as|id=)\s*([\w.@-]+)", re.IGNORECASE)


def queue_id(text: str) -> str:
    """The queue ID in an office MTA's reply text, or "" when it names none."""
    match = _QUEUE_ID.search(text)
    return match.group(1) if match else ""


class _Drain(asyncio.StreamWriter):
    """asyncio's writer over aiosmtplib's connection, for drain() only: the connection is
    aiosmtplib's to close, not this writer's when it is collected (StreamWriter.__del__)."""

    def __del__(self) -> None:
        pass


class OfficeLost(Exception):
    """The office MTA's connection broke while a message was being streamed to it."""


@dataclass
class LateReply:
    """The office MTA's reply to the final dot, still awaited after the provider was answered
    (`future` gives the aiosmtplib SMTPResponse, or raises); the connection closes after it."""

    future: asyncio.Future[Any]
    smtp: SMTP

    async def wait(self) -> Reply | None:
        """The reply as the provider would have heard it, or None if none came (then or ever)."""
        try:
            response = await self.future
        except (SMTPException, OSError, TimeoutError):
            return None
        finally:
            self.smtp.close()
        return passed_back(response.code, response.message)


@dataclass(frozen=True)
class Reply:
    """A reply to hand back to the provider: the office MTA's code class, a one-line text."""

    code: int
    text: str

    @property
    def line(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code <= 299


def passed_back(code: int, text: str) -> Reply:
    """The office MTA's reply as the provider hears it: same class, cleaned text (RFC 5321 4.2).

    2xx becomes 250; 421 (the office MTA is closing) becomes 451, since the session with the
    provider goes on; a code outside 200-599 is a protocol error, so 451 (the provider keeps
    the message).
    """
    text = clean_text(text, 200) or "no text"
    if 200 <= code <= 299:
        return Reply(250, text)
    if code == 421 or not 400 <= code <= 599:
        return Reply(451, f"4.4.2 office MTA: {code} {text}")
    return Reply(code, text)


def unavailable(reason: str) -> Reply:
    """The office MTA could not be reached or broke off: the provider must keep the mail."""
    return Reply(451, clean_text(f"4.4.1 office MTA unavailable: {reason}", 200))


class LocalMta:
    """One connection to `deliver_to`, opened at the provider's EHLO (to read its SIZE) or
    first MAIL and kept for the ATRN session.

    Every method returns the Reply to give the provider and never raises (bar cancellation
    and `send`'s OfficeLost): a failure of the office MTA is a 451, so nothing is confirmed
    that was not accepted. DATA is ours (start_data, send, end_data) because aiosmtplib's
    data() takes a whole message: the message streams through in pieces instead.
    LMTP (RFC 2033) takes one recipient per transaction here, because it answers DATA once
    per recipient and the client library reads one reply per command: further RCPTs get
    452 (RFC 5321 4.5.3.1.10), which tells the provider to send them in a new transaction.
    """

    def __init__(self, target: DeliverTo, helo: str, timeout: float, log: Any) -> None:
        self.target = target
        self.helo = helo
        self.timeout = timeout
        self.log = log
        self._smtp: SMTP | None = None
        self._rcpts = 0  # recipients accepted in the open transaction
        # MAIL accepted and not yet ended by RSET or the reply to DATA: the provider's leg
        # must be in the same state, else the next MAIL meets "503 nested MAIL" here.
        self.in_transaction = False
        self._writer: asyncio.StreamWriter | None = None  # the open DATA stream

    async def _connect(self) -> SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        t = self.target
        smtp = TranscriptSMTP(hostname=t.host or "localhost", port=None if t.path else t.port,
                              socket_path=t.path, local_hostname=self.helo,
                              timeout=self.timeout, use_tls=False, start_tls=False,
                              transcript_log=self.log)
        await smtp.connect()
        if t.lmtp:
            response = await smtp.execute_command(b"LHLO", self.helo.encode("ascii"))
            if response.code != 250:
                smtp.close()
                raise SMTPResponseException(response.code, response.message)
            smtp.last_ehlo_response = response  # aiosmtplib then knows the extensions
        else:
            await smtp.ehlo()
        self._smtp = smtp
        return smtp

    async def _step(self, *command: bytes) -> Reply:
        try:
            smtp = await self._connect()
            response = await smtp.execute_command(*command)
        except (SMTPException, OSError, TimeoutError, ValueError) as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        if response.code == 421:
            await self.close()
        return passed_back(response.code, response.message)

    async def size_limit(self) -> int | None:
        """The office MTA's EHLO SIZE (RFC 1870) in octets; None when it has none (or 0) or
        cannot be reached now (its MAIL will then say why)."""
        try:
            smtp = await self._connect()
        except (SMTPException, OSError, TimeoutError):
            await self.close()
            return None
        value = smtp.esmtp_extensions.get("size", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """MAIL FROM with the parameters the office MTA understands; `<>` for a bounce."""
        self._rcpts = 0
        if self.in_transaction:
            await self.rset()  # a transaction the provider's leg no longer has
        address = _wire(sender)
        if address is None:
            return Reply(553, "5.1.7 sender address not accepted")
        try:
            smtp = await self._connect()
        except (SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        if "SMTPUTF8" in (o.upper() for o in options) and not smtp.supports_extension(
                "smtputf8"):
            return Reply(553, "5.6.7 the office MTA does not take SMTPUTF8 mail")
        params = [o.encode("ascii") for o in options
                  if (ext := _PASSED_ON.get(o.partition("=")[0].upper())) is not None
                  and smtp.supports_extension(ext) and o.isascii()]
        reply = await self._step(b"MAIL", b"FROM:<" + address + b">", *params)
        self.in_transaction = reply.ok
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        if self.target.lmtp and self._rcpts >= 1:
            return Reply(452, "4.5.3 one recipient per transaction, send the rest again")
        address = _wire(recipient)
        if not address:
            return Reply(553, "5.1.3 recipient address not accepted")
        reply = await self._step(b"RCPT", b"TO:<" + address + b">")
        if reply.ok:
            self._rcpts += 1
        return reply

    async def start_data(self) -> Reply:
        """DATA: Reply(354, ...) when the office MTA waits for the message, else its verdict.

        After 354, `send` the message as DATA octets (dot-stuffed, CRLF) and `end_data`.
        """
        smtp = self._smtp
        if smtp is None or not smtp.is_connected or smtp.protocol is None:
            return unavailable("connection lost before DATA")
        try:
            response = await smtp.execute_command(b"DATA")
        except (SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        if response.code != 354:
            # in_transaction stays: the next MAIL sends RSET first, harmless if not needed.
            if response.code == 421:
                await self.close()
            return passed_back(response.code, response.message)
        if smtp.protocol is None:
            return unavailable("connection lost after DATA")
        transport = smtp.protocol.transport
        assert isinstance(transport, asyncio.WriteTransport)
        # aiosmtplib's protocol keeps asyncio's flow control for exactly this (its
        # FlowControlMixin): a StreamWriter's drain() waits while the office is behind.
        # (The octets themselves go through the protocol's write, as every command does.)
        self._writer = _Drain(transport, smtp.protocol, None, asyncio.get_running_loop())
        return Reply(354, clean_text(response.message, 200))

    async def send(self, octets: bytes) -> None:
        """Part of the message, as DATA octets; waits while the office MTA is behind, so at
        most the transport's write buffer is held. Raises OfficeLost when it breaks off."""
        smtp = self._smtp
        if self._writer is None or smtp is None or smtp.protocol is None:
            raise OfficeLost("no DATA in progress")
        try:
            smtp.protocol.write(octets)  # aiosmtplib's, so the debug transcript counts it
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        except (SMTPException, OSError, TimeoutError, RuntimeError) as exc:
            self.abort()
            raise OfficeLost(str(exc) or type(exc).__name__) from None

    async def end_data(self, bound: float) -> Reply | LateReply:
        """The final dot (RFC 5321 4.1.1.4) and the office MTA's verdict on the message.

        If it has not answered within `bound` seconds, the reply is left to a LateReply (the
        connection goes with it, waiting up to `late` more) and a fresh one serves what follows.
        """
        smtp, self._writer = self._smtp, None
        self.in_transaction, self._rcpts = False, 0
        if smtp is None or smtp.protocol is None or not smtp.is_connected:
            return unavailable("connection lost during DATA")
        try:
            smtp.protocol.write(b".\r\n")
        except SMTPException as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        reading = asyncio.ensure_future(smtp.protocol.read_response(timeout=LATE_REPLY_WAIT))
        try:
            done, _ = await asyncio.wait({reading}, timeout=bound)
        except asyncio.CancelledError:
            reading.cancel()
            raise
        if not done:
            self._smtp = None  # the next transaction takes a new connection
            return LateReply(reading, smtp)
        try:
            response = reading.result()
        except (SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        return passed_back(response.code, response.message)

    async def rset(self) -> None:
        self._rcpts = 0
        self.in_transaction = False
        if self._smtp is not None and self._smtp.is_connected:
            await self._step(b"RSET")

    def abort(self) -> None:
        """Drop the connection at once: a message being streamed ends without its final dot,
        so the office MTA discards it (RFC 5321 4.1.1.4); also when cancelled."""
        smtp, self._smtp, self._writer = self._smtp, None, None
        self.in_transaction, self._rcpts = False, 0
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        smtp, self._smtp, self._writer = self._smtp, None, None
        self.in_transaction = False
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=min(self.timeout, QUIT_TIMEOUT))
        except (SMTPException, OSError, TimeoutError):
            pass
        finally:
            smtp.close()


def _wire(address: str) -> bytes | None:
    """The address between the angle brackets, or None if it must not go on the wire."""
    if address in ("", "<>"):
        return b""  # the null reverse-path of a bounce
    # aiosmtpd parsed it already; still, nothing that could end or split the command line.
    if any(c in address for c in "\r\n\0<>") or any(c.isspace() for c in address):
        return None
    return address.encode("utf-8", "surrogateescape")
