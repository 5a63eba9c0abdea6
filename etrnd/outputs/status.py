"""What `etrnd status` and systemd's STATUS= say: built from the daemon's state, rendered."""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from etrnd import __version__
from etrnd.config.model import Config, Relay
from etrnd.outputs import health, logs
from etrnd.outputs.health import clock, duration
from etrnd.protocols.seam import Messages
from etrnd.service.history import History, Mark
from etrnd.service.rounds import ArgStatus, RelayStatus


def _iso(wall: float | None) -> str | None:
    return None if wall is None else logs.iso(wall)


@dataclass(frozen=True)
class LinkView:
    """One watched link: the unit `status` shows (a list of them once relays have their own)."""

    up: bool
    why: str
    since: float | None  # wall clock of the last up/down change (or of the start)
    transitions: int  # up/down changes since the daemon started
    watching: tuple[str, ...]
    up_when: str
    # Why the ISP cannot connect back to the up WAN (ETRN relays only), or None.
    not_public: str | None = None
    # With relays on links of their own (docs/two-lines.md): the link's name, the relays it
    # drives, those waiting because a link they stand in for is up, each backup's
    # only_when_down, when each relay may run since (wall clock), and a down being held.
    name: str = "*"
    relays: tuple[str, ...] = ()
    standby: frozenset[str] = frozenset()
    backs_up: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    active_since: Mapping[str, float] = field(default_factory=dict)
    holding: float | None = None


@dataclass(frozen=True)
class DaemonView:
    """The daemon facts a status needs; wall-clock times in seconds since the epoch."""

    path: Path
    config: Config
    started: float
    link: LinkView
    rounds_started: int
    last_round: float | None
    tasks: int  # asyncio tasks alive: soak tests watch that it does not grow
    statuses: Mapping[str, RelayStatus]
    running: Collection[str]  # relays with a round task
    # The link-up round still owed: (seconds from now, "settle" | "min_interval").
    round_due: tuple[float, str] | None = None
    now: float = 0.0
    config_loaded: float | None = None  # when the running config was read
    reload_failed: tuple[float, list[str]] | None = None  # the last reload, if it failed
    repeat_next: float | None = None  # wall clock of the next repeat round
    state_file: dict[str, Any] | None = None
    links: Sequence[LinkView] = ()  # every link, when relays have their own (else `link`)


def reload_problem(view: DaemonView) -> str | None:
    """`config reload failed at …: reason; running the config of …`, or None."""
    if view.reload_failed is None:
        return None
    at, problems = view.reload_failed
    loaded = clock(view.config_loaded, view.now) if view.config_loaded else "the start"
    return (f"config reload failed at {clock(at, view.now)}: {'; '.join(problems[:3])}; "
            f"running the config of {loaded}")


def link_status(link: LinkView, now: float) -> dict[str, Any]:
    return {"up": link.up, "why": link.why, "since": _iso(link.since),
            "for_s": None if link.since is None else round(now - link.since, 1),
            "transitions": link.transitions, "watching": list(link.watching) or ["*"],
            "up_when": link.up_when, "not_public": link.not_public}


def links_status(link: LinkView, now: float) -> dict[str, Any]:
    """One entry of `links`: the link's status, its name and the relays it drives."""
    return {"name": link.name, **link_status(link, now),
            "down_held_since": _iso(link.holding),
            "relays": [{"name": r, "standby": r in link.standby,
                        "only_when_down": list(link.backs_up.get(r, ()))}
                       for r in link.relays]}


def _relay_view(name: str, st: RelayStatus | None,
                links: Sequence[LinkView]) -> health.RelayView:
    # With links of their own, a relay is late only while it may run: a backup on standby
    # is not (etrnd.link.lines).
    for link in links:
        if name in link.relays:
            since = link.active_since.get(name)
            return health.RelayView(name, st, link_up=since is not None, link_since=since)
    return health.RelayView(name, st)


