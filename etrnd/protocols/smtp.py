"""What ETRN and ODMR sessions share: the client, TLS, the EHLO name, failures as Verdicts."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from typing import Any

from aiosmtplib import (
    SMTP,
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPHeloError,
    SMTPResponseException,
)

from etrnd.config.model import Relay
from etrnd.config.values import default_helo
from etrnd.link import egress
from etrnd.loop import offloop
from etrnd.outputs.logs import get_logger
from etrnd.protocols import connect
from etrnd.protocols.replies import Verdict, failure
from etrnd.protocols.transcript import TranscriptSMTP

# QUIT is a courtesy: never let a silent server hold up a round (or a cancel) for long.
QUIT_TIMEOUT = 2.0
CANCEL_QUIT_TIMEOUT = 0.5  # after a cancel (link down, Ctrl-C) the caller is waiting on us


class Refused(Exception):
    """A session step failed in a way that is already a Verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.text)
        self.verdict = verdict


# The FQDN lookup asks the name server (getfqdn: gethostbyaddr), which a dead or black-holed
# resolver stretches to 10 s; it runs once at start, off the loop, within this bound.
HELO_LOOKUP_TIMEOUT = 2.0
# Loading the system trust store reads files (a slow disk, NFS): off the loop, bounded.
TRUST_STORE_TIMEOUT = 10.0
_helo: list[str] = []
_contexts: dict[tuple[bool, str | None, str | None], ssl.SSLContext] = {}


def helo_name() -> str:
    """The FQDN once resolve_helo() found it; until then, or when the lookup failed or hung,
    the kernel's host name (no I/O): a session never waits on a name server."""
    return _helo[0] if _helo else default_helo(socket.gethostname())


async def resolve_helo(limit: float = HELO_LOOKUP_TIMEOUT) -> str:
    """Look the machine's FQDN up off the loop, at most `limit` seconds; returns the name
    sessions will use from now on (the host name if the lookup failed or timed out)."""
    started = time.monotonic()
    try:
        name = await offloop.bounded(limit, default_helo)
        source = "fqdn"
    except (TimeoutError, OSError):
        name, source = default_helo(socket.gethostname()), "hostname"
    _helo[:] = [name]
    get_logger().info("helo_name", name=name, source=source,
                      elapsed_ms=round((time.monotonic() - started) * 1000, 1))
    problem = helo_problem(name)
    if problem is not None:
        get_logger().warning("helo_name_fallback", name=name, source=source, reason=problem)
    return name


def helo_problem(name: str) -> str | None:
    """Why an EHLO name found without `helo:` may get sessions refused, or None if it looks
    like an FQDN (RFC 5321 4.1.1.1: the client's FQDN or an address literal)."""
    if name.startswith("["):
        return None
    if name.lower().rstrip(".") == "localhost" or "." not in name:
        return (f"the machine's name {name!r} is not a fully qualified domain name; ISPs may "
                "refuse ETRN/ATRN from it: set helo: for each relay (e.g. gw.example.org)")
    return None


def _trust_key(verify: bool) -> tuple[bool, str | None, str | None]:
    return verify, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def tls_context(verify: bool) -> ssl.SSLContext:
    """A client context; honours SSL_CERT_FILE / SSL_CERT_DIR like the rest of OpenSSL.

    Blocking (reads the trust store the first time): on the loop use tls_context_off_loop.
    """
    key = _trust_key(verify)
    context = _contexts.get(key)
    if context is None:
        # Cached per trust setting: loading the system store costs more than a session.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        _contexts[key] = context
    return context


async def tls_context_off_loop(verify: bool) -> ssl.SSLContext:
    """tls_context() without blocking the loop; TimeoutError after TRUST_STORE_TIMEOUT s."""
    context = _contexts.get(_trust_key(verify))
    if context is not None:
        return context
    return await offloop.bounded(TRUST_STORE_TIMEOUT, tls_context, verify)


def _describe(exc: BaseException) -> Verdict:
    """Any exception out of a session step, as a transient failure with a short text."""
    name = type(exc).__name__
    if isinstance(exc, SMTPResponseException):
        code = exc.code if 100 <= exc.code <= 599 else None
        return failure(name, f"{exc.code} {exc.message}" if code else exc.message, code)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return failure(name, exc.verify_message or str(exc))
    return failure(name, str(exc) or name)


async def _hello(smtp: SMTP) -> None:
    try:
        await smtp.ehlo()
    except SMTPHeloError as exc:
        # A server that does not speak ESMTP still takes HELO and, often, ETRN.
        if not (500 <= exc.code <= 599 and smtp.is_connected):
            raise
        await smtp.helo()


async def _secure(smtp: SMTP, relay: Relay, host: str, log: Any) -> str:
    """EHLO, then STARTTLS per policy and EHLO again; returns how the session is protected."""
    await _hello(smtp)
    if relay.tls in ("implicit", "none"):
        return relay.tls
    if smtp.supports_extension("starttls"):
        await smtp.starttls(server_hostname=host)
        # aiosmtplib forgets the extensions on upgrade and does not ask again by itself.
        await _hello(smtp)
        return "starttls"
    if relay.tls == "starttls":
        raise Refused(failure("StartTLSNotOffered",
                               "tls: starttls but the server does not offer STARTTLS; "
                               "nothing was sent"))
    log.info("etrn_no_tls", reason="server does not offer STARTTLS")
    return "none"


