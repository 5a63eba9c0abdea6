"""A round's ODMR result: an earlier attempt's deferral is not hidden by a later clean one.

The attempts are scripted (the seam's AttemptResult, as the ODMR client fills it); the real
provider case is tests/protocols/test_odmr_rounds.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etrnd.config.model import Relay, Retry
from etrnd.config.schema import parse_yaml
from etrnd.protocols.replies import Outcome, Verdict
from etrnd.protocols.seam import AttemptResult, Messages
from etrnd.service.rounds import ArgOutcome, RelayStatus, run_round

CLEAN = Verdict(Outcome.ACCEPTED, 250, "1 relayed, 0 refused, 0 deferred in 40 ms")
DEFERRED = Verdict(Outcome.TRANSIENT, 451, "the office MTA deferred mail", error="Deferred")


def relay(tmp_path: Path) -> tuple[Relay, Retry]:
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    config = parse_yaml(
        "relays:\n  - {name: isp, host: 192.0.2.1, protocol: odmr, tls: none,\n"
        f"     auth: {{username: u, password_file: {secret}, allow_plaintext: true}},\n"
        "     etrn: [example.test]}\n"
        "retry: {first_delay: 1s, max_delay: 1s, jitter: 0, give_up_after: 10s}\n")
    return config.relays[0], config.retry


class Scripted:
    """Attempts as the ODMR client reports them: (verdict, deferred keys, relayed keys)."""

    def __init__(self, *steps: tuple[Verdict, set[str], set[str]]) -> None:
        self.steps = list(steps)

    async def __call__(self, relay: Relay, args: Sequence[str], *, attempt: int,
                       on_host: Any, on_reply: Any, messages: Messages) -> AttemptResult:
        verdict, deferred, relayed = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        result = AttemptResult(host="192.0.2.1")
        for arg in args:
            result.replies[arg] = verdict
            result.owed[arg] = set(deferred)
            on_reply(arg, verdict)
        result.messages.deferred_ids |= deferred
        result.messages.relayed_ids |= relayed
        messages.add(result.messages)
        return result


async def run(tmp_path: Path, send: Scripted) -> tuple[Any, RelayStatus]:
    r, retry = relay(tmp_path)
    status = RelayStatus("isp")
    now = [0.0]

    async def sleep(delay: float) -> None:
        now[0] += delay
        await asyncio.sleep(0)

    result = await run_round(r, retry, None, status, sleep=sleep, clock=lambda: now[0],
                             send=send)
    return result, status


async def test_a_clean_attempt_does_not_hide_an_earlier_deferral(tmp_path: Path) -> None:
    # Attempt 1: the office MTA deferred message k1. Every later ATRN ends clean, since the
    # provider holds k1 until its retry time: the round must not end accepted.
    result, status = await run(tmp_path, Scripted((DEFERRED, {"k1"}, set()),
                                                  (CLEAN, set(), {"k2"})))
    assert not result.ok and result.failed == ("example.test",)
    arg = status.args["example.test"]
    assert arg.outcome is ArgOutcome.GIVEN_UP and arg.code == 451
    assert "LeftBehind" in arg.text and "still at the provider" in arg.text
    assert status.attempts > 2  # retried with backoff until give_up_after


async def test_the_deferral_coming_back_ends_the_round_accepted(tmp_path: Path) -> None:
    result, status = await run(tmp_path, Scripted((DEFERRED, {"k1"}, set()),
                                                  (CLEAN, set(), set()),
                                                  (CLEAN, set(), {"k1"})))
    assert result.ok and result.accepted == ("example.test",)
    assert status.attempts == 3


async def test_no_deferral_no_change(tmp_path: Path) -> None:
    result, status = await run(tmp_path, Scripted((CLEAN, set(), {"k1"})))
    assert result.ok and status.attempts == 1