def build(view: DaemonView) -> dict[str, Any]:
    """The status document the control socket returns (`etrnd status --json`); the keys are
    documented in docs/status.md and stable."""
    config, now = view.config, view.now or time.time()
    relays = [_relay_view(r.label, view.statuses.get(r.label), view.links)
              for r in config.relays]
    problem = reload_problem(view)
    link = view.link
    doc: dict[str, Any] = {
        "version": __version__, "pid": os.getpid(), "now": _iso(now),
        "started": _iso(view.started), "config": str(view.path),
        "config_loaded": _iso(view.config_loaded),
        "reload": None if view.reload_failed is None else {
            "ok": False, "at": _iso(view.reload_failed[0]),
            "problems": list(view.reload_failed[1])},
        "verdict": health.verdict(relays, now, link.up, link.since, problem),
        "health": health.assess(relays, now, link.up, link.since, config.health.warning_after,
                                config.health.critical_after, problem),
        "link": link_status(link, now),
        "rounds_started": view.rounds_started, "last_round": _iso(view.last_round),
        "round_due": None if view.round_due is None else {
            "in_s": round(view.round_due[0], 1), "reason": view.round_due[1]},
        "repeat": {"every_s": config.repeat, "next": _iso(view.repeat_next)},
        "state_file": view.state_file,
        "tasks": view.tasks,
        "relays": [relay_status(r, view.statuses.get(r.label), r.label in view.running, now)
                   for r in config.relays],
        "links": [links_status(one, now) for one in view.links],
    }
    for relay in doc["relays"]:
        for one in view.links:
            if relay["name"] in one.relays:
                relay["link"] = one.name
                if relay["name"] in one.standby and relay["state"] == "idle":
                    relay["state"] = "standby"
    return doc


def _mark(mark: Mark | None) -> dict[str, Any] | None:
    return None if mark is None else {**mark.as_dict(), "when": _iso(mark.when)}


def state_of(st: RelayStatus | None, running: bool) -> str:
    """running | waiting (backoff) | idle | refused | given-up | interrupted (see docs)."""
    if running:
        return "waiting" if st and st.next_try else "running"
    if st is None or st.ended in (None, "accepted"):
        return "idle"
    return st.ended


def relay_status(relay: Relay, st: RelayStatus | None, running: bool,
                 now: float | None = None) -> dict[str, Any]:
    """One relay's entry: state, condition, history, the round so far, each argument.

    `messages` counts what came over the relay's own connection in the (last) round: ODMR's
    relayed/refused/deferred; always zero for ETRN, whose mail arrives on its own.
    """
    now = time.time() if now is None else now
    args = list(st.args.values()) if st and st.args else [ArgStatus(a) for a in relay.etrn]
    hist = st.history if st else None
    nxt = st.next_try if st else None
    return {
        "name": relay.label, "protocol": relay.protocol, "hosts": list(relay.all_hosts),
        "state": state_of(st, running), "condition": health.condition(st),
        "failing_since": _iso(hist.failing_since if hist else None),
        "failures": hist.failures if hist else 0,
        "probable_refusal": hist.hint if hist else None,
        "last_success": _mark(hist.last_success if hist else None),
        "last_failure": _mark(hist.last_failure if hist else None),
        "last_accepted_round": _iso(hist.accepted_round if hist else None),
        "messages": st.messages.as_dict() if st else Messages().as_dict(),
        "messages_total": st.messages_total.as_dict() if st else Messages().as_dict(),
        "round_start": _iso(st.round_start if st else None),
        "attempts": st.attempts if st else 0,
        "next_try": _iso(nxt), "next_try_in_s": None if nxt is None else round(nxt - now, 1),
        "host": st.host if st else None,
        "args": [_arg(a, hist.args.get(a.arg) if hist else None, st is not None and
                      bool(st.args)) for a in args],
    }


def _arg(arg: ArgStatus, hist: History | None, sent: bool) -> dict[str, Any]:
    return {**arg.as_dict(), "outcome": str(arg.outcome) if sent else "never-sent",
            "when": _iso(arg.when),
            "last_success": _mark(hist.last_success if hist else None),
            "last_failure": _mark(hist.last_failure if hist else None)}


