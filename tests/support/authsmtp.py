"""An aiosmtpd ETRN server on 127.0.0.1 with STARTTLS and AUTH PLAIN, LOGIN and CRAM-MD5."""

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

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
CHALLENGE = b"<1896.697170952@isp.test>"  # RFC 2195's example shape


@dataclass
class AuthServer:
    """Accepts `user`/`password` with only `mechanism` offered; answers ETRN with 250."""

    user: str
    password: str
    mechanism: str
    tls: ssl.SSLContext
    etrn: list[str] = field(default_factory=list)  # arguments received
    auth_lines: list[bytes] = field(default_factory=list)  # what the client sent in AUTH
    logins: list[bool] = field(default_factory=list)
    port: int = 0

    def check(self, login: bytes, password: bytes) -> bool:
        ok = (login, password) == (self.user.encode(), self.password.encode())
        self.logins.append(ok)
        return ok


class _Handler:
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-ETRN", responses[-1]]


class _Protocol(SMTP):  # type: ignore[misc]
    def __init__(self, spec: AuthServer) -> None:
        self.spec = spec
        excluded = [m for m in MECHANISMS if m != spec.mechanism]
        super().__init__(_Handler(), hostname="isp.test", ident="ESMTP",
                         tls_context=spec.tls, require_starttls=True,
                         auth_exclude_mechanism=excluded,
                         auth_callback=self._login)

    def _login(self, mechanism: str, login: bytes, password: bytes) -> bool:
        return self.spec.check(login, password)

    async def smtp_ETRN(self, arg: str) -> None:
        self.spec.etrn.append(arg)
        await self.push(f"250 Queuing for node {arg} started")

    async def challenge_auth(self, challenge: str | bytes, *args: Any, **kw: Any) -> Any:
        # Record the raw line the client answers with, before aiosmtpd decodes it.
        answer = await super().challenge_auth(challenge, *args, **kw)
        if isinstance(answer, bytes):
            self.spec.auth_lines.append(base64.b64encode(answer))
        return answer

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult:
        answer = await self.challenge_auth(CHALLENGE)
        if not isinstance(answer, bytes):
            return AuthResult(success=False)
        login, _sep, digest = answer.partition(b" ")
        want = hmac.new(self.spec.password.encode(), CHALLENGE, hashlib.md5).hexdigest()
        ok = login == self.spec.user.encode() and hmac.compare_digest(digest, want.encode())
        self.spec.logins.append(ok)
        return AuthResult(success=ok, auth_data=LoginPassword(login, b""))


@contextlib.asynccontextmanager
async def serve(spec: AuthServer) -> AsyncIterator[AuthServer]:
    """Listen on 127.0.0.1 (a free port, set in spec.port) until the block ends."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(spec), "127.0.0.1", 0)
    spec.port = server.sockets[0].getsockname()[1]
    try:
        yield spec
    finally:
        server.close()
        await server.wait_closed()
