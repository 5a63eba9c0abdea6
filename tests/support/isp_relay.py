"""An ISP relay for deployment tests (aiosmtpd): STARTTLS required, AUTH PLAIN/LOGIN, ETRN.

    python -m tests.support.isp_relay HOST PORT CERT_PEM USER PASSWORD_FILE

Prints `READY` once listening, then one JSON object a line: {"auth": user, "ok": bool} per
AUTH and {"etrn": arg, "code": int, "tls": bool, "user": str|null} per ETRN. ETRN needs
TLS and a successful AUTH (else 530); `example.net` gets 459 (not a flush domain, as Postfix
answers), anything else 250. CERT_PEM holds the certificate chain and its private key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# aiosmtpd itself still sets the legacy attribute it then warns about (on its logger).
logging.getLogger("mail.log").setLevel(logging.ERROR)
REFUSED = {"example.net": "459 <example.net>: service unavailable"}


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


class Handler:
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-ETRN", responses[-1]]


class Relay(SMTP):
    async def smtp_ETRN(self, arg: str) -> None:
        tls = self._tls_protocol is not None
        if not (tls and self.session.authenticated):
            await self.push("530 5.7.0 Authentication required")
            return
        reply = REFUSED.get(arg, "250 Queuing started")
        emit(etrn=arg, code=int(reply[:3]), tls=tls, user=self.session.auth_data.login.decode())
        await self.push(reply)


def authenticator(user: str, password: str) -> Any:
    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
              data: object) -> AuthResult:
        ok = (isinstance(data, LoginPassword) and data.login.decode() == user
              and data.password.decode() == password)
        emit(auth=data.login.decode() if isinstance(data, LoginPassword) else None, ok=ok)
        # handled=False on failure, or the client waits for a reply that never comes.
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)
    return check


async def main(host: str, port: int, cert: str, user: str, password: str) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Relay(Handler(), hostname="mail.isp.example", tls_context=tls,
                      require_starttls=True, auth_require_tls=True,
                      authenticator=authenticator(user, password)),
        host, port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4],
                     Path(sys.argv[5]).read_text().strip()))
