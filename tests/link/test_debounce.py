"""Debounce: settle and min_interval with a fake clock, no network."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from etrnd.link.debounce import Change, Debouncer, DownHold


def test_nothing_owed_without_up() -> None:
    d = Debouncer(settle=2, min_interval=30)
    assert d.due() is None
    assert not d.take_round(100.0)


def test_settle_then_round() -> None:
    d = Debouncer(settle=2, min_interval=30)
    d.link(True, 10.0)
    assert d.due() == 12.0
    assert not d.take_round(11.9)
    assert d.take_round(12.0)
    assert d.due() is None and not d.pending
    assert not d.take_round(13.0)  # one round per up


def test_down_inside_settle_cancels() -> None:
    d = Debouncer(settle=2, min_interval=30)
    d.link(True, 10.0)
    d.link(False, 11.0)
    assert d.due() is None
    assert not d.take_round(12.0)
    d.link(True, 11.5)  # a new up starts its own settle
    assert d.due() == 13.5


def test_repeated_up_does_not_restart_settle() -> None:
    d = Debouncer(settle=2, min_interval=0)
    d.link(True, 10.0)
    d.link(True, 11.0)
    assert d.due() == 12.0


def test_zero_settle_is_immediate() -> None:
    d = Debouncer(settle=0, min_interval=0)
    d.link(True, 5.0)
    assert d.take_round(5.0)


def test_min_interval_defers_not_drops() -> None:
    d = Debouncer(settle=0, min_interval=30)
    d.link(True, 0.0)
    assert d.take_round(0.0)
    d.link(False, 1.0)
    d.link(True, 2.0)
    assert d.due() == 30.0  # owed, but not before min_interval
    assert not d.take_round(29.0)
    assert d.take_round(30.0)
    assert d.last_round == 30.0


def test_down_cancels_deferred_round() -> None:
    d = Debouncer(settle=0, min_interval=30)
    d.link(True, 0.0)
    assert d.take_round(0.0)
    d.link(False, 1.0)
    d.link(True, 2.0)
    d.link(False, 3.0)
    assert d.due() is None


def test_flapping_at_10hz_is_bounded() -> None:
    d = Debouncer(settle=0, min_interval=1.0)
    rounds = []
    t = 0.0
    for i in range(100):  # 10 s of 10 Hz flapping, polling every 10 ms
        d.link(i % 2 == 0, t)
        for _ in range(10):
            if d.take_round(t):
                rounds.append(t)
            t += 0.01
    assert len(rounds) <= 10 / 1.0 + 1
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(rounds))


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=60),
       st.floats(0, 3), st.floats(0, 10))
def test_properties(steps: list[tuple[bool, float]], settle: float, min_interval: float) -> None:
    """Rounds keep min_interval apart, follow an up by settle, and never follow a down."""
    d = Debouncer(settle, min_interval)
    t = 0.0
    up_since: float | None = None
    rounds: list[float] = []
    for up, gap in steps:
        due = d.due()
        if due is not None and due <= t + gap:
            assert d.take_round(max(due, t))
            assert up_since is not None and max(due, t) >= up_since + settle - 1e-9
            rounds.append(max(due, t))
            up_since = None
        t += gap
        d.link(up, t)
        if not up:
            up_since = None
            assert d.due() is None
        elif up_since is None:
            up_since = t
    assert all(b - a >= min_interval - 1e-9 for a, b in itertools.pairwise(rounds))


def test_trigger_takes_the_owed_round_early() -> None:
    d = Debouncer(settle=2, min_interval=30)
    assert d.owed() is None and not d.take_early(5.0)  # nothing owed: nothing taken
    d.link(True, 10.0)
    assert d.owed() == (12.0, "settle")
    assert d.take_early(10.5)  # a trigger inside the settle window is that round
    assert d.owed() is None and not d.take_round(12.0)
    d.link(False, 11.0)
    d.link(True, 13.0)  # min_interval runs from the trigger's round
    assert d.owed() == (40.5, "min_interval")


# --- down_hold (issue 18): a down undone within the hold is a blip -------------------------
def test_down_undone_within_hold_is_a_blip() -> None:
    h = DownHold(5.0, up=True)
    assert h.observe(False, 10.0) is None  # held, nothing decided
    assert h.up and h.holding == 10.0 and h.deadline() == 15.0
    change = h.observe(True, 10.000157)  # dhcpcd's delete+add, 157 µs apart
    assert change is not None and change.kind == "blip"
    assert round(change.held, 6) == 0.000157
    assert h.up and h.holding is None and h.deadline() is None


def test_down_past_hold_is_dated_from_its_start() -> None:
    h = DownHold(5.0, up=True)
    h.observe(False, 10.0)
    assert h.observe(False, 12.0) is None  # still down: the start stays 10.0
    assert h.expire(14.9) is None
    change = h.expire(15.0)
    assert change == Change("down", 10.0, 5.0) and not h.up


def test_up_is_decided_at_once_and_zero_hold_acts_at_once() -> None:
    h = DownHold(5.0, up=False)
    assert h.observe(True, 3.0) == Change("up", 3.0)
    z = DownHold(0.0, up=True)
    assert z.observe(False, 7.0) == Change("down", 7.0, 0.0)


def test_at_once_skips_the_hold_but_keeps_its_start() -> None:
    # An expired RA route: its lifetime was the hold.
    h = DownHold(5.0, up=True)
    h.observe(False, 10.0)
    assert h.observe(False, 11.0, at_once=True) == Change("down", 10.0, 1.0)
    fresh = DownHold(5.0, up=True)
    assert fresh.observe(False, 20.0, at_once=True) == Change("down", 20.0, 0.0)


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 10)), max_size=30))
def test_no_down_shorter_than_the_hold_is_ever_decided(steps: list[tuple[bool, float]]) -> None:
    h, now, hold = DownHold(2.0, up=True), 0.0, 2.0
    for up, gap in steps:
        due = h.deadline()
        if due is not None and due <= now + gap:
            change = h.expire(due)
            assert change is not None and change.kind == "down" and change.held >= hold - 1e-9
        now += gap
        change = h.observe(up, now)
        if change is not None and change.kind == "down":
            raise AssertionError("a down decided inside the hold")
