"""The SMTP side: ETRN sessions on aiosmtplib, with TLS/AUTH policy, host failover, clean cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiosmtplib import SMTP, SMTPAuthenticationError

from etrnd.config.model import Relay
from etrnd.config.values import check_etrn_argument
from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.replies import (
    Outcome,
    Verdict,
    classify_auth,
    classify_reply,
    failure,
    invalid_argument,
    setup_error,
)
from etrnd.protocols.seam import (
    AttemptResult,
    Messages,
    OnHost,
    OnReply,
    ignore_host,
    ignore_reply,
    over_hosts,
)
from etrnd.protocols.smtp import (
    CANCEL_QUIT_TIMEOUT,
    QUIT_TIMEOUT,
    Refused,
    client,
    goodbye,
    open_secure,
    verdict_of,
)

# Sendmail tarpits a session from its 8th ETRN; 5 keeps well clear and still batches.
MAX_ETRN_PER_SESSION = 5
# AUTH PLAIN first: one round trip, and we only ever AUTH under TLS (or by explicit consent).
# CRAM-MD5 last: some providers offer nothing else (RFC 2645 requires it of ODMR servers).
_AUTH_PREFERENCE = ("plain", "login", "cram-md5")

async def _authenticate(smtp: SMTP, relay: Relay, tls: str, log: Any) -> None:
    auth = relay.auth
    assert auth is not None
    if tls == "none" and not (relay.tls == "none" and auth.allow_plaintext):
        raise Refused(failure("AuthWithoutTLS",
                               "AUTH is configured but the session is not encrypted; "
                               "credentials not sent"))
    offered = [m for m in _AUTH_PREFERENCE if m in smtp.server_auth_methods]
    if not offered:
        # The session is as protected as the config asks, so no retry will change what the
        # server offers: a setup problem (permanent for the relay), like a refused password.
        verdict = setup_error("AuthNotOffered",
                              f"auth: is configured but the server offers no usable AUTH "
                              f"mechanism ({', '.join(smtp.server_auth_methods) or 'none'}); "
                              "credentials not sent")
        log.error("etrn_auth_failed", user=auth.username, text=verdict.text, error=verdict.error)
        raise Refused(verdict)
    # One mechanism only: trying each one (as aiosmtplib's login() does) doubles failed logins.
    method = getattr(smtp, "auth_" + offered[0].replace("-", ""))
    try:
        await method(auth.username, auth.password_file.value)
    except SMTPAuthenticationError as exc:
        verdict = classify_auth(exc.code, exc.message)
        log.error("etrn_auth_failed", user=auth.username, mechanism=offered[0],
                  code=verdict.code, text=verdict.text)
        raise Refused(verdict) from None
    log.info("etrn_auth", user=auth.username, mechanism=offered[0])


async def session(relay: Relay, host: str, args: Sequence[str], replies: dict[str, Verdict],
                  *, attempt: int = 1, on_reply: OnReply = ignore_reply) -> Verdict | None:
    """One SMTP session to `host` sending ETRN for `args` (at most MAX_ETRN_PER_SESSION).

    Each answer is stored in `replies` as it arrives. Returns None when every argument was
    answered, else the Verdict that ended the session. Only CancelledError escapes; after a
    cancel the session is closed (QUIT with a short timeout) before it propagates.
    """
    log = get_logger().bind(relay=relay.label, host=host)
    smtp = client(relay, host, log)
    quit_timeout = min(relay.timeout, QUIT_TIMEOUT)
    try:
        tls = await open_secure(smtp, relay, host, log)
        log.info("etrn_session", port=relay.effective_port, tls=tls, attempt=attempt)
        if relay.auth is not None:
            await _authenticate(smtp, relay, tls, log)
        if not smtp.supports_extension("etrn"):
            log.warning("etrn_not_advertised", reason="EHLO does not list ETRN; sending anyway")
        for arg in args[:MAX_ETRN_PER_SESSION]:
            verdict = await _etrn(smtp, arg, attempt, log)
            replies[arg] = verdict
            on_reply(arg, verdict)
            metrics.reply(relay.label, "ETRN", verdict)
            # 459 refuses one node (Postfix: a domain it does not flush); the others may be
            # fine, so only "ETRN not supported" ends the session.
            if verdict.outcome is Outcome.REFUSED_RELAY:
                return verdict
            if not smtp.is_connected:
                # e.g. 421: aiosmtplib closes the connection on it, as it should.
                return failure("SMTPServerDisconnected",
                               f"server closed the session after ETRN {arg}", verdict.code)
        return None
    except asyncio.CancelledError:
        quit_timeout = min(quit_timeout, CANCEL_QUIT_TIMEOUT)
        raise
    except Exception as exc:
        # Whatever the server sent (or failed to send) ends up here as a classified failure.
        verdict = verdict_of(exc)
        if verdict.outcome is Outcome.TRANSIENT:
            log.warning("etrn_session_failed", error=verdict.error, text=verdict.text,
                        attempt=attempt)
        return verdict
    finally:
        await goodbye(smtp, quit_timeout)


async def _etrn(smtp: SMTP, arg: str, attempt: int, log: Any) -> Verdict:
    try:
        check_etrn_argument(arg)  # again, right before the wire: CR/LF must never be sent
    except ValueError as exc:
        verdict = invalid_argument(arg, str(exc))
        log.error("etrn_refused", arg=arg, code=None, text=verdict.text, outcome=verdict.outcome,
                  attempt=attempt)
        return verdict
    started = time.monotonic()
    response = await smtp.execute_command(b"ETRN", arg.encode("ascii"))
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    verdict = classify_reply(response.code, response.message)
    fields: dict[str, Any] = {"arg": arg, "code": verdict.code, "text": verdict.text,
                              "attempt": attempt, "elapsed_ms": elapsed_ms}
    if verdict.pending is not None:
        fields["pending"] = verdict.pending
    if verdict.outcome is Outcome.ACCEPTED:
        log.info("etrn_reply", **fields)
    elif verdict.outcome is Outcome.TRANSIENT:
        log.warning("etrn_reply", outcome=verdict.outcome, **fields)
    else:
        log.error("etrn_refused", outcome=verdict.outcome, **fields)
    return verdict


async def attempt(relay: Relay, args: Sequence[str], *, attempt: int = 1,
                  on_host: OnHost = ignore_host, on_reply: OnReply = ignore_reply,
                  messages: Messages | None = None) -> AttemptResult:
    """Send ETRN for `args` to the relay: hosts in order, a new session every few arguments.

    `messages` stays untouched: the mail an ETRN starts arrives on connections of its own.

    Connect, TLS, time-out and protocol failures move on to the next host with the arguments
    still unanswered; a reply (even 4xx) does not, since that host did answer.
    """
    return await over_hosts(relay, args, on_host, lambda host, todo, result: session(
        relay, host, todo, result.replies, attempt=attempt, on_reply=on_reply))


__all__ = ["MAX_ETRN_PER_SESSION", "attempt", "session"]
