"""One ETRN round per relay: retries per policy, permanent refusals honoured, live status kept."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from etrnd.config.model import Relay, Retry
from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.choose import attempt_for
from etrnd.protocols.replies import Outcome, Verdict
from etrnd.protocols.seam import AttemptResult, Messages, SendAttempt
from etrnd.service.history import Mark, RelayHistory, cause
from etrnd.service.retry import Backoff


class ArgOutcome(StrEnum):
    PENDING = "pending"  # not answered yet in this round
    ACCEPTED = "accepted"
    REFUSED = "refused"  # permanently, for this round
    FAILED = "failed"  # the last try failed transiently; a retry is due
    GIVEN_UP = "given-up"  # still failing at the give-up deadline


@dataclass
class ArgStatus:
    """The latest news about one ETRN argument, as `etrnd status` shows it."""

    arg: str
    outcome: ArgOutcome = ArgOutcome.PENDING
    code: int | None = None
    text: str = ""
    when: float | None = None  # wall-clock time of the last result
    attempts: int = 0  # how often it went (or was meant to go) on the wire this round
    pending_messages: int | None = None  # from a 253 reply
    verdict: Verdict | None = None  # the last one, for its reason (history.cause)
    by_relay: bool = False  # the relay's failure (AUTH, 500/502, connect...), not this argument's

    def as_dict(self) -> dict[str, Any]:
        return {"arg": self.arg, "outcome": str(self.outcome), "code": self.code,
                "text": self.text, "when": self.when, "attempts": self.attempts,
                "pending_messages": self.pending_messages}


@dataclass
class RelayStatus:
    """Mutable per-relay state; run_round updates it in place while the round runs."""

    relay: str
    running: bool = False
    round_start: float | None = None  # wall clock
    attempts: int = 0
    next_try: float | None = None  # wall clock of the next retry, None when none is scheduled
    host: str | None = None  # the host being (or last) tried
    args: dict[str, ArgStatus] = field(default_factory=dict)
    messages: Messages = field(default_factory=Messages)  # this round, over all attempts
    # Kept across rounds: the relay's history (saved in the state file) and how the last
    # round ended: accepted | refused | given-up | interrupted (cancelled), None before any.
    history: RelayHistory = field(default_factory=RelayHistory)
    ended: str | None = None
    ended_at: float | None = None
    messages_total: Messages = field(default_factory=Messages)  # since the daemon started

    def as_dict(self) -> dict[str, Any]:
        return {"relay": self.relay, "running": self.running, "round_start": self.round_start,
                "attempts": self.attempts, "next_try": self.next_try, "host": self.host,
                "args": [a.as_dict() for a in self.args.values()],
                "messages": self.messages.as_dict()}


@dataclass(frozen=True)
class RoundResult:
    """A round's outcome per argument, and why each one not accepted was not.

    `refused` and `failed` hold every argument not accepted (the exit status counts them);
    those the relay itself failed for (`relay_reason`: AUTH, ETRN not supported, connect,
    TLS, time-out...) are `by_relay`, all others have their own line in `reasons`.
    """

    relay: str
    accepted: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()  # gave up (deadline) or could not be tried
    attempts: int = 0
    messages: Messages = field(default_factory=Messages)  # ODMR only
    reasons: Mapping[str, str] = field(default_factory=dict)  # argument -> history.cause
    relay_reason: str | None = None  # set when the relay failed or refused for `by_relay`
    by_relay: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed and not self.messages.refused


Sleep = Callable[[float], Awaitable[Any]]
Clock = Callable[[], float]


def _record(status: ArgStatus, verdict: Verdict, now: float) -> None:
    status.verdict = verdict
    # 500/502 (ETRN not supported) or ATRN's 450/530 answer for the relay, not this argument.
    status.by_relay = verdict.outcome is Outcome.REFUSED_RELAY
    status.code = verdict.code
    status.text = verdict.text if verdict.error is None else f"{verdict.error}: {verdict.text}"
    status.when = now
    status.pending_messages = verdict.pending
    if verdict.outcome is Outcome.ACCEPTED:
        status.outcome = ArgOutcome.ACCEPTED
    elif verdict.outcome.permanent:
        status.outcome = ArgOutcome.REFUSED
    else:
        status.outcome = ArgOutcome.FAILED


async def run_round(relay: Relay, retry: Retry, args: Sequence[str] | None = None,
                    status: RelayStatus | None = None, *, sleep: Sleep = asyncio.sleep,
                    clock: Clock = time.monotonic, wall: Clock = time.time,
                    rng: Clock = random.random,
                    send: SendAttempt | None = None) -> RoundResult:
    """Send ETRN for `args` (default: the relay's `etrn:`) until each is answered for good.

    `send` defaults to the relay's protocol (ETRN or ODMR: see protocols.choose). Accepted
    and permanently refused arguments are not sent again in this round; transient failures
    are retried per `retry`. Cancelling the task stops at once (sessions close
    cleanly) and leaves `status` saying what was known.
    """
    wanted = tuple(dict.fromkeys(args if args is not None else relay.etrn))
    send = send if send is not None else attempt_for(relay)
    status = status if status is not None else RelayStatus(relay.label)
    log = get_logger().bind(relay=relay.label)
    policy = Backoff.from_config(retry)
    started = clock()
    status.running, status.round_start, status.attempts = True, wall(), 0
    status.next_try, status.host = None, None
    status.messages = Messages()
    status.args = {a: ArgStatus(a) for a in wanted}
    status.ended = None
    todo = list(wanted)
    # ODMR: what the office MTA deferred per argument this round, and everything relayed
    # since (message keys): an earlier attempt's deferral is not undone by a later clean one.
    owed: dict[str, set[str]] = {}
    relayed: set[str] = set()

    def on_host(host: str) -> None:
        status.host = host

    def on_reply(arg: str, verdict: Verdict) -> None:
        if arg in status.args:
            _record(status.args[arg], verdict, wall())

    try:
        while todo:
            status.attempts += 1
            status.next_try = None
            for arg in todo:
                status.args[arg].attempts += 1
            result = await send(relay, todo, attempt=status.attempts, on_host=on_host,
                                on_reply=on_reply, messages=status.messages)
            for arg, keys in result.owed.items():
                owed.setdefault(arg, set()).update(keys)
            relayed |= status.messages.relayed_ids | result.messages.relayed_ids
            _left_behind(result, owed, relayed)
            _remember(relay, status.history, todo, result, wall(), log)
            todo, reason = _settle(status, todo, result, wall())
            if not todo:
                break
            delay = policy.next_delay(status.attempts, clock() - started, rng)
            if delay is None:
                for arg in todo:
                    status.args[arg].outcome = ArgOutcome.GIVEN_UP
                log.error("etrn_gave_up", attempts=status.attempts, args=todo,
                          elapsed_s=round(clock() - started, 3), reason=reason)
                break
            status.next_try = wall() + delay
            log.warning("etrn_retry", attempt=status.attempts, delay=round(delay, 3),
                        reason=reason, args=todo)
            await sleep(delay)
    except asyncio.CancelledError:
        log.info("round_cancelled", attempts=status.attempts)
        status.ended = "interrupted"
        raise
    finally:
        status.running = False
        status.next_try = None
        status.ended_at = wall()
        status.messages_total.add(status.messages)
    done = _finish(status, log, relay.effective_port)
    if done.ok:
        status.ended = "accepted"
        status.history.accepted_round = status.ended_at
    else:
        status.ended = "refused" if done.refused or done.messages.refused else "given-up"
    return done


def _remember(relay: Relay, history: RelayHistory, todo: list[str], result: AttemptResult,
              now: float, log: Any) -> None:
    """Book one attempt into the relay's and its arguments' histories (status, state file)."""
    port = relay.effective_port
    stop = None
    if result.stop is not None:
        kind, text = cause(result.stop, result.host, port)
        stop = Mark(now, kind, text, result.stop.code, result.host)
        metrics.attempt_failed(relay.label, kind)
    good: list[Mark] = []
    bad: list[Mark] = [stop] if stop is not None else []
    for arg in todo:
        verdict = result.replies.get(arg)
        if verdict is None:
            if stop is not None:
                history.arg(arg).note([], [Mark(now, stop.kind, stop.text, stop.code,
                                                stop.host, arg)])
            continue
        kind, text = cause(verdict, result.host, port)
        mark = Mark(now, kind, text, verdict.code, result.host, arg)
        accepted = verdict.outcome is Outcome.ACCEPTED
        (good if accepted else bad).append(mark)
        history.arg(arg).note([mark] if accepted else [], [] if accepted else [mark])
    history.note(good, bad)
    if history.note_streak([v for a, v in result.replies.items() if a in todo]):
        log.warning("etrn_probable_refusal", reply=history.streak_reply,
                    times=history.streak, check=history.hint)


def _left_behind(result: AttemptResult, owed: dict[str, set[str]], relayed: set[str]) -> None:
    """An argument the provider answered is not done while a message the office MTA deferred
    in one of its turnarounds this round has not been relayed since (ODMR: the provider holds
    it until its own retry time, and an ATRN before then looks clean): transient instead."""
    for arg, verdict in list(result.replies.items()):
        left = owed.get(arg, set()) - relayed
        if left and verdict.outcome is Outcome.ACCEPTED:
            result.replies[arg] = Verdict(
                Outcome.TRANSIENT, 451,
                f"{len(left)} message(s) the office MTA deferred this round are still at the "
                "provider (offered again after its retry time)", error="LeftBehind")


def _settle(status: RelayStatus, todo: list[str], result: AttemptResult,
            now: float) -> tuple[list[str], str]:
    """Apply one attempt's replies; returns the arguments still to retry and why."""
    stop = result.stop
    ends_relay = stop is not None and stop.outcome.permanent
    left: list[str] = []
    reasons: list[str] = []
    for arg in todo:
        verdict = result.replies.get(arg)
        st = status.args[arg]
        if verdict is not None:
            _record(st, verdict, now)  # again: a fake `send` may not call on_reply
            if verdict.outcome is Outcome.TRANSIENT and not ends_relay:
                left.append(arg)
                reasons.append(f"{arg}: {st.text}" if verdict.code is None
                               else f"{arg}: {verdict.code} {verdict.text}")
            continue
        if stop is None:
            continue  # a real attempt always says why; never retry forever on a fake
        if ends_relay:
            # 500/502 or a refused AUTH end the round for the relay:
            # the arguments not yet answered are refused with the reason that stopped us.
            st.outcome, st.code, st.when = ArgOutcome.REFUSED, stop.code, now
            st.text = f"not sent: {stop.text}"
            st.verdict, st.by_relay = stop, True
        else:
            _record(st, stop, now)
            st.by_relay = True  # connect, TLS, time-out...: never reached this argument
            left.append(arg)
    if stop is not None and not ends_relay:
        reasons.insert(0, f"{stop.error}: {stop.text}" if stop.error else stop.text)
    return left, "; ".join(dict.fromkeys(reasons))


def _finish(status: RelayStatus, log: Any, port: int) -> RoundResult:
    by: dict[ArgOutcome, list[str]] = {o: [] for o in ArgOutcome}
    reasons: dict[str, str] = {}
    by_relay: list[str] = []
    relay_reason: str | None = None
    for st in status.args.values():
        by[st.outcome].append(st.arg)
        if st.outcome is ArgOutcome.ACCEPTED:
            continue
        if st.verdict is None:
            reasons[st.arg] = "not tried"
        elif st.by_relay:
            by_relay.append(st.arg)
            relay_reason = relay_reason or cause(st.verdict, status.host, port)[1]
        else:
            reasons[st.arg] = cause(st.verdict, status.host, port)[1]
    result = RoundResult(
        relay=status.relay, accepted=tuple(by[ArgOutcome.ACCEPTED]),
        refused=tuple(by[ArgOutcome.REFUSED]),
        failed=tuple(by[ArgOutcome.GIVEN_UP] + by[ArgOutcome.FAILED] + by[ArgOutcome.PENDING]),
        attempts=status.attempts, messages=status.messages, reasons=reasons,
        relay_reason=relay_reason, by_relay=tuple(by_relay),
    )
    level = log.info if result.ok else log.warning
    extra = {} if relay_reason is None else {"reason": relay_reason}
    level("round_done", accepted=list(result.accepted), refused=list(result.refused),
          failed=list(result.failed), attempts=result.attempts, **extra)
    return result


async def run_all(relays: Sequence[Relay], retry: Retry, args: Sequence[str] | None = None,
                  statuses: Mapping[str, RelayStatus] | None = None,
                  **options: Any) -> list[RoundResult]:
    """Run a round on every relay at once; one relay's trouble never touches another's."""

    async def guarded(relay: Relay) -> RoundResult:
        status = (statuses or {}).get(relay.label) or RelayStatus(relay.label)
        try:
            return await run_round(relay, retry, args, status, **options)
        except Exception as exc:  # a bug, not a server: contain it to this relay
            get_logger().error("round_crashed", relay=relay.label,
                               error=type(exc).__name__, text=str(exc))
            wanted = tuple(dict.fromkeys(args if args is not None else relay.etrn))
            return RoundResult(relay.label, failed=wanted, attempts=status.attempts,
                               relay_reason=f"etrnd failed: {type(exc).__name__}: {exc}",
                               by_relay=wanted)

    return list(await asyncio.gather(*(guarded(r) for r in relays)))
