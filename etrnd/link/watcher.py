"""Link watcher for the daemon: netlink events -> link state -> debounced decisions."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from pydantic import ValidationError

from etrnd.config.schema import ConfigError, Watch, load_config
from etrnd.config.values import parse_duration
from etrnd.link.debounce import Change, Debouncer, DownHold
from etrnd.link.netlink import DEFAULT_RCVBUF, NetlinkSource, RouteReader
from etrnd.link.rtnl import NetlinkError
from etrnd.link.state import DefaultRoutes, LinkState, RouteEvent, Snapshot, Verdict
from etrnd.outputs.logs import configure, get_logger, iso

log = get_logger()

DecisionKind = Literal["up", "down", "round"]
# An RA route is re-read this long after its lifetime ends by our clock: rta_expires is in
# 10 ms ticks and the kernel's own check is "after", so at the instant it may still route.
EXPIRY_SLACK = 0.05
# A route that ran out is polled this often, for at most this long, until the kernel's GC
# deletes it (measured 10.7-13.9 s later; gc_interval is 30 s): an RA in between revives it
# without a message.
REVIVE_POLL = 1.0
REVIVE_FOR = 60.0


@dataclass(frozen=True)
class Decision:
    """`up`/`down`: the link changed (or, with initial=True, its state at start);
    `round`: start an ETRN round now (settle and min_interval already applied)."""

    kind: DecisionKind
    why: str
    iface: str | None
    at: float  # time.monotonic() when decided
    initial: bool = False
    since: float | None = None  # when the change really happened (a held down: its start)


class LinkWatcher:
    """`async with LinkWatcher(cfg.watch) as w: async for d in w.decisions(): ...`

    Entering returns once the initial state is read (subscribe, then dump), so the first
    decision is the state at start: an `up` there is followed by a `round` like any other.
    A down undone within watch.down_hold is a blip (no decision); an RA default route is
    re-read when its lifetime runs out, since the kernel says nothing then.
    """

    def __init__(self, watch: Watch, *, clock: Callable[[], float] = time.monotonic,
                 bpf: bool = True, rcvbuf: int = DEFAULT_RCVBUF,
                 debug_rcvbuf: int | None = None,
                 on_verdict: Callable[[Verdict], None] | None = None) -> None:
        self._clock = clock
        self._on_verdict = on_verdict  # called whenever the "why" changes (STATUS= lines)
        self._state = LinkState(watch.interfaces, watch.up_when, watch.family)
        self._debounce = Debouncer(watch.settle, watch.min_interval)
        self._hold = DownHold(watch.down_hold)
        self._source = NetlinkSource(route_iface=self._state.matches, bpf=bpf, rcvbuf=rcvbuf,
                                     debug_rcvbuf=debug_rcvbuf, clock=clock)
        self._reader = RouteReader(clock)  # re-reads routes whose lifetime ran out
        self._verdict = Verdict(False, "not started")  # the kernel's state, as last read
        self._held_why = ""  # why the link looked down when a held down began
        # A down verdict has no interface of its own: link_down names the one that was up,
        # or (down from the start) the watched names, so every link event says which.
        self._up_iface: str | None = None
        self._watched = ",".join(watch.interfaces) or "*"
        self._queue: asyncio.Queue[Decision | BaseException] = asyncio.Queue()
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # settle / min_interval
        self._hold_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: tuple[float, asyncio.TimerHandle] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        # (index, family) whose RA route ran out: the kernel keeps it until its GC and a
        # late RA revives it without a message, so it is polled until it is deleted.
        self._revive: dict[tuple[int, int], float] = {}
        self.last_event: float | None = None

    # --- public state -------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """The decided state: a down still held (watch.down_hold) is up."""
        return self._hold.up

    @property
    def why(self) -> str:
        return self.verdict.why

    @property
    def verdict(self) -> Verdict:
        """The decided state and why; while a down is held, up through the interface that
        was up, and the why says what is missing and for how long."""
        since = self._hold.holding
        if since is None:
            return self._verdict
        return Verdict(True, f"{self._verdict.why} (for {self._clock() - since:.1f} s; "
                             f"held: a down shorter than {self._hold.hold:g} s is a blip)",
                       self._up_iface)

    def addresses(self, name: str, family: int) -> list[str]:
        """Usable global addresses of an interface (for a session's source address)."""
        return self._state.addresses(name, family)

    @property
    def resyncs(self) -> int:
        """How many times the socket overflowed (or failed) and the state was re-read."""
        return self._source.resyncs

    def round_due(self) -> tuple[float, str] | None:
        """(seconds from now, "settle" | "min_interval") of the link-up round still owed."""
        owed = self._debounce.owed()
        if owed is None:
            return None
        return max(0.0, owed[0] - self._clock()), owed[1]

    def take_pending(self) -> bool:
        """A trigger takes the owed link-up round now (True if one was owed): no `round`
        decision follows for that link-up, so a trigger never means two rounds."""
        if not self._debounce.take_early(self._clock()):
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    def healthy(self) -> bool:
        """For the systemd watchdog: the reader is running and has read the state."""
        return (self._task is not None and not self._task.done()
                and self._ready is not None and self._ready.done())

    def reconfigure(self, watch: Watch) -> None:
        """Apply a reloaded `watch:` section; the debounce history is kept."""
        self._state.patterns = tuple(watch.interfaces)
        self._state.up_when = watch.up_when
        self._state.family = watch.family
        self._debounce.settle = watch.settle
        self._debounce.min_interval = watch.min_interval
        self._hold.hold = watch.down_hold
        self._evaluate()
        self._schedule()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = asyncio.create_task(self._run(), name="etrnd-linkwatch")
        await asyncio.wait([self._ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.done():
            await self._task  # raises why it ended before the state was read
            raise RuntimeError("link watcher stopped before reading the link state")

    async def close(self) -> None:
        for timer in (self._timer, self._hold_timer,
                      self._expiry_timer[1] if self._expiry_timer else None):
            if timer is not None:
                timer.cancel()
        for task in (self._task, self._expiry_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._source.close()
        self._reader.close()

    async def __aenter__(self) -> LinkWatcher:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def decisions(self) -> AsyncIterator[Decision]:
        """Decisions in order; raises if the reader failed for good."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    # --- internals ----------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            async for event in self._source.events():
                self.last_event = self._clock()
                self._state.apply(event)
                if isinstance(event, RouteEvent):
                    # The kernel spoke of this route: no need to poll for a silent revival.
                    for oif in event.oifs:
                        self._revive.pop((oif, event.family), None)
                if isinstance(event, Snapshot) and event.reason != "start":
                    log.info("netlink_resynced", reason=event.reason, up=self._state.verdict().up)
                if self._ready is not None and not self._ready.done():
                    self._verdict = self._state.verdict()
                    self._hold.reset(self._verdict.up)
                    self._emit("up" if self._verdict.up else "down", initial=True)
                    self._arm_expiry()
                    self._ready.set_result(None)
                else:
                    self._evaluate()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("link_watch_failed", error=str(exc) or type(exc).__name__)
            self._queue.put_nowait(exc)
            raise

    def _evaluate(self, *, at_once: bool = False) -> None:
        verdict = self._state.verdict()
        if verdict != self._verdict and self._on_verdict is not None:
            self._on_verdict(verdict)
        if self._hold.up and self._hold.holding is None and not verdict.up:
            self._held_why = verdict.why
        self._verdict = verdict
        self._decide(self._hold.observe(verdict.up, self._clock(), at_once=at_once))
        self._arm_expiry()

    def _decide(self, change: Change | None) -> None:
        if change is not None and change.kind == "blip":
            log.debug("link_blip", iface=self._up_iface or self._watched,
                      duration_ms=round(change.held * 1000, 3), why=self._held_why)
            self._schedule()  # the settle round held back during the hold, if one is owed
        elif change is not None:
            self._emit("up" if change.kind == "up" else "down", since=change.since,
                       held=change.held)
        self._arm_hold()

    def _emit(self, kind: DecisionKind, initial: bool = False, since: float | None = None,
              held: float = 0.0) -> None:
        now = self._clock()
        v = self._verdict
        if v.up:
            self._up_iface = v.iface
        iface = v.iface if v.up else (self._up_iface or self._watched)
        if kind != "round":
            extra: dict[str, object] = {}
            if held > 0:  # acted on after the hold: say when it really began
                extra = {"since": iso(time.time() - (now - (since or now))),
                         "held_ms": round(held * 1000)}
            log.info("link_up" if kind == "up" else "link_down", iface=iface, why=v.why,
                     initial=initial, **extra)
            self._debounce.link(kind == "up", now)
            self._schedule()
        self._queue.put_nowait(Decision(kind, v.why, iface, now, initial,
                                        since if since is not None else now))

    def _arm_hold(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        due = self._hold.deadline()
        if due is not None:
            self._hold_timer = asyncio.get_running_loop().call_later(
                max(0.0, due - self._clock()), self._hold_ends)

    def _hold_ends(self) -> None:
        self._hold_timer = None
        self._decide(self._hold.expire(self._clock()))

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._debounce.due()
        if due is not None:
            delay = max(0.0, due - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._hold.holding is not None:
            return  # decided when the hold ends: a blip schedules it again, a down cancels
        if self._debounce.take_round(self._clock()):
            self._emit("round")
        else:
            self._schedule()

    # --- route lifetimes --------------------------------------------------------------------
    def _arm_expiry(self) -> None:
        """One timer for the next route lifetime to run out (or the next revival poll);
        none at all when no watched route expires, so an idle DHCPv4 link never wakes."""
        nxt = self._state.next_expiry()
        due = [nxt[0] + EXPIRY_SLACK] if nxt is not None else []
        if self._revive:
            due.append(self._clock() + REVIVE_POLL)
        at = min(due) if due else None
        if self._expiry_timer is not None:
            # An earlier timer stays: a revival poll must not be pushed back by every event
            # (an early wake-up re-reads nothing that has not run out, and re-arms).
            if at is not None and self._expiry_timer[0] <= at:
                return
            self._expiry_timer[1].cancel()
            self._expiry_timer = None
        if at is None or (self._expiry_task is not None and not self._expiry_task.done()):
            return  # the running re-read arms the next one
        handle = asyncio.get_running_loop().call_later(max(0.0, at - self._clock()),
                                                       self._expiry_due)
        self._expiry_timer = (at, handle)

    def _expiry_due(self) -> None:
        self._expiry_timer = None
        self._expiry_task = asyncio.create_task(self._reread(), name="etrnd-route-expiry")

    async def _reread(self) -> None:
        """Ask the kernel again for the routes whose lifetime is up: a later RA may have
        moved it (no message either), else the route is gone and the link down at once."""
        now = self._clock()
        keys = self._state.expired(now) | self._revive.keys()
        had = {key for key in keys if self._state.has_route(*key)}
        for index, family in sorted(keys):
            try:
                routes = await self._reader.default_routes(index, family)
            except (OSError, NetlinkError, TimeoutError) as exc:
                log.warning("route_reread_failed", index=index, family=family,
                            error=str(exc) or type(exc).__name__)
                continue  # judged by its lifetime alone below
            self._state.apply(DefaultRoutes(index, family, routes))
        now = self._clock()
        self._state.drop_expired(now)
        for key in keys:
            if self._state.has_route(*key):
                self._revive.pop(key, None)
            else:
                self._revive.setdefault(key, now + REVIVE_FOR)
        self._revive = {k: until for k, until in self._revive.items() if until > now}
        self._expiry_task = None
        # A route that ran out is a down at once (its lifetime was the hold); a poll that
        # changed nothing must not cut short another down's hold.
        self._evaluate(at_once=any(not self._state.has_route(*key) for key in had))


# --- debug entry point: python -m etrnd.link.watcher ---------------------------------------------
def _quote(text: str) -> str:
    return json.dumps(text) if not text or any(c in text for c in ' "=\\') else text


def _line(event: str, mono: float, **fields: object) -> str:
    ts = iso(time.time())
    rest = " ".join(f"{k}={_quote(str(v))}" for k, v in fields.items() if v is not None)
    return f"ts={ts} mono={mono:.6f} event={event} {rest}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m etrnd.link.watcher",
                                description="Print link decisions live (debugging aid).")
    p.add_argument("-c", "--config", help="take watch: from this config file")
    p.add_argument("--interfaces", nargs="*", help="names or globs (none = any interface)")
    p.add_argument("--up-when", choices=["carrier", "address", "default-route"])
    p.add_argument("--family", choices=["ipv4", "ipv6", "any"])
    p.add_argument("--settle", type=parse_duration)
    p.add_argument("--min-interval", type=parse_duration)
    p.add_argument("--down-hold", type=parse_duration)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print every change of the reason, not only up/down")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # Hidden knobs for tests and benchmarks: force overflows.
    p.add_argument("--debug-no-filter", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug-rcvbuf", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _watch_from(args: argparse.Namespace) -> Watch:
    base = load_config(args.config).watch if args.config else Watch()
    overrides = {k: v for k, v in {
        "interfaces": tuple(args.interfaces) if args.interfaces is not None else None,
        "up_when": args.up_when, "family": args.family,
        "settle": args.settle, "min_interval": args.min_interval,
        "down_hold": args.down_hold}.items() if v is not None}
    return Watch.model_validate({**base.model_dump(), **overrides})


async def _print_decisions(watch: Watch, args: argparse.Namespace) -> None:
    def show(v: Verdict) -> None:
        print(_line("state", time.monotonic(), up=str(v.up).lower(), why=v.why), flush=True)

    watcher = LinkWatcher(watch, bpf=not args.debug_no_filter, debug_rcvbuf=args.debug_rcvbuf,
                          on_verdict=show if args.verbose else None)
    async with watcher:
        print(_line("ready", time.monotonic(), state="up" if watcher.up else "down",
                    why=watcher.why), flush=True)
        async for d in watcher.decisions():
            print(_line(d.kind, d.at, iface=d.iface, why=d.why,
                        initial="true" if d.initial else None), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    configure(args.log_level, "console", sys.stdout)
    try:
        watch = _watch_from(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"etrnd.link.watcher: {problem}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            where = ".".join(map(str, err["loc"]))
            print(f"etrnd.link.watcher: {where}: {err['msg']}", file=sys.stderr)
        return 2

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await _print_decisions(watch, args)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
