"""Per-relay links and failover: the pure rules with a fake clock, and check-config's refusals."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from etrnd.cli import main
from etrnd.config.failover import implies
from etrnd.config.model import ConfigError, Watch
from etrnd.config.schema import parse_yaml
from etrnd.link.lines import (
    GateChange,
    GroupDecision,
    Lines,
    LinkChange,
    Output,
    plan,
)
from etrnd.link.state import Verdict

HOLD, SETTLE, GAP = 5.0, 2.0, 30.0
UP_FIBER = Verdict(True, "eth1: carrier up, 198.51.100.2/24, default via 198.51.100.1", "eth1")
DOWN_FIBER = Verdict(False, "eth1: no carrier")
UP_LTE = Verdict(True, "wwan0: carrier up, 203.0.113.2/24, default via 203.0.113.1", "wwan0")
DOWN_LTE = Verdict(False, "wwan0: no carrier")

TWO_LINES = f"""\
watch: {{settle: {SETTLE}s, min_interval: {GAP}s, down_hold: {HOLD}s}}
relays:
  - name: fiber
    host: mx.isp-a.example
    etrn: ["@example.org"]
    watch: {{interfaces: [eth1]}}
  - name: lte
    host: odmr.isp-b.example
    protocol: odmr
    auth: {{username: office, password_file: /etc/hostname}}
    etrn: [example.org]
    watch: {{interfaces: [wwan0], only_when_down: fiber}}
