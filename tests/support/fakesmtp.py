"""A scripted SMTP server on 127.0.0.1 for fault tests: replies, hangs, drops, STARTTLS, AUTH."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# Script items besides plain reply lines ("458 busy"):
HANG = "<hang>"  # say nothing until the client goes away
DROP = "<drop>"  # close the connection without a reply
PARTIAL = "<partial>"  # send half a multi-line reply, then close
OK = "250 Queuing started"


@dataclass
class Command:
    session: int
    line: str
    tls: bool


@dataclass
class FakeSmtp:
    """Each session takes the next greeting; each ETRN takes the next scripted reply."""

    greetings: list[str] = field(default_factory=list)  # default "220 fake.test ESMTP"
    etrn_replies: list[str] = field(default_factory=list)  # default OK once exhausted
    extensions: list[str] = field(default_factory=lambda: ["ETRN"])
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this server context
    auth: tuple[str, str] | None = None  # (user, password) for AUTH PLAIN
    commands: list[Command] = field(default_factory=list)
    sessions: int = 0
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def lines(self, verb: str) -> list[Command]:
        return [c for c in self.commands if c.line.upper().split(" ")[0] == verb.upper()]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        session = self.sessions
        try:
            await self._converse(session, reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _say(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                   reply: str, session: int, tls: bool = False) -> bool:
        """Send one scripted reply; False when the session is over."""
        if reply == HANG:
            # Answer nothing more, but note what the client still says (QUIT after a cancel).
            while line := await reader.readline():
                self.commands.append(Command(session, line.decode("utf-8", "replace").rstrip(),
                                             tls))
            return False
        if reply == DROP:
            return False
        if reply == PARTIAL:
            writer.write(b"250-Queuing\r\n")
            await writer.drain()
            return False
        writer.write(reply.encode("utf-8", "surrogateescape") + b"\r\n")
        await writer.drain()
        return not reply.startswith("421")

    async def _converse(self, session: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        greeting = self.greetings.pop(0) if self.greetings else "220 fake.test ESMTP"
        if not await self._say(writer, reader, greeting, session):
            return
        tls = False
        while line_bytes := await reader.readline():
            line = line_bytes.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(Command(session, line, tls))
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                exts = list(self.extensions)
                if self.tls is not None and not tls:
                    exts.append("STARTTLS")
                if self.auth is not None:
                    exts.append("AUTH PLAIN LOGIN")
                out = ["fake.test", *exts]
                text = "".join(f"250-{x}\r\n" for x in out[:-1]) + f"250 {out[-1]}\r\n"
                writer.write(text.encode())
            elif verb == "STARTTLS" and self.tls is not None and not tls:
                writer.write(b"220 go ahead\r\n")
                await writer.drain()
                await writer.start_tls(self.tls)
                tls = True
                continue
            elif verb == "AUTH" and self.auth is not None and arg.upper().startswith("PLAIN "):
                writer.write(b"235 2.7.0 ok\r\n" if self._plain_ok(arg[6:])
                             else b"535 5.7.8 authentication failed\r\n")
            elif verb == "ETRN":
                reply = self.etrn_replies.pop(0) if self.etrn_replies else OK
                if not await self._say(writer, reader, reply, session, tls):
                    return
                continue
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif verb in ("HELO", "NOOP", "RSET"):
                writer.write(b"250 ok\r\n")
            else:
                writer.write(b"502 5.5.2 not implemented\r\n")
            await writer.drain()

    def _plain_ok(self, payload: str) -> bool:
        assert self.auth is not None
        try:
            _, user, password = base64.b64decode(payload).decode().split("\0")
        except ValueError:
            return False
        return (user, password) == self.auth


@contextlib.asynccontextmanager
async def serve(fake: FakeSmtp,
                implicit_tls: ssl.SSLContext | None = None) -> AsyncIterator[FakeSmtp]:
    """Listen on 127.0.0.1 (a free port, set in fake.port) until the block ends."""
    server = await asyncio.start_server(fake._handle, "127.0.0.1", 0, ssl=implicit_tls)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        for task in list(fake._tasks):
            task.cancel()
        await asyncio.gather(*fake._tasks, return_exceptions=True)
        await server.wait_closed()
