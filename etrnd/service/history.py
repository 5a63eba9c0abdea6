"""What each relay and argument did last: successes kept through failures, causes in words."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from etrnd.protocols.replies import Outcome, Verdict

# The same 4xx this many attempts in a row is more likely a refusal dressed as "try later".
REFUSAL_STREAK = 3
# Exim's "458 Already processing X" really is "busy": a queue run for X is under way.
_BUSY = re.compile(r"already processing", re.IGNORECASE)
_ERRNO = re.compile(r"\[Errno (-?\d+)\]\s*([^(]*)")
# aiosmtplib wraps an implicit-TLS handshake failure in SMTPConnectError: "... [SSL:
# CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:1006)"
_SSL = re.compile(r"\[SSL: ([A-Z_]+)\]\s*(.*?)\s*(?:\(_ssl\.c:\d+\))?$")
_MAX_TEXT = 300


@dataclass(frozen=True)
class Mark:
    """One remembered result; `when` is wall-clock seconds since the epoch.

    kind is "reply" (the server answered: `code` is set) or the class of a failure: dns,
    connect, refused (connection refused), timeout, tls, auth, auth_without_tls, setup,
    disconnected, protocol, other. `text` is what an operator reads.
    """

    when: float
    kind: str
    text: str
    code: int | None = None
    host: str | None = None
    arg: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"when": self.when, "kind": self.kind, "text": self.text, "code": self.code,
                "host": self.host, "arg": self.arg}

    @classmethod
    def from_dict(cls, data: Any) -> Mark | None:
        """A mark read back from the state file; None when it is not one."""
        if not isinstance(data, dict):
            return None
        when, kind, text = data.get("when"), data.get("kind"), data.get("text")
        code, host, arg = data.get("code"), data.get("host"), data.get("arg")
        if not (isinstance(when, int | float) and isinstance(kind, str)
                and isinstance(text, str)):
            return None
        return cls(float(when), kind[:32], text[:_MAX_TEXT],
                   code if isinstance(code, int) else None,
                   host[:255] if isinstance(host, str) else None,
                   arg[:255] if isinstance(arg, str) else None)


def cause(verdict: Verdict, host: str | None, port: int) -> tuple[str, str]:
    """(kind, text): a verdict in an operator's words, naming the real cause and where.

    Replies keep their code and text (`459 <example.org>: service unavailable`); failures
    say what failed: `connection refused (203.0.113.1:25)`, `time-out: no answer from
    203.0.113.1:25 (Timed out connecting ...)`, `TLS certificate not accepted: ...`.
    """
    where = f"{host}:{port}" if host else f"port {port}"
    error, text = verdict.error, verdict.text
    if error is None:
        return "reply", f"{verdict.code} {text}".strip()
    if error == "AuthenticationFailed":
        code = f"{verdict.code} " if verdict.code is not None and not text.startswith(
            str(verdict.code)) else ""
        return "auth", f"AUTH refused: {code}{text} (check username and password)"
    if error == "AuthWithoutTLS":
        return "auth_without_tls", f"AUTH without TLS: {text}"
    if error in ("AuthNotOffered", "StartTLSNotOffered"):
        return "setup", text
    if error == "InvalidArgument":
        return "setup", text
    wrapped = _SSL.search(text)
    if error == "SSLCertVerificationError" or (wrapped and "VERIFY" in wrapped.group(1)):
        reason = wrapped.group(2).removeprefix("certificate verify failed: ") if wrapped else text
        return "tls", f"TLS certificate not accepted: {reason} ({where})"
    if error.startswith("SSL") or wrapped:
        return "tls", f"TLS failed: {wrapped.group(2) if wrapped else text} ({where})"
    if error == "SMTPConnectTimeoutError":
        if "ready message" in text:  # connected; the greeting never came
            return "timeout", f"time-out: {where} took the connection but sent no greeting"
        return "timeout", f"time-out: no answer from {where}"
    if error in ("SMTPTimeoutError", "TimeoutError"):
        return "timeout", f"time-out: no reply from {where} ({text})"
    if error == "SMTPConnectError":
        match = _ERRNO.search(text)
        if match is not None:
            number, reason = int(match.group(1)), match.group(2).strip()
            if number < 0:  # getaddrinfo's EAI_* codes are negative
                return "dns", f"DNS: cannot resolve {host} ({reason})"
            if number == 111:
                return "refused", f"connection refused ({where})"
            if number == 110:
                return "timeout", f"time-out: no answer from {where}"
            # asyncio words it "Connect call failed (...)": the errno says what happened.
            return "connect", f"cannot connect to {where}: {os.strerror(number)}"
        return "connect", f"cannot connect to {where}: {text}"
    if error == "SMTPServerDisconnected":
        return "disconnected", f"the server closed the connection ({where}): {text}"
    if error == "ProtocolError":
        return "protocol", f"protocol error ({where}): {text}"
    return "other", f"{error}: {text} ({where})"


@dataclass
class History:
    """One relay's or argument's memory across rounds (and, via the state file, restarts)."""

    last_success: Mark | None = None
    last_failure: Mark | None = None
    failing_since: float | None = None  # the first failure after the last success
    failures: int = 0  # failed tries since the last success

    def note(self, successes: list[Mark], failures: list[Mark]) -> None:
        """One try's results: any failure keeps (or starts) the failing streak."""
        if successes:
            self.last_success = successes[-1]
        if failures:
            self.last_failure = failures[0]
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = failures[0].when
        elif successes:
            self.failing_since, self.failures = None, 0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def as_dict(self) -> dict[str, Any]:
        return {"last_success": self.last_success.as_dict() if self.last_success else None,
                "last_failure": self.last_failure.as_dict() if self.last_failure else None,
                "failing_since": self.failing_since, "failures": self.failures}

    def load(self, data: Mapping[str, Any]) -> None:
        self.last_success = Mark.from_dict(data.get("last_success"))
        self.last_failure = Mark.from_dict(data.get("last_failure"))
        since, count = data.get("failing_since"), data.get("failures")
        self.failing_since = float(since) if isinstance(since, int | float) else None
        self.failures = count if isinstance(count, int) and count >= 0 else 0


