"""The daemon's verdict (OK/DEGRADED/FAILING) and health (Nagios OK/WARNING/CRITICAL/UNKNOWN)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from etrnd.service.rounds import RelayStatus

# Nagios plugin exit codes (monitoring-plugins guidelines, "Plugin Return Codes").
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def duration(seconds: float) -> str:
    """`2 h 5 min`, `3 min 20 s`, `12 s`, `1 d 3 h`: the two largest units, rounded down."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size} {unit}")
            left %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return " ".join(parts)


def clock(wall: float, now: float) -> str:
    """A wall time for a human: `05:40:12` today (local time), `2026-12-05 05:40` before."""
    local, today = time.localtime(wall), time.localtime(now)
    if local[:3] == today[:3]:
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M", local)


@dataclass(frozen=True)
class RelayView:
    """One relay as the verdict and the health see it."""

    name: str
    status: RelayStatus | None
    # The relay's own link (docs/two-lines.md), when it has one: whether the relay may run
    # (its link up and, for a backup, the link it stands in for down) and since when.
    link_up: bool | None = None
    link_since: float | None = None


def condition(st: RelayStatus | None) -> str:
    """ok | failing | unknown: `failing` while the relay's latest try had a failure."""
    if st is None:
        return "unknown"
    if st.history.failing or st.ended in ("refused", "given-up"):
        return "failing"
    if st.history.last_success is not None or st.ended == "accepted":
        return "ok"
    return "unknown"


def _problem(name: str, st: RelayStatus, now: float) -> str:
    hist = st.history
    what = hist.last_failure.text if hist.last_failure else (st.ended or "failing")
    text = f"{name}: {what}"
    if hist.failing_since is not None:
        tries = f", {hist.failures} tr{'y' if hist.failures == 1 else 'ies'}"
        text += (f" since {clock(hist.failing_since, now)} "
                 f"({duration(now - hist.failing_since)}){tries}")
    if hist.hint:
        text += " (probably a refusal)"
    return text


def verdict(relays: Sequence[RelayView], now: float, link_up: bool,
            link_since: float | None, reload_problem: str | None) -> dict[str, Any]:
    """The first line of `etrnd status`: OK, DEGRADED (some relays fail, or the running config
    is not the file's) or FAILING (every relay fails), with the reason."""
    failing = [r for r in relays if condition(r.status) == "failing"]
    if failing and len(failing) == len(relays):
        state = "FAILING"
    elif failing or reload_problem:
        state = "DEGRADED"
    else:
        state = "OK"
    reasons = [_problem(r.name, r.status, now) for r in failing if r.status is not None]
    if reload_problem:
        reasons.append(reload_problem)
    if not reasons:
        if not link_up:
            since = f" since {clock(link_since, now)}" if link_since else ""
            reasons.append(f"link down{since}; rounds start when it comes up")
        else:
            # A relay whose own link is down, or a backup on standby, is not expected to.
            active = [r for r in relays if r.link_up is not False]
            good = [r for r in active if condition(r.status) == "ok"]
            reasons.append(f"link up; {len(good)} of {len(active)} relays answered "
                           "their last round" if len(good) < len(active) else
                           "link up; every relay accepted its last round")
            idle = [r.name for r in relays if r.link_up is False]
            if idle:
                reasons.append(f"not running: {', '.join(idle)} (its link is down, or a "
                               "link it stands in for is up)")
    return {"state": state, "text": "; ".join(reasons)}


def overdue(st: RelayStatus | None, now: float, link_up: bool,
            link_since: float | None) -> float:
    """Seconds the link has been up without this relay's round being accepted: since the
    link came up, or since the relay started failing if that is later; 0 when fine or down."""
    if not link_up or link_since is None:
        return 0.0
    hist = st.history if st is not None else None
    if hist is not None and hist.failing_since is not None:
        return max(0.0, now - max(link_since, hist.failing_since))
    accepted = hist.accepted_round if hist is not None else None
    if accepted is None or accepted < link_since:
        return max(0.0, now - link_since)
    return 0.0


def _label(name: str) -> str:
    # Perfdata labels with blanks, '=' or quotes are quoted, quotes doubled (guidelines).
    return f"'{name.replace(chr(39), chr(39) * 2)}'" if re.search(r"[\s='|]", name) else name


def assess(relays: Sequence[RelayView], now: float, link_up: bool, link_since: float | None,
           warning_after: float, critical_after: float,
           reload_problem: str | None) -> dict[str, Any]:
    """The `health` object of `status --json`, which `etrnd check` prints and exits with.

    CRITICAL when a relay's round has gone unaccepted for `critical_after` seconds of link
    up time, WARNING after `warning_after` (0 = never) or while a config reload failed.
    """
    late = {r.name: overdue(r.status, now, link_up, link_since) if r.link_up is None
            else overdue(r.status, now, r.link_up, r.link_since) for r in relays}
    code, worst = OK, max(late.values(), default=0.0)
    if critical_after and worst >= critical_after:
        code = CRITICAL
    elif (warning_after and worst >= warning_after) or reload_problem:
        code = WARNING
    texts = []
    for r in relays:
        limit = warning_after or critical_after
        if limit and late[r.name] >= limit:
            st = r.status
            why = f": {_problem(r.name, st, now).partition(': ')[2]}" if (
                st is not None and condition(st) == "failing") else ""
            texts.append(f"{r.name}: no accepted round for {duration(late[r.name])}{why}")
    if reload_problem:
        texts.append(reload_problem)
    if not texts:
        waiting = [f"{r.name} unaccepted for {duration(late[r.name])}" for r in relays
                   if late[r.name] > 0]
        if waiting:  # not long enough to warn about yet: say so, and when it would be
            limit = warning_after or critical_after
            texts.append(", ".join(waiting)
                         + (f" (WARNING after {duration(limit)})" if limit else ""))
        else:
            texts.append(("link up" if link_up else "link down")
                         + f", {len(relays)} relay{'s' if len(relays) != 1 else ''} fine")
    perf = [f"{_label(name + '_unaccepted')}={round(late[name], 1):g}s;{warning_after:g};"
            f"{critical_after:g};0" for name in late]
    perf.append(f"link_up={int(link_up)};;;0;1")
    return {"status": NAMES[code], "code": code, "text": "; ".join(texts),
            "unaccepted_s": {name: round(value, 1) for name, value in late.items()},
            "warning_after_s": warning_after,
            "critical_after_s": critical_after, "perfdata": " ".join(perf)}


def nagios_line(health: Mapping[str, Any]) -> str:
    """`ETRND CRITICAL - text | perfdata`, one line (plugin output guidelines)."""
    text = " ".join(str(health.get("text", "")).replace("|", "/").split())
    perf = str(health.get("perfdata") or "")
    return f"ETRND {health.get('status', 'UNKNOWN')} - {text}" + (f" | {perf}" if perf else "")
