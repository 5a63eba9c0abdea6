"""The protocols' seam: one attempt on a relay, the same signature and result for ETRN and ODMR."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from etrnd.protocols.replies import Outcome, Verdict

if TYPE_CHECKING:
    from etrnd.config.model import Relay

OnHost = Callable[[str], None]
OnReply = Callable[[str, Verdict], None]


# What the daemon cancels a round with when its link went down. A session that is sending
# nothing of ours may end at once, but one the provider is using to hand us its queue (ODMR)
# goes on: TCP resumes if the link returns within the relay's timeout, and a closed socket
# would answer the provider's retransmission with a reset mid-DATA. Any other cancel (stop,
# reload) ends every session now, gracefully.
LINK_DOWN = "link_down"
# What it cancels a backup's round with when a line it stands in for is back (only_when_down,
# docs/two-lines.md): the backup's own line is up, so a transfer in progress finishes the
# same way, and no new session or retry starts.
STANDBY = "standby"


def keeps_session(cancel: asyncio.CancelledError) -> bool:
    """Whether `cancel` came from a link-down or standby (LINK_DOWN, STANDBY), not a stop."""
    return bool(cancel.args) and cancel.args[0] in (LINK_DOWN, STANDBY)


def ignore_host(_: str) -> None:
    return None


def ignore_reply(_: str, __: Verdict) -> None:
    return None


@dataclass
class Messages:
    """Messages that came over the relay's own connection (ODMR; ETRN never sees any).

    relayed: accepted by the local MTA and then confirmed to the provider; refused: the local
    MTA answered 5xx (the provider bounces them); deferred: 4xx or not confirmed (the provider
    keeps them and offers them again).
    """

    relayed: int = 0
    refused: int = 0
    deferred: int = 0
    # Keys (see message_key) of what the office MTA deferred and of what it took, filled as
    # each message settles, so a round can tell a deferral that a later session relayed from
    # one still left at the provider: left_behind().
    deferred_ids: set[str] = field(default_factory=set)
    relayed_ids: set[str] = field(default_factory=set)

    def add(self, other: Messages) -> None:
        self.relayed += other.relayed
        self.refused += other.refused
        self.deferred += other.deferred
        self.deferred_ids |= other.deferred_ids
        self.relayed_ids |= other.relayed_ids

    def left_behind(self) -> set[str]:
        """Keys deferred and not relayed since: mail known to be still at the provider."""
        return self.deferred_ids - self.relayed_ids

    def as_dict(self) -> dict[str, int]:
        return {"relayed": self.relayed, "refused": self.refused, "deferred": self.deferred}


def message_key(message_id: str | None, sender: str, recipients: Iterable[str],
                size: int) -> str:
    """One message's key: its Message-ID header value (RFC 5322 3.6.4) when it has one, else
    "sender|sorted,recipients|size" (size in octets, as received).

    A deferral before DATA (a 4xx to RCPT) has no header and no size: the turnaround then
    keys it by recipient_key for each deferred recipient, and adds the same per-recipient keys
    for every recipient it relays, so a later session that delivers that recipient settles it.
    """
    if message_id:
        return message_id
    return f"{sender}|{','.join(sorted(recipients))}|{size}"


def recipient_key(sender: str, recipient: str) -> str:
    """The key of one recipient's delivery when the message itself was never seen."""
    return f"{sender}|{recipient}"


@dataclass
class AttemptResult:
    """What one attempt (sessions over the relay's hosts) learned."""

    replies: dict[str, Verdict] = field(default_factory=dict)  # per argument, this attempt
    # Why the attempt ended early: the last transient failure after every host was tried, or
    # the reply or AUTH refusal that ends the relay's round. None: all answered.
    stop: Verdict | None = None
    host: str | None = None  # the host that was tried last
    messages: Messages = field(default_factory=Messages)
    # ODMR: per argument, the keys (message_key) of what the office MTA deferred in the
    # turnarounds that served it, so the round can keep it open until they come back.
    owed: dict[str, set[str]] = field(default_factory=dict)


class SendAttempt(Protocol):
    """One attempt on `relay` for `args`: every host in turn until the arguments are answered.

    Calls `on_host` before each host and `on_reply` as each argument is answered, and counts
    each message that comes over the connection (ODMR) into `messages` as soon as it is
    settled, so the count survives a cancel and `etrnd status` sees it live. Only
    CancelledError escapes (sessions are closed first).
    """

    def __call__(self, relay: Relay, args: Sequence[str], *, attempt: int,
                 on_host: OnHost, on_reply: OnReply,
                 messages: Messages) -> Awaitable[AttemptResult]:
        ...


# One session on `host` for the arguments still unanswered: answers go into the result's
# replies; returns None when it got through them, or the Verdict that ended it early.
Session = Callable[[str, list[str], AttemptResult], Awaitable[Verdict | None]]


async def over_hosts(relay: Relay, args: Sequence[str], on_host: OnHost,
                     session: Session) -> AttemptResult:
    """The relay's hosts in order, sessions on each until every argument is answered.

    A transient stop (connect, TLS, time-out, protocol) moves on to the next host with the
    arguments still unanswered; any other stop ends the attempt, since that host did answer.
    """
    result = AttemptResult()
    todo = list(dict.fromkeys(args))
    for host in relay.all_hosts:
        result.host = host
        on_host(host)
        stop: Verdict | None = None
        while todo:
            stop = await session(host, todo, result)
            todo = [a for a in todo if a not in result.replies]
            if stop is not None:
                break
        result.stop = stop
        if stop is None or stop.outcome is not Outcome.TRANSIENT:
            return result
    return result