def summary(link_up: bool, relays: Collection[Relay], statuses: Mapping[str, RelayStatus],
            running: Collection[str], links: Sequence[LinkView] = ()) -> str:
    """The one-line STATUS= that `systemctl status etrnd` shows; with more than one link,
    each link's state first (`eth1 up, wwan0 up; fiber: ..., lte: standby`)."""
    parts = []
    standby = {r for link in links for r in link.standby}
    for relay in relays:
        st = statuses.get(relay.label)
        if relay.label in running:
            parts.append(f"{relay.label}: retrying" if st and st.next_try
                         else f"{relay.label}: sending")
        elif st and st.args:
            ok = sum(1 for a in st.args.values() if str(a.outcome) == "accepted")
            mail = (f", {st.messages.relayed} relayed" if relay.protocol == "odmr" else "")
            parts.append(f"{relay.label}: {ok}/{len(st.args)} accepted{mail}")
        elif relay.label in standby:
            parts.append(f"{relay.label}: standby")
        else:
            parts.append(f"{relay.label}: idle")
    if len(links) > 1:
        state = ", ".join(f"{link.name} {'up' if link.up else 'down'}" for link in links)
        return f"{state}; " + ", ".join(parts)
    return f"{'link up' if link_up else 'link down'}; " + ", ".join(parts)


# --- rendering (client side, from the JSON document alone) ---------------------------------


