"""The office MTA (`deliver_to`): each ODMR transaction replayed step by step over SMTP or LMTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiosmtplib import SMTP, SMTPDataError, SMTPException, SMTPResponseException

from etrnd.config.values import DeliverTo
from etrnd.protocols.replies import clean_text
from etrnd.protocols.transcript import TranscriptSMTP

QUIT_TIMEOUT = 2.0
# MAIL parameters passed on when the office MTA advertises the extension (RFC 1870, 6152,
# 6531); the provider sees SMTPUTF8 offered, so internationalised mail is not bounced for us.
_PASSED_ON = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}


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
    """One connection to `deliver_to`, opened at the first MAIL and kept for the ATRN session.

    Every method returns the Reply to give the provider and never raises (bar cancellation):
    a failure of the office MTA is a 451, so nothing is confirmed that was not accepted.
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

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """MAIL FROM with the parameters the office MTA understands; `<>` for a bounce."""
        self._rcpts = 0
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
        return await self._step(b"MAIL", b"FROM:<" + address + b">", *params)

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

    async def data(self, content: bytes) -> Reply:
        """DATA and the message; the reply is the office MTA's verdict on it."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return unavailable("connection lost before DATA")
        try:
            response = await smtp.data(content)
        except SMTPDataError as exc:
            return passed_back(exc.code, exc.message)
        except (SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return unavailable(str(exc) or type(exc).__name__)
        finally:
            self._rcpts = 0
        return passed_back(response.code, response.message)

    async def rset(self) -> None:
        self._rcpts = 0
        if self._smtp is not None and self._smtp.is_connected:
            await self._step(b"RSET")

    def abort(self) -> None:
        """Drop the connection at once (cancelled: a link-down is waiting on us)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
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
