"""A scripted ODMR provider (RFC 2645) and office MTA on 127.0.0.1, for session and fault tests.

The provider keeps a queue like a real one: a message leaves it only when the customer
answered 250 at the end of its DATA (or 5xx: bounced); anything else stays for the next ATRN.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

USER, PASSWORD = "odmruser", "odmr-Pa55-never-log-me"


@dataclass
class Message:
    sender: str
    rcpts: list[str]
    body: bytes = b"Subject: test\r\n\r\nhello\r\n.leading dot\r\n"
    utf8: bool = False  # MAIL FROM with SMTPUTF8 (RFC 6531)

    def domain(self) -> str:
        return self.rcpts[0].rpartition("@")[2]


@dataclass
class Provider:
    """Each ATRN takes the next scripted reply ("250" = turn around and deliver)."""

    queue: list[Message] = field(default_factory=list)
    atrn_replies: list[str] = field(default_factory=list)  # default: 250 / 453 by the queue
    mechanisms: str = "PLAIN LOGIN CRAM-MD5"
    # deliver | stall | drop_after_first | stall_after_first | trickle
    after_turnaround: str = "deliver"
    stop_on_451: bool = True  # Exim: one 451 from the customer ends the ATRN session
    quit_with_fin: bool = True  # Exim: QUIT and FIN together, no wait for 221
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this server context
    tls_active: bool = False  # the (last) session is under TLS
    tls_log: list[str] = field(default_factory=list)  # customer lines read under TLS
    delivered: list[Message] = field(default_factory=list)
    bounced: list[Message] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # every line both ways, for assertions
    peers: list[str] = field(default_factory=list)  # the customer's address, per session
    port: int = 0
    after_quit: bytes = b""  # what the customer still sent after the provider's QUIT
    greeted: asyncio.Event = field(default_factory=asyncio.Event)  # the customer's 220 came
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)  # a 250 after DATA came
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _line(self, reader: asyncio.StreamReader) -> str:
        line = (await reader.readline()).decode("utf-8", "replace")
        if not line:
            raise ConnectionResetError("customer closed")
        self.log.append("C: " + line.rstrip("\r\n"))
        if self.tls_active:
            self.tls_log.append(line.rstrip("\r\n"))
        return line.rstrip("\r\n")

    async def _reply(self, reader: asyncio.StreamReader) -> int:
        while True:
            line = await self._line(reader)
            if line[3:4] != "-":
                return int(line[:3])

    def _say(self, writer: asyncio.StreamWriter, text: str) -> None:
        self.log.append("P: " + text)
        writer.write(text.encode() + b"\r\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._say(writer, "220 provider.test ESMTP")
        authed = False
        while True:
            line = await self._line(reader)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                tls = "250-STARTTLS\r\n" if self.tls and not writer.get_extra_info(
                    "ssl_object") else ""
                self._say(writer, f"250-provider.test\r\n{tls}250-AUTH {self.mechanisms}"
                          "\r\n250 ATRN")
            elif verb == "STARTTLS" and self.tls is not None:
                self._say(writer, "220 go ahead")
                await writer.drain()
                await writer.start_tls(self.tls)
                self.tls_active, authed = True, False
            elif verb == "AUTH":
                authed = await self._auth(arg, reader, writer)
            elif verb == "ATRN":
                if not authed:
                    self._say(writer, "530 ATRN is not permitted without authentication")
                    continue
                domains = arg.split(",")
                wanted = [m for m in self.queue if m.domain() in domains]
                reply = (self.atrn_replies.pop(0) if self.atrn_replies
                         else "250 turning line around" if wanted else "453 You have no mail")
                self._say(writer, reply)
                if reply.startswith("250"):
                    await self._deliver(wanted, reader, writer)
                    return
            elif verb == "QUIT":
                self._say(writer, "221 bye")
                return
            else:
                self._say(writer, "500 unknown")
            await writer.drain()

    async def _auth(self, arg: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> bool:
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech == "PLAIN":
            parts = base64.b64decode(initial).split(b"\0")
            ok = parts[1:] == [USER.encode(), PASSWORD.encode()]
        elif mech == "LOGIN":
            self._say(writer, "334 VXNlcm5hbWU6")
            user = base64.b64decode(await self._line(reader))
            self._say(writer, "334 UGFzc3dvcmQ6")
            ok = (user, base64.b64decode(await self._line(reader))) == (
                USER.encode(), PASSWORD.encode())
        elif mech == "CRAM-MD5":
            challenge = b"<1896.697170952@provider.test>"
            self._say(writer, "334 " + base64.b64encode(challenge).decode())
            answer = base64.b64decode(await self._line(reader)).decode()
            digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
            ok = answer == f"{USER} {digest}"
        else:
            self._say(writer, "504 unrecognised authentication type")
            return False
        self._say(writer, "235 Authentication succeeded" if ok
                  else "535 Incorrect authentication data")
        return ok

    async def _deliver(self, wanted: list[Message], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        await writer.drain()
        if await self._reply(reader) != 220:
            return
        self.greeted.set()
        if self.after_turnaround == "stall":
            await asyncio.Event().wait()  # until the customer gives up and closes
        if self.after_turnaround == "trickle":  # a command line that never ends
            while True:
                writer.write(b"N")
                await writer.drain()
                await asyncio.sleep(0.05)
        self._say(writer, "EHLO provider.test")
        await self._reply(reader)
        for n, message in enumerate(wanted):
            if self.after_turnaround == "drop_after_first" and n == 1:
                writer.transport.abort()
                return
            if self.after_turnaround == "stall_after_first" and n == 1:
                await asyncio.Event().wait()
            code = await self._transaction(message, reader, writer)
            if code == 451 and self.stop_on_451:
                break
        self._say(writer, "QUIT")
        if self.quit_with_fin:
            writer.write_eof()
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                self.after_quit += await reader.read()  # the 221 (or nothing), the close
        else:
            await self._reply(reader)

    async def _transaction(self, message: Message, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> int:
        """One message; returns the worst code seen. The queue keeps what was not taken."""
        utf8 = " SMTPUTF8" if message.utf8 else ""
        self._say(writer, f"MAIL FROM:<{message.sender}> SIZE={len(message.body)}{utf8}")
        await writer.drain()
        code = await self._reply(reader)
        if code != 250:
            return self._settle(message, [], code)
        accepted, worst = [], 250
        for rcpt in message.rcpts:
            self._say(writer, f"RCPT TO:<{rcpt}>")
            await writer.drain()
            code = await self._reply(reader)
            worst = max(worst, code) if code != 250 else worst
            if code == 250:
                accepted.append(rcpt)
            elif code == 451 and self.stop_on_451:
                return self._settle(message, [], 451)
        if not accepted:
            self._say(writer, "RSET")  # as real clients do before the next MAIL
            await self._reply(reader)
            return self._settle(message, [], worst)
        self._say(writer, "DATA")
        await writer.drain()
        if await self._reply(reader) != 354:
            return self._settle(message, [], 451)
        stuffed = b"".join(b"." + ln if ln.startswith(b".") else ln
                           for ln in message.body.splitlines(keepends=True))
        writer.write(stuffed + b".\r\n")
        code = await self._reply(reader)
        return self._settle(message, accepted if code == 250 else [], code)

    def _settle(self, message: Message, accepted: list[str], code: int) -> int:
        left = [r for r in message.rcpts if r not in accepted]
        if accepted:
            self.delivered.append(Message(message.sender, accepted, message.body, message.utf8))
            self.confirmed.set()
        if code >= 500 and not accepted:
            self.bounced.append(message)
            self.queue.remove(message)
        elif not left:
            self.queue.remove(message)
        else:
            message.rcpts = left
        return code


class Office:
    """The office MTA (`deliver_to`): aiosmtpd, answering per recipient from a script."""

    def __init__(self, rcpt_replies: dict[str, list[str]] | None = None,
                 data_reply: str | None = None, utf8: bool = True) -> None:
        self.rcpt_replies = rcpt_replies or {}  # address -> replies to take in turn
        self.data_reply = data_reply
        self.utf8 = utf8  # advertise SMTPUTF8
        self.received: list[Envelope] = []

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        script = self.rcpt_replies.get(address)
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        self.received.append(envelope)
        return "250 2.0.0 queued"


@contextlib.asynccontextmanager
async def serving(provider: Provider, office: Office,
                  lmtp: bool = False) -> AsyncIterator[tuple[int, int]]:
    """Both servers on 127.0.0.1 ephemeral ports: yields (provider port, office port)."""
    from aiosmtpd.lmtp import LMTP

    loop = asyncio.get_running_loop()
    p_server = await asyncio.start_server(provider.handle, "127.0.0.1", 0)
    kind = LMTP if lmtp else SMTPServer
    o_server = await loop.create_server(
        lambda: kind(office, hostname="office.test", enable_SMTPUTF8=office.utf8),
        "127.0.0.1", 0)
    provider.port = p_server.sockets[0].getsockname()[1]
    try:
        yield provider.port, o_server.sockets[0].getsockname()[1]
    finally:
        for task in list(provider._tasks):
            task.cancel()
        p_server.close()
        o_server.close()
        await p_server.wait_closed()