@dataclass
class RelayHistory(History):
    """A relay's history, its arguments' histories and the "probably a refusal" streak."""

    args: dict[str, History] = field(default_factory=dict)
    accepted_round: float | None = None  # the end of the last round that got every argument
    streak_reply: str | None = None  # the last attempt's identical 4xx, "458 text"
    streak: int = 0
    hint: str | None = None  # set while the streak says "probably a refusal"

    def arg(self, name: str) -> History:
        return self.args.setdefault(name, History())

    def note_streak(self, replies: list[Verdict]) -> bool:
        """Track one attempt's transient replies; True when the streak just reached
        REFUSAL_STREAK (log it once). Exim refuses ETRN by ACL only with 458, retried for
        give_up_after with no word that it is a refusal (FIELD-NOTES)."""
        texts = {f"{v.code} {v.text}" for v in replies
                 if v.error is None and v.outcome is Outcome.TRANSIENT and v.code is not None
                 and not (v.code == 458 and _BUSY.search(v.text))}
        same = len(texts) == 1 and len(texts) == len({f"{v.code} {v.text}" for v in replies})
        if not same:
            self.streak_reply, self.streak, self.hint = None, 0, None
            return False
        (reply,) = texts
        self.streak = self.streak + 1 if reply == self.streak_reply else 1
        self.streak_reply = reply
        if self.streak < REFUSAL_STREAK:
            return False
        self.hint = (f"'{reply}' {self.streak} times in a row: probably a refusal, not a busy "
                     "server; check with the ISP that ETRN is allowed from this client (its "
                     "address, AUTH) and for these domains")
        return self.streak == REFUSAL_STREAK

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "accepted_round": self.accepted_round,
                "args": {name: h.as_dict() for name, h in self.args.items()}}

    def load(self, data: Mapping[str, Any]) -> None:
        super().load(data)
        accepted = data.get("accepted_round")
        self.accepted_round = float(accepted) if isinstance(accepted, int | float) else None
        args = data.get("args")
        if isinstance(args, dict):
            for name, value in args.items():
                if isinstance(name, str) and isinstance(value, dict):
                    self.arg(name).load(value)
