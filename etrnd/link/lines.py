"""Pure per-relay links: which relays each link drives, failover between links, round timing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from etrnd.link.debounce import Debouncer, DownHold
from etrnd.link.state import Family, UpWhen, Verdict

if TYPE_CHECKING:
    from etrnd.config.model import Config, Watch


# --- the plan: what the config asks for ---------------------------------------------------

@dataclass(frozen=True)
class LinkSpec:
    """One link: what makes it up. Relays whose watches agree on these share it (and its
    state); settle and min_interval are their rounds' business, not the link's."""

    name: str  # the interfaces as written ("*" for any), made unique: "eth1", "eth1#2"
    interfaces: tuple[str, ...]
    up_when: UpWhen
    family: Family
    down_hold: float


@dataclass(frozen=True)
class GroupSpec:
    """Relays that start, retry and cancel their rounds together: same link, same round
    timing, same failover condition."""

    link: str
    relays: tuple[str, ...]
    settle: float
    min_interval: float
    # Failover: the relays named in only_when_down, and the links that must all be down.
    only_when_down: tuple[str, ...] = ()
    primaries: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    links: tuple[LinkSpec, ...]
    groups: tuple[GroupSpec, ...]

    def link(self, name: str) -> LinkSpec:
        return next(s for s in self.links if s.name == name)

    def group_of(self, relay: str) -> GroupSpec | None:
        return next((g for g in self.groups if relay in g.relays), None)

    def link_of(self, relay: str) -> LinkSpec | None:
        group = self.group_of(relay)
        return None if group is None else self.link(group.link)

    def drives(self, link: str) -> tuple[str, ...]:
        """The relays a link drives, in config order."""
        return tuple(r for g in self.groups if g.link == link for r in g.relays)


def _link_key(watch: Watch) -> tuple[object, ...]:
    return (watch.interfaces, watch.up_when, watch.family, watch.down_hold)


def plan(config: Config) -> Plan:
    """The links and round groups of a (validated) config; one link and one group when no
    relay has a watch of its own."""
    links: dict[tuple[object, ...], LinkSpec] = {}
    link_of: dict[str, LinkSpec] = {}
    for relay in config.relays:
        watch = config.watch_of(relay)
        key = _link_key(watch)
        if key not in links:
            base = ",".join(watch.interfaces) or "*"
            taken = {s.name for s in links.values()}
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}#{n}"
            links[key] = LinkSpec(name, watch.interfaces, watch.up_when, watch.family,
                                  watch.down_hold)
        link_of[relay.label] = links[key]
    groups: dict[GroupSpec, list[str]] = {}  # keyed by the spec without its relays
    for relay in config.relays:
        watch = config.watch_of(relay)
        names = relay.watch.only_when_down if relay.watch is not None else ()
        primaries = tuple(sorted({link_of[n].name for n in names if n in link_of}))
        group = GroupSpec(link_of[relay.label].name, (), watch.settle, watch.min_interval,
                          names, primaries)
        groups.setdefault(group, []).append(relay.label)
    return Plan(tuple(links.values()),
                tuple(replace(k, relays=tuple(v)) for k, v in groups.items()))


def single(watch: Watch) -> Plan:
    """The plan of one watch and no relays (the `python -m etrnd.link.watcher` debugging aid)."""
    name = ",".join(watch.interfaces) or "*"
    return Plan((LinkSpec(name, watch.interfaces, watch.up_when, watch.family,
                          watch.down_hold),),
                (GroupSpec(name, (), watch.settle, watch.min_interval),))


# --- the decisions: pure, with the clock passed in ---------------------------------------------

@dataclass(frozen=True)
class LinkChange:
    """A link's decided state changed: `up`, `down` (after the hold, dated from `since`), or
    `blip` (a down undone within the hold: nothing else happens)."""

    link: str
    kind: Literal["up", "down", "blip"]
    since: float
    held: float
    verdict: Verdict
    iface: str | None  # the interface that is up, or (down) the one that was, or the names
    initial: bool = False
    why: str = ""  # the kernel's reason; of a blip, why the link looked down


@dataclass(frozen=True)
class GateChange:
    """A backup's failover gate opened (every link it stands in for is down) or closed."""

    link: str
    relays: tuple[str, ...]
    open: bool
    why: str  # "fiber's link eth1 is down"
    initial: bool = False


@dataclass(frozen=True)
class GroupDecision:
    """For the daemon: the group's relays may now run (`up`), may not (`down`: cancel their
    rounds), or their round is due (`round`).

    `reason` says why: "link_up"/"link_down" for the group's own link; "failover" when a
    link it backs up went down, "standby" when one came back; a round carries its up's.
    """

    kind: Literal["up", "down", "round"]
    link: str
    relays: tuple[str, ...]
    why: str
    iface: str | None
    at: float
    initial: bool = False
    reason: str = "link_up"


Output = LinkChange | GateChange | GroupDecision


