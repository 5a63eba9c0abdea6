"""What `etrnd status` and systemd's STATUS= say: built from the daemon's state, rendered."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etrnd import __version__
from etrnd.config.schema import Config, Relay
from etrnd.outputs import logs
from etrnd.protocols.seam import Messages
from etrnd.service.rounds import ArgStatus, RelayStatus


def _iso(wall: float | None) -> str | None:
    return None if wall is None else logs.iso(wall)


@dataclass(frozen=True)
class DaemonView:
    """The daemon facts a status needs; wall-clock times in seconds since the epoch."""

    path: Path
    config: Config
    started: float
    link_up: bool
    link_why: str
    link_since: float | None
    rounds_started: int
    last_round: float | None
    tasks: int  # asyncio tasks alive: soak tests watch that it does not grow
    statuses: Mapping[str, RelayStatus]
    running: Collection[str]  # relays with a round task
    # The link-up round still owed: (seconds from now, "settle" | "min_interval").
    round_due: tuple[float, str] | None = None
    # Why the ISP cannot connect back to the up WAN (ETRN relays only), or None.
    wan_not_public: str | None = None


def build(view: DaemonView) -> dict[str, Any]:
    """The status document the control socket returns (`etrnd status --json`)."""
    config = view.config
    return {
        "version": __version__, "pid": os.getpid(), "started": _iso(view.started),
        "config": str(view.path),
        "link": {"up": view.link_up, "why": view.link_why, "since": _iso(view.link_since),
                 "watching": list(config.watch.interfaces) or ["*"],
                 "up_when": config.watch.up_when, "not_public": view.wan_not_public},
        "rounds_started": view.rounds_started, "last_round": _iso(view.last_round),
        "round_due": None if view.round_due is None else {
            "in_s": round(view.round_due[0], 1), "reason": view.round_due[1]},
        "tasks": view.tasks,
        "relays": [relay_status(r, view.statuses.get(r.label), r.label in view.running)
                   for r in config.relays],
    }


def relay_status(relay: Relay, st: RelayStatus | None, running: bool) -> dict[str, Any]:
    """One relay's entry: state (idle/running/waiting), the round so far, each argument.

    `messages` counts what came over the relay's own connection in the (last) round: ODMR's
    relayed/refused/deferred; always zero for ETRN, whose mail arrives on its own.
    """
    state = ("waiting" if st and st.next_try else "running") if running else "idle"
    args = list(st.args.values()) if st else [ArgStatus(a) for a in relay.etrn]
    return {
        "name": relay.label, "protocol": relay.protocol, "hosts": list(relay.all_hosts),
        "state": state, "messages": st.messages.as_dict() if st else Messages().as_dict(),
        "round_start": _iso(st.round_start if st else None),
        "attempts": st.attempts if st else 0,
        "next_try": _iso(st.next_try if st else None), "host": st.host if st else None,
        "args": [{**a.as_dict(), "outcome": str(a.outcome) if st else "never-sent",
                  "when": _iso(a.when)} for a in args],
    }


def summary(link_up: bool, relays: Collection[Relay], statuses: Mapping[str, RelayStatus],
            running: Collection[str]) -> str:
    """The one-line STATUS= that `systemctl status etrnd` shows."""
    parts = []
    for relay in relays:
        st = statuses.get(relay.label)
        if relay.label in running:
            parts.append(f"{relay.label}: retrying" if st and st.next_try
                         else f"{relay.label}: sending")
        elif st and st.args:
            ok = sum(1 for a in st.args.values() if str(a.outcome) == "accepted")
            mail = (f", {st.messages.relayed} relayed" if relay.protocol == "odmr" else "")
            parts.append(f"{relay.label}: {ok}/{len(st.args)} accepted{mail}")
        else:
            parts.append(f"{relay.label}: idle")
    return f"{'link up' if link_up else 'link down'}; " + ", ".join(parts)


def render(status: dict[str, Any]) -> str:
    """The status document as the lines `etrnd status` prints."""
    link = status.get("link", {})
    lines = [
        f"etrnd {status.get('version', '?')} pid {status.get('pid', '?')}, "
        f"running since {status.get('started', '?')}",
        f"link: {'UP' if link.get('up') else 'DOWN'} since {link.get('since') or '-'}"
        f" ({link.get('why') or 'no details'})",
        f"rounds started: {status.get('rounds_started', 0)}, "
        f"last {status.get('last_round') or '-'}",
    ]
    if link.get("not_public"):
        lines.append(f"  WAN not reachable from the ISP: {link['not_public']} "
                     "(ETRN cannot work here; see protocol: odmr)")
    due = status.get("round_due")
    if due:
        lines.append(f"round due in {due.get('in_s', 0):.1f} s ({due.get('reason', '?')})")
    mta = status.get("local_mta")
    if mta:
        lines.append(f"local MTA {mta.get('address')}: {mta.get('state')}"
                     + (f" since {mta['since']}" if mta.get("since") else "")
                     + (f" ({mta['error']})" if mta.get("error") else ""))
    for relay in status.get("relays", []):
        nxt = relay.get("next_try")
        lines.append(
            f"relay {relay.get('name')}: {relay.get('state', '?')}"
            f", attempts {relay.get('attempts', 0)}"
            + (f", next try {nxt}" if nxt else "")
            + (f", host {relay['host']}" if relay.get("host") else "")
        )
        if relay.get("protocol") == "odmr":
            m = relay.get("messages") or {}
            lines.append(f"  messages this round: {m.get('relayed', 0)} relayed, "
                         f"{m.get('refused', 0)} refused, {m.get('deferred', 0)} deferred")
        for arg in relay.get("args", []):
            code = arg.get("code")
            lines.append(
                f"  {arg.get('arg')}: {arg.get('outcome', '?')}"
                + (f" {code} {arg.get('text', '')}".rstrip() if code is not None else "")
                + (f" at {arg['when']}" if arg.get("when") else "")
                + f" (attempts {arg.get('attempts', 0)})"
            )
    return "\n".join(lines)
