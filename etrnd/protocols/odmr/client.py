"""ODMR (RFC 2645): AUTH, ATRN, then receive the provider's queue on the same connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiosmtplib import SMTP, SMTPAuthenticationError

from etrnd.config.model import Relay
from etrnd.config.values import check_atrn_domain
from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.odmr import turnaround
from etrnd.protocols.odmr.office import LocalMta
from etrnd.protocols.replies import (
    Outcome,
    Verdict,
    classify_atrn,
    classify_auth,
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
    helo_name,
    open_secure,
    verdict_of,
)
from etrnd.protocols.transcript import TranscriptSMTP

NO_MAIL = 453  # RFC 2645 4.1: the ATRN reply when nothing is queued for the domains
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# Under TLS: PLAIN first (one round trip). In clear: CRAM-MD5 only, which never sends the
# password (RFC 2645 section 5 requires providers to offer it), unless tls: none and
# allow_plaintext say PLAIN/LOGIN may go in clear too.
_UNDER_TLS = ("plain", "login", "cram-md5")
_IN_CLEAR = ("cram-md5",)
_IN_CLEAR_ALLOWED = ("cram-md5", "plain", "login")


def atrn_batches(domains: Sequence[str], limit: int = MAX_COMMAND_LINE) -> list[list[str]]:
    """Domains packed in order into `ATRN d1,d2,...` lines of at most `limit` octets each."""
    batches: list[list[str]] = []
    size = limit  # forces a new batch for the first domain
    for domain in domains:
        cost = len(domain) + 1  # the comma, or the space after ATRN
        if not batches or size + cost > limit:
            batches.append([])
            size = len("ATRN\r\n")
        batches[-1].append(domain)
        size += cost
    return batches


def _mechanisms(relay: Relay, tls: str) -> tuple[str, ...]:
    if tls != "none":
        return _UNDER_TLS
    plaintext_ok = relay.tls == "none" and relay.auth is not None and relay.auth.allow_plaintext
    return _IN_CLEAR_ALLOWED if plaintext_ok else _IN_CLEAR


async def _authenticate(smtp: SMTP, relay: Relay, tls: str, log: Any) -> None:
    auth = relay.auth
    assert auth is not None  # the config requires it for ODMR
    usable = [m for m in _mechanisms(relay, tls) if m in smtp.server_auth_methods]
    if not usable:
        offered = ", ".join(smtp.server_auth_methods) or "none"
        if tls == "none" and relay.tls != "none":
            # tls: opportunistic and no STARTTLS today: a TLS failure, transient like one.
            raise Refused(failure("AuthWithoutTLS", f"no AUTH mechanism usable without TLS "
                                   f"(server offers {offered}) and the server does not offer "
                                   "STARTTLS; credentials not sent"))
        # As protected as the config asks: no retry changes what the provider offers.
        where = "under TLS" if tls != "none" else "without TLS"
        verdict = setup_error("AuthNotOffered", f"no AUTH mechanism usable {where} (server "
                              f"offers {offered}); credentials not sent")
        log.error("odmr_auth_failed", user=auth.username, text=verdict.text, error=verdict.error)
        raise Refused(verdict)
    # One mechanism only: trying each one (as aiosmtplib's login() does) doubles failed logins.
    method = getattr(smtp, "auth_" + usable[0].replace("-", ""))
    try:
        await method(auth.username, auth.password_file.value)
    except SMTPAuthenticationError as exc:
        verdict = classify_auth(exc.code, exc.message)
        log.error("odmr_auth_failed", user=auth.username, mechanism=usable[0],
                  code=verdict.code, text=verdict.text)
        raise Refused(verdict) from None
    log.info("odmr_auth", user=auth.username, mechanism=usable[0])


def _after_turnaround(got: turnaround.Turnaround, elapsed_ms: float) -> Verdict:
    """What the domains of one ATRN learned from the reversed session."""
    m = got.messages
    counts = f"{m.relayed} relayed, {m.refused} refused, {m.deferred} deferred"
    if not got.quit:
        return failure("TurnaroundTimeout" if got.ended == "timeout" else "TurnaroundDropped",
                       f"provider {'stalled' if got.ended == 'timeout' else 'dropped'} after "
                       f"the turnaround ({counts})")
    if m.deferred or got.deferred_recipients:
        return Verdict(Outcome.TRANSIENT, 451,
                       f"the office MTA deferred mail; the provider keeps it ({counts}, "
                       f"{got.deferred_recipients} recipients deferred)", error="Deferred")
    return Verdict(Outcome.ACCEPTED, 250, f"{counts} in {elapsed_ms:.0f} ms")


async def _atrn(smtp: TranscriptSMTP, relay: Relay, batch: list[str], result: AttemptResult,
                log: Any, attempt: int, live: Messages | None) -> tuple[Verdict, bool]:
    """ATRN for `batch`; on 250 the roles reverse and this returns once the provider is done.

    Returns the verdict for the batch's domains and whether the line was turned around (the
    connection then belongs to the provider, and is closed).
    """
    started = time.monotonic()
    response = await smtp.execute_command(b"ATRN", ",".join(batch).encode("ascii"))
    verdict = classify_atrn(response.code, response.message)
    metrics.reply(relay.label, "ATRN", verdict)
    fields = {"domains": batch, "code": verdict.code, "text": verdict.text, "attempt": attempt}
    if response.code != 250:
        if verdict.outcome is Outcome.ACCEPTED:
            log.info("odmr_reply", **fields)
        elif verdict.outcome is Outcome.TRANSIENT:
            log.warning("odmr_reply", outcome=verdict.outcome, **fields)
        else:
            log.error("odmr_refused", outcome=verdict.outcome, **fields)
        return verdict, False
    log.info("odmr_turnaround", **fields)
    assert isinstance(smtp.transport, asyncio.Transport)
    helo = relay.helo or helo_name()
    local = LocalMta(relay.effective_deliver_to, helo, relay.timeout, log.bind(leg="local"))
    got = await turnaround.receive(smtp.transport, local, hostname=helo,
                                   idle_timeout=relay.timeout, log=log,
                                   transcript=smtp.transcript, live=live, relay=relay.label,
                                   max_message_size=relay.max_message_size)
    result.messages.add(got.messages)
    for domain in batch:
        result.owed.setdefault(domain, set()).update(got.messages.deferred_ids)
    elapsed_ms = (time.monotonic() - started) * 1000
    verdict = _after_turnaround(got, elapsed_ms)
    m = got.messages
    level = log.info if verdict.outcome is Outcome.ACCEPTED and not m.refused else log.warning
    level("odmr_done", domains=batch, relayed=m.relayed, refused=m.refused,
          deferred=m.deferred, deferred_recipients=got.deferred_recipients, ended=got.ended,
          elapsed_ms=round(elapsed_ms, 1), attempt=attempt)
    return verdict, True


async def session(relay: Relay, host: str, batches: Sequence[list[str]],
                  result: AttemptResult, *, attempt: int = 1,
                  on_reply: OnReply = ignore_reply,
                  messages: Messages | None = None,
                  turned_batches: list[str] | None = None) -> Verdict | None:
    """One connection to `host`: EHLO, STARTTLS per policy, AUTH, then ATRN per batch.

    Answers go into `result.replies` per domain as they arrive. After a 250 the provider owns
    the connection (it delivers, then QUITs), so that batch is the session's last; its
    domains are added to `turned_batches`. Returns None when the batches it got to were answered,
    else the Verdict that ended the session. Only CancelledError escapes, after the
    connection is closed.
    """
    log = get_logger().bind(relay=relay.label, host=host)
    smtp = client(relay, host, log)
    quit_timeout = min(relay.timeout, QUIT_TIMEOUT)
    turned = False
    try:
        # Opened as ETRN sessions are: the provider sees the office over the link that is up.
        tls = await open_secure(smtp, relay, host, log)
        log.info("odmr_session", port=relay.effective_port, tls=tls, attempt=attempt)
        await _authenticate(smtp, relay, tls, log)
        if not smtp.supports_extension("atrn"):
            log.warning("odmr_atrn_not_advertised", reason="EHLO does not list ATRN; trying")
        for batch in batches:
            valid = _checked(batch, result, on_reply, log)
            if not valid:
                continue
            turned = True  # from here on the provider may take the connection over
            verdict, turned = await _atrn(smtp, relay, valid, result, log, attempt,
                                          messages)
            for domain in valid:
                result.replies[domain] = verdict
                on_reply(domain, verdict)
            if turned:
                if turned_batches is not None:
                    turned_batches.extend(valid)
                return None  # the provider's QUIT (or a drop) ended the connection
            if verdict.outcome is Outcome.REFUSED_RELAY:
                return verdict
            if not smtp.is_connected:
                return failure("SMTPServerDisconnected",
                               "provider closed the session after ATRN", verdict.code)
        return None
    except asyncio.CancelledError:
        quit_timeout = min(quit_timeout, CANCEL_QUIT_TIMEOUT)
        raise
    except Exception as exc:
        verdict = verdict_of(exc)
        if verdict.outcome is Outcome.TRANSIENT:
            log.warning("odmr_session_failed", error=verdict.error, text=verdict.text,
                        attempt=attempt)
        return verdict
    finally:
        if turned:
            smtp.close()  # the provider's QUIT ended it, or it is gone: nothing more to say
        else:
            await goodbye(smtp, quit_timeout)


def _checked(batch: list[str], result: AttemptResult, on_reply: OnReply, log: Any) -> list[str]:
    """The batch minus domains that fail the last check before the wire (never sent)."""
    valid = []
    for domain in batch:
        try:
            check_atrn_domain(domain)
        except ValueError as exc:
            verdict = invalid_argument(domain, str(exc))
            log.error("odmr_refused", domains=[domain], code=None, text=verdict.text,
                      outcome=verdict.outcome)
            result.replies[domain] = verdict
            on_reply(domain, verdict)
            continue
        valid.append(domain)
    return valid


async def attempt(relay: Relay, args: Sequence[str], *, attempt: int = 1,
                  on_host: OnHost = ignore_host, on_reply: OnReply = ignore_reply,
                  messages: Messages | None = None) -> AttemptResult:
    """ATRN for the domains `args` on the relay: hosts in order, sessions until all answered,
    and after a turnaround that relayed mail, ATRN again (see collect).

    Connect, TLS, AUTH-4xx, time-out and protocol failures move on to the next host with the
    domains still unanswered; a reply (even 4xx) or a turnaround does not.
    """
    return await over_hosts(relay, args, on_host, lambda host, todo, result: collect(
        relay, host, todo, result, attempt=attempt, on_reply=on_reply, messages=messages))


async def collect(relay: Relay, host: str, domains: Sequence[str], result: AttemptResult, *,
                  attempt: int = 1, on_reply: OnReply = ignore_reply,
                  messages: Messages | None = None) -> Verdict | None:
    """Sessions on `host` for `domains` until the provider has nothing new for them.

    A provider delivers what one connection carries and then QUITs: Exim's smtp transport
    stops at `connection_max_messages` (500 by default) and leaves the rest for the next ATRN.
    So a turnaround that relayed mail is followed by another ATRN for its domains, in a new
    session, until the provider answers without turning around (453: no mail) or relays
    nothing new. If asking again fails (connect, time-out...), its domains take that failure:
    more mail may be waiting, and the round retries. Returns as session() does.
    """
    log = get_logger().bind(relay=relay.label, host=host)
    batches, again = atrn_batches(list(domains)), False
    while True:
        counts = _counts(result.messages)
        before = {d: result.replies.get(d) for batch in batches for d in batch}
        turned: list[str] = []
        stop = await session(relay, host, batches, result, attempt=attempt, on_reply=on_reply,
                             messages=messages, turned_batches=turned)
        moved = _counts(result.messages) != counts
        for domain, verdict in before.items() if again else ():
            now = result.replies.get(domain)
            if stop is not None and now is verdict:  # not answered this time: more may wait
                now = stop
            elif (verdict is not None and verdict.outcome is Outcome.ACCEPTED
                  and now is not None and not moved
                  and (now.code == NO_MAIL or domain in turned)):
                # Asked again, nothing came (453, or a turnaround that moved no message, as
                # Exim's when its last messages are still being completed): the earlier
                # turnaround's verdict says what happened.
                now = verdict
            if now is not result.replies.get(domain) and now is not None:
                result.replies[domain] = now
                on_reply(domain, now)
        if stop is not None or not turned or result.messages.relayed == counts[0]:
            return stop
        log.info("odmr_again", domains=turned, relayed=result.messages.relayed - counts[0],
                 attempt=attempt)
        batches, again = atrn_batches(turned), True


def _counts(m: Messages) -> tuple[int, int, int]:
    return m.relayed, m.refused, m.deferred
