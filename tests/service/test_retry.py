"""Retry schedule: exponential, capped, jittered within bounds, and a deadline that holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etrnd.config.model import Retry
from etrnd.service.retry import Backoff


def policy(**kw: float) -> Backoff:
    base = {"first_delay": 5.0, "max_delay": 600.0, "factor": 2.0, "jitter": 0.0,
            "give_up_after": 7200.0}
    return Backoff(**{**base, **kw})


def mid() -> float:
    return 0.5  # rng midpoint: no jitter


def test_exponential_then_capped() -> None:
    p = policy()
    assert [p.base_delay(n) for n in range(1, 10)] == [
        5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert [p.delay(n, mid) for n in range(1, 4)] == [5, 10, 20]


def test_factor_one_is_constant() -> None:
    p = policy(factor=1.0)
    assert {p.base_delay(n) for n in range(1, 50)} == {5.0}


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert policy(factor=100.0).base_delay(10**6) == 600.0


def test_jitter_bounds() -> None:
    p = policy(jitter=0.2)
    assert p.delay(1, lambda: 0.0) == pytest.approx(4.0)
    assert p.delay(1, lambda: 0.999999) == pytest.approx(6.0, rel=1e-5)
    # jitter applies after the cap, so relays stuck at the cap still spread out
    assert p.delay(50, lambda: 0.0) == pytest.approx(480.0)


def test_deadline_shortens_the_last_wait_then_gives_up() -> None:
    p = policy(give_up_after=60.0)
    assert p.next_delay(1, 0.0, mid) == 5.0
    assert p.next_delay(4, 50.0, mid) == pytest.approx(10.0)  # 40 s would overshoot
    assert p.next_delay(5, 60.0, mid) is None
    assert p.next_delay(5, 61.0, mid) is None


def test_zero_means_never_give_up() -> None:
    p = policy(give_up_after=0.0)
    assert p.next_delay(1000, 10.0**9, mid) == 600.0


def test_from_config() -> None:
    p = Backoff.from_config(Retry(first_delay=1.0, max_delay=8.0, factor=3.0, jitter=0.1,
                                  give_up_after=30.0))
    assert (p.first_delay, p.max_delay, p.factor, p.jitter, p.give_up_after) == (
        1.0, 8.0, 3.0, 0.1, 30.0)


@given(
    first=st.floats(0.001, 100), factor=st.floats(1.0, 100.0), jitter=st.floats(0.0, 1.0),
    extra=st.floats(0.0, 1000.0), attempt=st.integers(1, 10_000), r=st.floats(0.0, 0.999999),
    deadline=st.floats(0.0, 10_000), elapsed=st.floats(0.0, 20_000),
)
def test_schedule_properties(first: float, factor: float, jitter: float, extra: float,
                             attempt: int, r: float, deadline: float, elapsed: float) -> None:
    p = policy(first_delay=first, max_delay=first + extra, factor=factor, jitter=jitter,
               give_up_after=deadline)
    base = p.base_delay(attempt)
    assert first <= base <= p.max_delay
    assert base <= p.base_delay(attempt + 1)
    delay = p.next_delay(attempt, elapsed, lambda: r)
    if deadline and elapsed >= deadline:
        assert delay is None
    else:
        assert delay is not None
        assert 0.0 <= delay <= base * (1 + jitter) + 1e-9
        assert not deadline or elapsed + delay <= deadline + 1e-9