@dataclass
class _Link:
    spec: LinkSpec
    hold: DownHold
    verdict: Verdict = field(default_factory=lambda: Verdict(False, "not started"))
    since: float | None = None  # when the decided state began
    up_iface: str | None = None  # the interface that was up last (a down names it)
    held_why: str = ""  # why the link looked down when the held down began


@dataclass
class _Group:
    spec: GroupSpec
    debounce: Debouncer
    own_up: bool = False
    gate_open: bool = True
    reason: str = "link_up"
    since: float | None = None  # when the group last came up (None while down)

    @property
    def up(self) -> bool:
        return self.own_up and self.gate_open


class Lines:
    """Every link's decided state (down-hold) and every group's (its link and failover
    gate, settle, min_interval). Feed it raw verdicts and the time; it says what changed.

    A link is up at once and down only after its down_hold; a group is up while its link
    is and every link it backs up is down; a group's round is due `settle` after it came up
    and never within `min_interval` of its last round.
    """

    def __init__(self, spec: Plan) -> None:
        self.plan = spec
        self._links = {s.name: _Link(s, DownHold(s.down_hold)) for s in spec.links}
        self._groups = [_Group(g, Debouncer(g.settle, g.min_interval)) for g in spec.groups]

    # --- what is known ---------------------------------------------------------------------
    def link_up(self, link: str) -> bool:
        return self._links[link].hold.up

    def verdict(self, link: str, now: float) -> Verdict:
        """The decided state and why: while a down is held, up through the interface that
        was up, and the why says what is missing and for how long."""
        ln = self._links[link]
        since = ln.hold.holding
        if since is None:
            return ln.verdict
        return Verdict(True, f"{ln.verdict.why} (for {now - since:.1f} s; held: a down "
                             f"shorter than {ln.hold.hold:g} s is a blip)", ln.up_iface)

    def since(self, link: str) -> float | None:
        return self._links[link].since

    def holding(self, link: str) -> float | None:
        """When a down being held began (clock time), or None."""
        return self._links[link].hold.holding

    def group(self, relay: str) -> GroupSpec | None:
        return self.plan.group_of(relay)

    def may_run(self, relay: str) -> bool:
        """The relay's link is up and no link it backs up is."""
        return any(g.up for g in self._groups if relay in g.spec.relays)

    def may_run_since(self, relay: str) -> float | None:
        """Since when the relay may run (its link up, and for a backup the line it stands in
        for down), or None while it may not."""
        return next((g.since for g in self._groups if relay in g.spec.relays and g.up), None)

    def standby(self, relay: str) -> bool:
        """A backup held back because a link it stands in for is up."""
        return any(not g.gate_open for g in self._groups if relay in g.spec.relays)

    def owed(self, relay: str, now: float) -> tuple[float, str] | None:
        """(seconds from now, "settle" | "min_interval") of the relay's owed round."""
        for g in self._groups:
            if relay in g.spec.relays and (owed := g.debounce.owed()) is not None:
                return max(0.0, owed[0] - now), owed[1]
        return None

    def take_early(self, relays: Iterable[str], now: float) -> bool:
        """A trigger takes the owed round of each group whose relays are all in `relays`."""
        wanted, took = set(relays), False
        for g in self._groups:
            if g.spec.relays and set(g.spec.relays) <= wanted:
                took = g.debounce.take_early(now) or took
        return took

    def next_due(self) -> float | None:
        """When `tick` has something to decide (a held down ends, a round is due)."""
        times = [t for t in (*(ln.hold.deadline() for ln in self._links.values()),
                             *(g.debounce.due() for g in self._groups if not self._held(g)))
                 if t is not None]
        return min(times, default=None)

    # --- transitions --------------------------------------------------------------------------
    def start(self, verdicts: Mapping[str, Verdict], now: float) -> list[Output]:
        """The state at start: nothing held, each group up or down (initial)."""
        out: list[Output] = []
        for name, link in self._links.items():
            v = verdicts[name]
            link.verdict, link.since = v, now
            link.hold.reset(v.up)
            link.up_iface = v.iface if v.up else None
            out.append(LinkChange(name, "up" if v.up else "down", now, 0.0, v,
                                  self._iface(link), initial=True, why=v.why))
        for g in self._groups:
            g.own_up, g.gate_open = self._own(g), self._gate(g)
            g.debounce.link(g.up, now)
            g.since = now if g.up else None
            if g.spec.primaries:
                out.append(GateChange(g.spec.link, g.spec.relays, g.gate_open,
                                      self._gate_text(g), initial=True))
            g.reason = "link_up" if g.up else ("standby" if not g.gate_open else "link_down")
            out.append(self._decision(g, "up" if g.up else "down", now, initial=True))
        return out

    def observe(self, verdicts: Mapping[str, Verdict], now: float,
                at_once: Iterable[str] = ()) -> list[Output]:
        """New raw verdicts (after any netlink event). `at_once`: links whose down skips the
        hold (an expired router lifetime was the hold)."""
        out: list[Output] = []
        quick = set(at_once)
        for name, link in self._links.items():
            v = verdicts.get(name, link.verdict)
            link.verdict = v
            if v.up:
                link.up_iface = v.iface
            elif link.hold.up and link.hold.holding is None:
                link.held_why = v.why
            change = link.hold.observe(v.up, now, at_once=name in quick)
            if change is not None:
                out.append(self._link_change(link, change.kind, change.since, change.held, now))
        return out + self._regroup(now)

    def tick(self, now: float) -> list[Output]:
        """Timers: held downs that ran out, then rounds that are due."""
        out: list[Output] = []
        for link in self._links.values():
            change = link.hold.expire(now)
            if change is not None:
                out.append(self._link_change(link, change.kind, change.since, change.held, now))
        out += self._regroup(now)
        for g in self._groups:
            # A round due while the link's down is held waits for the hold to end: a blip
            # lets it go then, a down cancels it.
            if not self._held(g) and g.debounce.take_round(now):
                out.append(self._decision(g, "round", now))
        return out

    def reconfigure(self, spec: Plan, verdicts: Mapping[str, Verdict],
                    now: float) -> list[Output]:
        """A reloaded config: links and groups that go on keep their state and history (a
        group goes on when it keeps its first relay); new ones start as they are, owing no
        round; then what changed is decided as usual."""
        old_links, old_groups = self._links, self._groups
        self.plan = spec
        self._links = {}
        for s in spec.links:
            prev = next((ln for ln in old_links.values() if ln.spec.name == s.name), None)
            if prev is not None:
                prev.spec = s
                prev.hold.hold = s.down_hold
                self._links[s.name] = prev
            else:
                v = verdicts[s.name]
                link = _Link(s, DownHold(s.down_hold, v.up), v, now, v.iface if v.up else None)
                self._links[s.name] = link
        self._groups = []
        for g in spec.groups:
            prev_g = next((o for o in old_groups if g.relays and o.spec.relays
                           and o.spec.relays[0] == g.relays[0]), None)
            if prev_g is None:
                new = _Group(g, Debouncer(g.settle, g.min_interval))
                new.own_up, new.gate_open = self._own(new), self._gate(new)
                new.since = now if new.up else None
                self._groups.append(new)
                continue
            prev_g.spec = g
            prev_g.debounce.settle, prev_g.debounce.min_interval = g.settle, g.min_interval
            self._groups.append(prev_g)
        return self.observe(verdicts, now)

    # --- internals ----------------------------------------------------------------------------
    def _held(self, g: _Group) -> bool:
        return self._links[g.spec.link].hold.holding is not None

    def _own(self, g: _Group) -> bool:
        return self._links[g.spec.link].hold.up

    def _gate(self, g: _Group) -> bool:
        return not any(self._links[p].hold.up for p in g.spec.primaries)

    def _gate_text(self, g: _Group) -> str:
        up = [p for p in g.spec.primaries if self._links[p].hold.up]
        who = ", ".join(g.spec.only_when_down)
        if up:
            return f"{who}'s link {', '.join(up)} is up"
        return f"{who}'s link {', '.join(g.spec.primaries)} is down"

    def _link_change(self, link: _Link, kind: Literal["up", "down", "blip"], since: float,
                     held: float, now: float) -> LinkChange:
        if kind != "blip":
            link.since = since
        why = link.held_why if kind == "blip" else link.verdict.why
        return LinkChange(link.spec.name, kind, since, held, link.verdict, self._iface(link),
                          why=why)

    @staticmethod
    def _iface(link: _Link) -> str | None:
        # A down verdict has no interface of its own: name the one that was up, or (down
        # from the start) the watched names, so that every link event says which.
        v = link.verdict
        return v.iface if v.up else (link.up_iface or ",".join(link.spec.interfaces) or "*")

    def _regroup(self, now: float) -> list[Output]:
        out: list[Output] = []
        for g in self._groups:
            was, was_gate = g.up, g.gate_open
            g.own_up, g.gate_open = self._own(g), self._gate(g)
            if g.gate_open != was_gate:
                out.append(GateChange(g.spec.link, g.spec.relays, g.gate_open,
                                      self._gate_text(g)))
            if g.up == was:
                continue
            by_gate = g.gate_open != was_gate
            if g.up:
                g.reason = "failover" if by_gate else "link_up"
            else:
                g.reason = "standby" if by_gate and not g.gate_open else "link_down"
            g.debounce.link(g.up, now)
            g.since = now if g.up else None
            out.append(self._decision(g, "up" if g.up else "down", now))
        return out

    def _decision(self, g: _Group, kind: Literal["up", "down", "round"], now: float, *,
                  initial: bool = False) -> GroupDecision:
        link = self._links[g.spec.link]
        return GroupDecision(kind, g.spec.link, g.spec.relays, link.verdict.why,
                             self._iface(link), now, initial, g.reason)