def _wall(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _Clock:
    """Renders the document's times relative to its own `now` (the daemon's clock)."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.now = _wall(status.get("now")) or time.time()

    def at(self, iso: Any) -> str:
        wall = _wall(iso)
        return "-" if wall is None else clock(wall, self.now)

    def ago(self, iso: Any) -> str:
        wall = _wall(iso)
        return "-" if wall is None else f"{clock(wall, self.now)} ({duration(self.now - wall)} ago)"

    def since(self, iso: Any) -> str:
        wall = _wall(iso)
        return "-" if wall is None else f"{clock(wall, self.now)} ({duration(self.now - wall)})"

    def until(self, iso: Any) -> str:
        wall = _wall(iso)
        return "-" if wall is None else f"in {duration(wall - self.now)} ({clock(wall, self.now)})"


def render_link(link: Mapping[str, Any], when: _Clock) -> str:
    """One link's line: state, for how long, transitions since start, why; an entry of
    `links` also says its name and the relays it drives (`lte (only while fiber down:
    standby)`)."""
    since = link.get("since")
    held = f" for {duration(when.now - (_wall(since) or when.now))} (since {when.at(since)})" \
        if since else ""
    changes = link.get("transitions", 0)
    name = f" {link['name']}" if "name" in link else ""
    line = (f"link{name}: {'UP' if link.get('up') else 'DOWN'}{held}, {changes} transition"
            f"{'' if changes == 1 else 's'} since start ({link.get('why') or 'no details'})")
    if "relays" not in link:
        return line
    relays = []
    for relay in link.get("relays", []):
        text = relay.get("name", "?")
        if relay.get("only_when_down"):
            text += (f" (only while {', '.join(relay['only_when_down'])} down: "
                     f"{'standby' if relay.get('standby') else 'active'})")
        relays.append(text)
    return f"{line}; drives {', '.join(relays) or 'no relay'}"


def _mark_text(mark: Mapping[str, Any] | None, when: _Clock) -> str:
    if not mark:
        return "never"
    arg = f" ({mark['arg']})" if mark.get("arg") else ""
    return f"{when.ago(mark.get('when'))}: {mark.get('text', '')}{arg}"


def render(status: dict[str, Any]) -> str:
    """The status document as the lines `etrnd status` prints; docs/status.md shows them."""
    when = _Clock(status)
    lines = []
    verdict = status.get("verdict")
    if verdict:
        lines.append(f"{verdict.get('state', '?')}: {verdict.get('text', '')}")
    tz = time.strftime("%Z", time.localtime(when.now))
    lines.append(f"etrnd {status.get('version', '?')} pid {status.get('pid', '?')}, "
                 f"running since {when.since(status.get('started'))}; times in {tz}")
    reload = status.get("reload")
    loaded = f" (loaded {when.at(status['config_loaded'])})" if status.get(
        "config_loaded") else ""
    lines.append(f"config: {status.get('config', '?')}{loaded}"
                 + (f"; reload FAILED at {when.at(reload.get('at'))}: "
                    f"{'; '.join(reload.get('problems', []))}" if reload else ""))
    check = status.get("health")
    if check:
        lines.append(f"health: {check.get('status')}, {check.get('text', '')}")
    links = status.get("links") or []
    for link in links if len(links) > 1 else [status.get("link") or {}]:
        if link:
            lines.append(render_link(link, when))
        if link.get("not_public"):
            lines.append(f"  WAN not reachable from the ISP: {link['not_public']} "
                         "(ETRN cannot work here; see protocol: odmr)")
    repeat = status.get("repeat") or {}
    every = repeat.get("every_s") or 0
    lines.append(f"rounds: {status.get('rounds_started', 0)} started, last "
                 f"{when.ago(status.get('last_round')) if status.get('last_round') else '-'}; "
                 + (f"repeat every {duration(every)}"
                    + (f", next {when.until(repeat['next'])}" if repeat.get("next") else "")
                    if every else "repeat off"))
    due = status.get("round_due")
    if due:
        lines.append(f"round due in {due.get('in_s', 0):.1f} s ({due.get('reason', '?')})")
    mta = status.get("local_mta")
    if mta:
        lines.append(f"local MTA {mta.get('address')}: {mta.get('state')}"
                     + (f" since {when.since(mta['since'])}" if mta.get("since") else "")
                     + (f" ({mta['error']})" if mta.get("error") else ""))
    state_file = status.get("state_file")
    if state_file and state_file.get("error"):
        lines.append(f"state file: {state_file['error']}")
    for relay in status.get("relays", []):
        lines.extend(_render_relay(relay, when))
    return "\n".join(lines)


def _render_relay(relay: Mapping[str, Any], when: _Clock) -> list[str]:
    nxt = relay.get("next_try")
    lines = [f"relay {relay.get('name')}: {relay.get('state', '?')}"
             + (f", next try {when.until(nxt)}" if nxt else "")
             + f", attempts {relay.get('attempts', 0)}"
             + (f", host {relay['host']}" if relay.get("host") else "")]
    if relay.get("failing_since"):
        failures = relay.get("failures", 0)
        lines.append(f"  FAILING since {when.since(relay['failing_since'])}, {failures} "
                     f"failed tr{'y' if failures == 1 else 'ies'}")
    if relay.get("probable_refusal"):
        lines.append(f"  {relay['probable_refusal']}")
    if "last_success" in relay:
        lines.append(f"  last success: {_mark_text(relay.get('last_success'), when)}")
        lines.append(f"  last failure: {_mark_text(relay.get('last_failure'), when)}")
    if relay.get("protocol") == "odmr":
        m, t = relay.get("messages") or {}, relay.get("messages_total") or {}
        lines.append(f"  messages this round: {m.get('relayed', 0)} relayed, "
                     f"{m.get('refused', 0)} refused, {m.get('deferred', 0)} deferred"
                     + (f"; since start: {t.get('relayed', 0)} relayed, {t.get('refused', 0)} "
                        f"refused, {t.get('deferred', 0)} deferred" if t else ""))
    for arg in relay.get("args", []):
        code, text = arg.get("code"), arg.get("text") or ""
        failure = arg.get("last_failure") or {}
        if code is None and failure.get("text") and arg.get("outcome") != "accepted":
            text = failure["text"]  # the cause in words, not the exception's name
        reason = (f" {code} {text}".rstrip() if code is not None else
                  (f": {text}" if text else ""))
        lines.append(f"  {arg.get('arg')}: {arg.get('outcome', '?')}{reason}"
                     + (f" at {when.at(arg['when'])}" if arg.get("when") else "")
                     + f" (attempts {arg.get('attempts', 0)})")
    return lines
