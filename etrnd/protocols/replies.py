"""Classify ETRN replies and session failures into the outcomes of the product's reply table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """What a reply means for the round; the values are stable (logs, status JSON)."""

    ACCEPTED = "accepted"  # 250-253: the queue run started (or nothing was waiting)
    TRANSIENT = "transient"  # 4xx (not 459), connect/TLS/time-out/protocol errors: retry
    REFUSED_ROUND = "refused_round"  # 459: this node is not allowed; not retried this round
    REFUSED_RELAY = "refused_relay"  # 500/502 (ETRN not supported), AUTH refused: stop relay
    REFUSED_ARG = "refused_arg"  # 501, 504, 55x, other 5xx: drop this argument

    @property
    def permanent(self) -> bool:
        return self in (Outcome.REFUSED_ROUND, Outcome.REFUSED_RELAY, Outcome.REFUSED_ARG)


@dataclass(frozen=True)
class Verdict:
    """One classified result: a server reply (code set) or a failure (error set)."""

    outcome: Outcome
    code: int | None
    text: str
    pending: int | None = None  # 253 only: the number of messages the server said it holds
    error: str | None = None  # failure class, e.g. "SMTPConnectError"; None for a reply


_MAX_TEXT = 300
# An enhanced status code (RFC 3463) is not the pending count: "253 2.0.0 OK, 14 pending ..."
_ENHANCED = re.compile(r"^\s*[245]\.\d{1,3}\.\d{1,3}\s+")
_PENDING = re.compile(r"(\d+)\s+(?:pending|message)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d+)(?![\d.])")


def clean_text(text: str, limit: int = _MAX_TEXT) -> str:
    """Server text made safe for one log line: printable, single-line, bounded."""
    # aiosmtplib decodes with surrogateescape; undo that so odd bytes become U+FFFD.
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    flat = " / ".join(part.strip() for part in raw.splitlines() if part.strip())
    safe = "".join(c if c.isprintable() else "?" for c in flat)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def pending_count(text: str) -> int | None:
    """The message count a 253 reply carries (RFC 1985: `253 OK, <n> pending messages ...`)."""
    body = _ENHANCED.sub("", text, count=1)
    match = _PENDING.search(body) or _NUMBER.search(body)
    return int(match.group(1)) if match else None


def classify_reply(code: int, text: str) -> Verdict:
    """The reply table of PRODUCT.md, for the reply to one ETRN command."""
    text = clean_text(text)
    if 250 <= code <= 253:
        pending = pending_count(text) if code == 253 else None
        return Verdict(Outcome.ACCEPTED, code, text, pending=pending)
    if code == 459:
        return Verdict(Outcome.REFUSED_ROUND, code, text)
    if 400 <= code <= 499:
        return Verdict(Outcome.TRANSIENT, code, text)
    if code in (500, 502):
        return Verdict(Outcome.REFUSED_RELAY, code, text)
    if 500 <= code <= 599:
        return Verdict(Outcome.REFUSED_ARG, code, text)
    # Other 2xx, any 3xx, or a code outside 200-599 is not an ETRN answer: the session is
    # out of step with the server, which is a protocol error (transient, like garbage).
    return Verdict(Outcome.TRANSIENT, code, text, error="ProtocolError")


def classify_atrn(code: int, text: str) -> Verdict:
    """The ODMR rows of the reply table, for the reply to ATRN (RFC 2645 section 4.2.1).

    250 turns the line around and 453 means no mail waiting: both answer the domains. 450
    (refused), 530/535 (authentication) and 502 (not supported) are permanent for the relay;
    451 and other 4xx are transient; another 5xx (501, 503) refuses these domains.
    """
    text = clean_text(text)
    if code in (250, 453):
        return Verdict(Outcome.ACCEPTED, code, text)
    if code in (450, 500, 502, 530, 535):
        return Verdict(Outcome.REFUSED_RELAY, code, text)
    if 400 <= code <= 499:
        return Verdict(Outcome.TRANSIENT, code, text)
    if 500 <= code <= 599:
        return Verdict(Outcome.REFUSED_ARG, code, text)
    return Verdict(Outcome.TRANSIENT, code, text, error="ProtocolError")


def classify_auth(code: int, text: str) -> Verdict:
    """AUTH refused: 5xx (wrong credentials) will not heal by retrying; 4xx may."""
    text = clean_text(text)
    if 500 <= code <= 599:
        return Verdict(Outcome.REFUSED_RELAY, code, text, error="AuthenticationFailed")
    return Verdict(Outcome.TRANSIENT, code, text, error="AuthenticationFailed")


def failure(error: str, text: str, code: int | None = None) -> Verdict:
    """A connect, TLS, time-out or protocol failure: always transient."""
    return Verdict(Outcome.TRANSIENT, code, clean_text(text), error=error)


def setup_error(error: str, text: str) -> Verdict:
    """The server and the config do not fit (e.g. no AUTH mechanism etrnd may use): retrying
    cannot help, only a config change can, so it is permanent for the relay."""
    return Verdict(Outcome.REFUSED_RELAY, None, clean_text(text), error=error)


def invalid_argument(arg: str, reason: str) -> Verdict:
    """An argument that failed the last check before the wire; it was never sent."""
    return Verdict(Outcome.REFUSED_ARG, None, clean_text(f"not sent: {reason}"),
                   error="InvalidArgument")