"""


def config(text: str = TWO_LINES) -> Lines:
    return Lines(plan(parse_yaml(textwrap.dedent(text))))


def decisions(out: Sequence[Output], kind: str | None = None) -> list[tuple[str, tuple[str, ...],
                                                                            str]]:
    return [(d.kind, d.relays, d.reason) for d in out
            if isinstance(d, GroupDecision) and (kind is None or d.kind == kind)]


def rounds(lines: Lines, start: float, end: float, step: float = 0.5) -> list[tuple[float, str]]:
    """Run the timers from `start` to `end`; the (time, relay) of every round started."""
    found = []
    t = start
    while t <= end:
        due = lines.next_due()
        if due is not None and due <= t:
            found += [(t, r) for d in lines.tick(t) if isinstance(d, GroupDecision)
                      and d.kind == "round" for r in d.relays]
        t += step
    return found


def at_start(fiber: Verdict, lte: Verdict, now: float = 0.0) -> tuple[Lines, list[Output]]:
    lines = config()
    return lines, lines.start({"eth1": fiber, "wwan0": lte}, now)


# --- the plan ----------------------------------------------------------------------------

def test_a_config_without_relay_watches_has_one_link_driving_every_relay() -> None:
    cfg = parse_yaml("watch: {interfaces: [ppp0]}\nrelays:\n"
                     "  - {name: a, host: a.example, etrn: ['@x.example']}\n"
                     "  - {name: b, host: b.example, etrn: ['@x.example']}\n")
    p = plan(cfg)
    assert [(s.name, s.interfaces) for s in p.links] == [("ppp0", ("ppp0",))]
    assert [(g.link, g.relays) for g in p.groups] == [("ppp0", ("a", "b"))]
    assert cfg.watch_of(cfg.relays[0]) == cfg.watch


def test_a_relay_watch_takes_every_key_it_leaves_out_from_the_top_level() -> None:
    cfg = parse_yaml("watch: {interfaces: [eth1], up_when: address, settle: 7s}\nrelays:\n"
                     "  - {name: a, host: a.example, etrn: ['@x.example'],"
                     "     watch: {interfaces: [wwan0], min_interval: 1m}}\n")
    assert cfg.watch_of(cfg.relays[0]) == Watch(interfaces=("wwan0",), up_when="address",
                                                settle=7.0, min_interval=60.0)


def test_every_top_level_watch_key_can_be_set_per_relay() -> None:
    from etrnd.config import schema

    assert set(schema.Watch.model_fields) <= set(schema.RelayWatch.model_fields)


def test_relays_with_the_same_watch_share_one_link_and_one_round_group() -> None:
    p = plan(parse_yaml("relays:\n"
                        "  - {name: a, host: a.example, etrn: ['@x.example'],"
                        "     watch: {interfaces: [eth1]}}\n"
                        "  - {name: b, host: b.example, etrn: ['@x.example'],"
                        "     watch: {interfaces: [eth1]}}\n"
                        "  - {name: c, host: c.example, etrn: ['@x.example'],"
                        "     watch: {interfaces: [eth1], settle: 9s}}\n"))
    assert [s.name for s in p.links] == ["eth1"]
    assert [g.relays for g in p.groups] == [("a", "b"), ("c",)]
    assert p.drives("eth1") == ("a", "b", "c")


# --- the rules ---------------------------------------------------------------------------

def test_both_lines_up_only_the_fixed_line_relay_runs() -> None:
    lines, out = at_start(UP_FIBER, UP_LTE)
    assert decisions(out) == [("up", ("fiber",), "link_up"), ("down", ("lte",), "standby")]
    assert [(g.relays, g.open) for g in out if isinstance(g, GateChange)] == [(("lte",), False)]
    assert lines.standby("lte") and not lines.may_run("lte") and lines.may_run("fiber")
    assert rounds(lines, 0, 100) == [(SETTLE, "fiber")]


def test_fixed_line_down_and_lte_up_at_start_only_odmr_runs() -> None:
    lines, out = at_start(DOWN_FIBER, UP_LTE)
    assert decisions(out) == [("down", ("fiber",), "link_down"), ("up", ("lte",), "link_up")]
    assert rounds(lines, 0, 100) == [(SETTLE, "lte")]


def test_both_down_nothing_runs_until_a_line_comes_up() -> None:
    lines, out = at_start(DOWN_FIBER, DOWN_LTE)
    assert decisions(out, "up") == []
    assert rounds(lines, 0, 50) == []
    out = lines.observe({"wwan0": UP_LTE}, 60.0)  # the LTE modem connects first
    assert decisions(out) == [("up", ("lte",), "link_up")]
    assert rounds(lines, 60, 70) == [(60 + SETTLE, "lte")]
    out = lines.observe({"eth1": UP_FIBER}, 80.0)  # then the fixed line: it takes over
    assert decisions(out) == [("up", ("fiber",), "link_up"), ("down", ("lte",), "standby")]
    assert rounds(lines, 80, 200) == [(80 + SETTLE, "fiber")]


def test_fixed_line_lost_hands_over_to_lte_after_the_down_hold_and_back_when_it_returns(
) -> None:
    lines, _ = at_start(UP_FIBER, UP_LTE)
    assert rounds(lines, 0, 10) == [(SETTLE, "fiber")]
    out = lines.observe({"eth1": DOWN_FIBER}, 100.0)
    assert out == [] and lines.link_up("eth1") and lines.holding("eth1") == 100.0
    assert rounds(lines, 100, 104.5) == []  # held: nothing cancelled, nothing started
    out = lines.tick(100 + HOLD)
    changes = [(c.link, c.kind, c.since) for c in out if isinstance(c, LinkChange)]
    assert changes == [("eth1", "down", 100.0)]  # dated from when it really began
    assert decisions(out) == [("down", ("fiber",), "link_down"), ("up", ("lte",), "failover")]
    assert [(g.open, g.why) for g in out if isinstance(g, GateChange)] == [
        (True, "fiber's link eth1 is down")]
    assert rounds(lines, 105, 120) == [(100 + HOLD + SETTLE, "lte")]
    out = lines.observe({"eth1": UP_FIBER}, 200.0)  # back: up at once, no hold
    assert decisions(out) == [("up", ("fiber",), "link_up"), ("down", ("lte",), "standby")]
    assert rounds(lines, 200, 300) == [(200 + SETTLE, "fiber")]


def test_a_fixed_line_blip_within_the_down_hold_starts_no_odmr_session() -> None:
    lines, _ = at_start(UP_FIBER, UP_LTE)
    rounds(lines, 0, 10)
    all_out: list[Output] = []
    for n in range(20):  # 20 blips of 1 s, 2 s apart: each undone within the hold
        t = 100.0 + 2 * n
        all_out += lines.observe({"eth1": DOWN_FIBER}, t)
        all_out += [*lines.tick(t + 0.5)]
        all_out += lines.observe({"eth1": UP_FIBER}, t + 1)
    assert decisions(all_out) == []
    assert not [g for g in all_out if isinstance(g, GateChange)]
    blips = [c for c in all_out if isinstance(c, LinkChange)]
    assert [(c.kind, c.held) for c in blips] == [("blip", 1.0)] * 20
    assert rounds(lines, 140, 300) == []
    assert lines.standby("lte")


def test_a_fixed_line_flapping_slower_than_the_hold_gets_rounds_at_most_every_min_interval(
) -> None:
    lines, _ = at_start(UP_FIBER, UP_LTE)
    started = rounds(lines, 0, 10)
    t = 100.0
    for _ in range(6):  # down 8 s (past the hold), up 2 s
        lines.observe({"eth1": DOWN_FIBER}, t)
        started += rounds(lines, t, t + 8)
        lines.observe({"eth1": UP_FIBER}, t + 8)
        started += rounds(lines, t + 8, t + 10)
        t += 10
    started += rounds(lines, t, t + 100)
    for relay in ("fiber", "lte"):
        times = [at for at, r in started if r == relay]
        assert times, relay
        assert all(b - a >= GAP for a, b in itertools.pairwise(times)), (relay, times)


def test_a_round_due_while_the_link_is_held_waits_for_the_hold_to_end() -> None:
    lines, _ = at_start(UP_FIBER, DOWN_LTE)  # fiber's round due at SETTLE
    lines.observe({"eth1": DOWN_FIBER}, 1.0)  # held from 1.0 until 1.0 + HOLD
    held = lines.verdict("eth1", 2.0)
    assert held.up and held.iface == "eth1"
    assert held.why == "eth1: no carrier (for 1.0 s; held: a down shorter than 5 s is a blip)"
    assert lines.next_due() == 1.0 + HOLD  # not SETTLE: no busy timer while held
    assert lines.tick(SETTLE) == []
    out = lines.observe({"eth1": UP_FIBER}, 3.0)  # a blip: the round goes now
    assert [(c.kind, c.why) for c in out if isinstance(c, LinkChange)] == [
        ("blip", "eth1: no carrier")]
    assert rounds(lines, 3.0, 4.0) == [(3.0, "fiber")]
    lines2, _ = at_start(UP_FIBER, DOWN_LTE)
    lines2.observe({"eth1": DOWN_FIBER}, 1.0)
    assert rounds(lines2, 1.0, 20.0) == []  # a real down: the owed round is cancelled


def test_a_link_up_at_start_counts_as_up_without_a_hold() -> None:
    lines, _ = at_start(DOWN_FIBER, UP_LTE)
    assert not lines.link_up("eth1")  # no earlier up to hold: lte runs at once
    assert lines.may_run("lte")


def test_a_trigger_takes_the_owed_round_of_each_group_it_covers() -> None:
    lines, _ = at_start(UP_FIBER, DOWN_LTE)
    assert lines.owed("fiber", 0.5) == (SETTLE - 0.5, "settle")
    assert not lines.take_early(["lte"], 0.5)
    assert lines.take_early(["fiber", "lte"], 0.5)
    assert rounds(lines, 0, 100) == []


def test_reload_keeps_the_links_state_and_decides_only_what_changed() -> None:
    lines, _ = at_start(UP_FIBER, UP_LTE)
    rounds(lines, 0, 10)
    lines.observe({"eth1": DOWN_FIBER}, 20.0)  # held
    new = plan(parse_yaml(TWO_LINES.replace(f"settle: {SETTLE}s", "settle: 1s")))
    out = lines.reconfigure(new, {"eth1": DOWN_FIBER, "wwan0": UP_LTE}, 21.0)
    assert decisions(out) == [] and lines.holding("eth1") == 20.0
    out = lines.tick(20 + HOLD)
    assert decisions(out) == [("down", ("fiber",), "link_down"), ("up", ("lte",), "failover")]
    assert rounds(lines, 25, 40) == [(26.0, "lte")]  # the new settle


def test_implies_follows_interfaces_up_when_and_family() -> None:
    w = Watch
    assert implies(w(interfaces=("eth1",)), w(interfaces=("eth1",), up_when="carrier"))
    assert not implies(w(interfaces=("eth1",), up_when="carrier"), w(interfaces=("eth1",)))
    assert implies(w(interfaces=("wwan0",)), w(interfaces=("wwan*",)))
    assert implies(w(interfaces=("wwan*",)), w(interfaces=()))
    assert not implies(w(interfaces=("wwan*",)), w(interfaces=("wwan0",)))
    assert not implies(w(interfaces=("eth1",)), w(interfaces=("wwan0",)))
    assert not implies(w(interfaces=()), w(interfaces=("eth1",)))
    assert not implies(w(family="any"), w(family="ipv4"))
    assert implies(w(family="ipv6"), w(family="any"))


# --- check-config ------------------------------------------------------------------------

def relays_with(*watches: str) -> str:
    out = "relays:\n"
    for n, watch in enumerate(watches):
        out += f"  - {{name: r{n}, host: h{n}.example, etrn: ['@x.example'], watch: {watch}}}\n"
    return out


@pytest.mark.parametrize(("watches", "expected"), [
    (("{interfaces: [eth1]}", "{interfaces: [wwan0], only_when_down: fibre}"),
     ["relays[r1].watch.only_when_down: no relay named 'fibre' (configured: r0, r1)"]),
    (("{interfaces: [eth1], only_when_down: r0}",),
     ["relays[r0].watch.only_when_down: names this relay itself: it would run only while its "
      "own link is down, that is never"]),
    (("{interfaces: [eth1], only_when_down: [r1]}", "{interfaces: [wwan0], only_when_down: r0}"),
     ["relays[r0].watch.only_when_down: a cycle (r0 -> r1 -> r0): while all these links are "
      "up none of these relays runs; only the backup names the relay it stands in for"]),
    (("{interfaces: [eth1], up_when: carrier}", "{interfaces: [eth1], only_when_down: r0}"),
     ["relays[r1].watch: can never be up: it runs only while r0's link (eth1 up by carrier) "
      "is down, and its own link (eth1 up by default-route (any)) is never up without that "
      "one"]),
    (("{interfaces: []}", "{interfaces: [wwan0], only_when_down: r0}"),
     ["relays[r1].watch: can never be up: it runs only while r0's link (any interface up by "
      "default-route (any)) is down, and its own link (wwan0 up by default-route (any)) is "
      "never up without that one"]),
])
def test_check_config_refuses_a_relay_watch_that_can_never_be_up(
        watches: tuple[str, ...], expected: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_yaml(relays_with(*watches))
    assert err.value.problems == expected
    path = tmp_path / "etrnd.yaml"
    path.write_text(relays_with(*watches))
    assert main(["check-config", "-c", str(path)]) == 2
    assert [line.strip() for line in capsys.readouterr().err.splitlines()[1:]] == expected


def test_check_config_accepts_the_two_lines_config_and_a_backup_on_another_family(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "etrnd.yaml"
    path.write_text(TWO_LINES)
    assert main(["check-config", "-c", str(path)]) == 0, capsys.readouterr().err
    parse_yaml(relays_with("{interfaces: [eth1], family: ipv4}",
                           "{interfaces: [eth1], family: ipv6, only_when_down: r0}"))


# --- what status and STATUS= say ---------------------------------------------------------

def test_status_and_the_status_line_show_each_link_and_the_relays_it_drives() -> None:
    from etrnd.outputs import status

    cfg = parse_yaml(TWO_LINES)
    now = 1_000_000.0
    links = [status.LinkView(True, UP_FIBER.why, now - 60, 0, ("eth1",), "default-route",
                             name="eth1", relays=("fiber",), active_since={"fiber": now - 60}),
             status.LinkView(True, UP_LTE.why, now - 90, 2, ("wwan0",), "default-route",
                             name="wwan0", relays=("lte",), standby=frozenset({"lte"}),
                             backs_up={"lte": ("fiber",)})]
    line = status.summary(True, cfg.relays, {}, (), links)
    assert line == "eth1 up, wwan0 up; fiber: idle, lte: standby"
    doc = {"now": "1970-01-12T13:46:40Z", "links": [status.links_status(ln, now) for ln in links]}
    text = status.render(doc)
    assert "link eth1: UP for 1 min" in text and "; drives fiber\n" in text
    assert "link wwan0: UP for 1 min 30 s" in text
    assert "; drives lte (only while fiber down: standby)\nrounds:" in text
    assert [e["relays"] for e in doc["links"]] == [
        [{"name": "fiber", "standby": False, "only_when_down": []}],
        [{"name": "lte", "standby": True, "only_when_down": ["fiber"]}]]
    one = parse_yaml("relays: [{name: isp, host: a.example, etrn: ['@x.example']}]")
    assert status.summary(True, one.relays, {}, (), links[:1]) == "link up; isp: idle"


# --- docs/two-lines.md says what the code does -------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "two-lines.md"


def test_the_documented_config_is_valid_and_runs_lte_only_while_fiber_is_down() -> None:
    text = DOC.read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_yaml(block, defer_credentials=True)
    p = plan(cfg)
    assert [(g.link, g.relays, g.only_when_down) for g in p.groups] == [
        ("eth1", ("fiber",), ()), ("wwan0", ("lte",), ("fiber",))]


def test_the_documented_check_config_refusals_are_what_check_config_says() -> None:
    text = DOC.read_text()
    documented = text.split("## What check-config refuses", 1)[1].split("```\n")[1].splitlines()
    two = ("relays:\n"
           "  - {name: fiber, host: a.example, etrn: ['@x.example'], "
           "watch: {interfaces: [eth1]%s}}\n"
           "  - {name: lte, host: b.example, etrn: ['@x.example'], watch: {interfaces: [%s], "
           "only_when_down: %s}}\n")
    cycle = ("relays:\n"
             "  - {name: a, host: a.example, etrn: ['@x.example'], "
             "watch: {interfaces: [eth1], only_when_down: b}}\n"
             "  - {name: b, host: b.example, etrn: ['@x.example'], "
             "watch: {interfaces: [wwan0], only_when_down: a}}\n")
    found = []
    for config in (two % ("", "wwan0", "fibre"), two % ("", "wwan0", "lte"), cycle,
                   two % (", up_when: carrier", "eth1", "fiber")):
        with pytest.raises(ConfigError) as err:
            parse_yaml(config)
        found += err.value.problems
    assert found == documented


def test_the_reasons_a_round_is_cancelled_with_are_the_ones_sessions_know() -> None:
    # An ODMR transfer goes on for these two (seam.keeps_session): the names must agree.
    from etrnd.protocols.seam import LINK_DOWN, STANDBY

    lines, out = at_start(UP_FIBER, UP_LTE)
    assert [d.reason for d in out if isinstance(d, GroupDecision) and d.kind == "down"] == [
        STANDBY]
    out = lines.observe({"wwan0": DOWN_LTE, "eth1": DOWN_FIBER}, 10.0, at_once=["eth1"])
    assert [d.reason for d in out if isinstance(d, GroupDecision) and d.kind == "down"] == [
        LINK_DOWN]