def client(relay: Relay, host: str, log: Any) -> TranscriptSMTP:
    """The aiosmtplib client for one session to `host` (ETRN or ODMR); at log level debug it
    logs each SMTP line. Not connected yet: see open_secure."""
    return TranscriptSMTP(
        hostname=host, port=relay.effective_port, local_hostname=relay.helo or helo_name(),
        timeout=relay.timeout, use_tls=relay.tls == "implicit", start_tls=False,
        transcript_log=log,
    )


async def open_secure(smtp: TranscriptSMTP, relay: Relay, host: str, log: Any) -> str:
    """Connect and secure per `relay.tls`; returns the TLS state ("none" or the version).

    The trust store is loaded off the loop; the route to the relay is checked against the
    link that is up and `source:` applied (etrnd.link.egress). `host` is resolved with the
    loop's getaddrinfo (in the executor) under `timeout`: a hung name server costs this
    session its timeout, not the loop. Raises what aiosmtplib raises, or Refused.
    """
    if relay.tls != "none":
        smtp.tls_context = await tls_context_off_loop(relay.verify)
    await _connect(smtp, relay, host)
    tls = await _secure(smtp, relay, host, log)
    if tls != "none" and not relay.verify:
        log.warning("tls_not_verified", reason="verify: false in the config")
    return tls


async def _connect(smtp: TranscriptSMTP, relay: Relay, host: str) -> None:
    """Connect while the kernel is asked for the route (egress.source_for), not after it.

    The route look-up (a netlink round trip, ~10 µs) only changes the source address when
    `source: auto` finds the route leaving through another line and a policy rule makes the
    watched line's address usable; an explicit `source:` is known in advance and `kernel`
    never binds. So the SYN leaves at once; in the rare case where the check wants another
    source, the connection (nothing sent on it yet) is closed and opened again from there.
    """
    bound = None if relay.source in ("auto", "kernel") else (relay.source, 0)
    check = asyncio.ensure_future(_source_after_syn(relay, host))
    try:
        await _connect_from(smtp, relay, host, bound)
    except BaseException:
        check.cancel()
        raise
    wanted = await check
    if wanted != bound:  # etrn_egress_mismatch (source_for) has said why
        smtp.close()
        await _connect_from(smtp, relay, host, wanted)


async def _connect_from(smtp: TranscriptSMTP, relay: Relay, host: str,
                        source: tuple[str, int] | None) -> None:
    """TCP (etrnd.protocols.connect: a second SYN when the first goes unanswered), then
    aiosmtplib on that socket: implicit TLS (verified against `host`) and the greeting.

    Failures are worded as aiosmtplib words them when it connects by itself: SMTPConnectError
    "Error connecting to HOST on port PORT: ...", SMTPConnectTimeoutError "Timed out
    connecting to HOST on port PORT". `relay.timeout` bounds the look-up, TCP and the TLS
    handshake together, as it did; the greeting after a plain connect has its own.
    """
    port = relay.effective_port
    started = time.monotonic()
    try:
        sock = await connect.open_socket(host, port, None if source is None else source[0],
                                         relay.timeout)
    except TimeoutError as exc:
        raise SMTPConnectTimeoutError(f"Timed out connecting to {host} on port {port}") from exc
    except OSError as exc:
        raise SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
    left = max(relay.timeout - (time.monotonic() - started), 0.001)
    try:
        # With a socket aiosmtplib wants no port (so its messages say "port None").
        await smtp.connect(sock=sock, port=None, timeout=left if smtp.use_tls else relay.timeout)
    except (SMTPConnectError, SMTPConnectTimeoutError) as exc:
        sock.close()
        if type(exc) in (SMTPConnectError, SMTPConnectTimeoutError):
            raise type(exc)(exc.message.replace(" on port None", f" on port {port}")) from exc
        raise
    except BaseException:
        sock.close()
        raise


async def _source_after_syn(relay: Relay, host: str) -> tuple[str, int] | None:
    # One loop pass later: the first connect attempt runs in a task of its own, queued right
    # after this one, so the SYN leaves before the look-up's own work.
    await asyncio.sleep(0)
    return await egress.source_for(relay, host, relay.timeout)


def verdict_of(exc: Exception) -> Verdict:
    """What an exception out of a session means: a refusal carries its verdict (logged where
    it happened); anything else is a transient failure (connect, TLS, time-out, protocol)."""
    return exc.verdict if isinstance(exc, Refused) else _describe(exc)


async def goodbye(smtp: SMTP, step_timeout: float) -> None:
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=step_timeout)
    except Exception:  # noqa: S110 - the server's manners at QUIT change nothing
        pass
    finally:
        smtp.close()


__all__ = ["CANCEL_QUIT_TIMEOUT", "QUIT_TIMEOUT", "Refused", "client", "goodbye", "helo_name",
           "helo_problem", "open_secure", "resolve_helo", "tls_context", "tls_context_off_loop",
           "verdict_of"]
