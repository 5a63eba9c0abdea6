"""`etrnd run`: link decisions start ETRN rounds; signals, control socket and systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import Any

from etrnd import __version__
from etrnd.config.preflight import EXIT_CONFIG, load_or_report, warn_secrets
from etrnd.config.schema import Config, ConfigError, Relay, load_config, resolve_path
from etrnd.link import egress
from etrnd.link.lines import LinkChange, plan
from etrnd.link.state import not_public
from etrnd.link.watcher import Decision, LinkWatcher
from etrnd.loop import offloop
from etrnd.loop.stall import Stall, StallDetector
from etrnd.outputs import logs, metrics, statefile
from etrnd.outputs import status as status_doc
from etrnd.outputs.logs import get_logger
from etrnd.outputs.sdnotify import Notifier
from etrnd.protocols import smtp
from etrnd.protocols.odmr.hangup import STOP_DRAIN
from etrnd.protocols.seam import STANDBY
from etrnd.service.control import ControlError, ControlServer
from etrnd.service.history import RelayHistory
from etrnd.service.mtagate import Gate
from etrnd.service.rounds import RelayStatus, RoundResult, run_round

log = get_logger()
ROUND_STARTED = "round started"

# SIGTERM must end the process within a second even mid-session: QUIT gets this long.
STOP_GRACE = 0.7
# ... except when a provider is still sending over an ODMR turnaround: that connection is
# hung up (421, FIN) and drained for up to hangup.STOP_DRAIN, since closing it with data
# coming would reset the provider mid-DATA (see docs/odmr.md). Below TimeoutStopSec=30s.
STOP_LIMIT = STOP_DRAIN + STOP_GRACE
# ... and a supervisor that does not read its notify socket gets this long for STOPPING=1.
STOP_NOTIFY_DRAIN = 0.2
# Reading the config (and the secrets it names) at reload runs off the loop; a file system
# that hangs (a dead NFS server) fails the reload after this long, keeping the old config.
RELOAD_READ_TIMEOUT = 10.0
# The state file's last write at stop, inside STOP_GRACE.
STATE_SAVE_AT_STOP = 0.3
# STATUS= is a line for humans: the changes of this long (a link-up, its round) make one.
PUBLISH_DELAY = 0.01


class Daemon:
    """Owns the watcher, one round task per relay at most, and the outside interfaces."""

    def __init__(self, path: Path, config: Config, notifier: Notifier | None = None,
                 stalls: StallDetector | None = None, state_path: Path | None = None,
                 histories: dict[str, RelayHistory] | None = None) -> None:
        self.path = path
        self.config = config
        self.config_loaded = time.time()
        self.reload_failed: tuple[float, list[str]] | None = None
        self.link_transitions: dict[str, int] = {}  # link name -> up/down changes since start
        self.repeat_next: float | None = None
        self.notifier = notifier or Notifier()
        self.stalls = stalls or StallDetector(sample=False)
        self.stalls.on_stall = self.on_stall
        self.started = time.time()
        self.rounds_started = 0
        self.last_round: float | None = None
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._wake: dict[str, asyncio.Event] = {}
        # Each relay's live status; its history comes back from the state file.
        self._status: dict[str, RelayStatus] = {
            name: RelayStatus(name, history=history) for name, history in (histories or {}).items()}
        self.state = statefile.StateFile(state_path, self._histories)
        self._watcher: LinkWatcher | None = None
        self._control: ControlServer | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._repeat: asyncio.Task[None] | None = None
        # Relays a trigger already served while a link-up round was owed (settle, or
        # min_interval): that round, when it comes, leaves them out.
        self._served_early: set[str] = set()
        # Backups whose round ends after the session in progress (standby, see cancel_rounds).
        self._finishing: set[str] = set()
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._publish_timer: asyncio.TimerHandle | None = None
        self._gate: Gate | None = None
        self._router = egress.Router()  # route look-ups before sessions, one socket kept
        # The FQDN lookup (EHLO without `helo:`) waits for a link that is up: see _warm_up.
        self._helo_owed = any(r.helo is None for r in config.relays)
        self._set_gate(config)

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        log.info("daemon_start", version=__version__, pid=os.getpid(), config=str(self.path))
        warn_secrets(self.config)
        # Before anything slow: a SIGTERM during start-up must still end in a clean exit 0.
        for sig, handler in (
            (signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set),
            (signal.SIGHUP, self.request_reload),
            (signal.SIGUSR1, lambda: self.trigger(None, "SIGUSR1")),
        ):
            loop.add_signal_handler(sig, handler)
        loop.set_default_executor(offloop.ThreadPerCall())
        self._warm_up()
        self._control = ControlServer(self.config.control.socket, self.handle_request)
        await self._control.start()
        # link_up: the watcher starts after this, and tells.
        await metrics.serve(self.config, link_up=False, last_success=self._last_successes)
        try:
            self._watcher = LinkWatcher(plan(self.config), on_verdict=lambda _: self._publish(),
                                        on_link=self._on_link)
            await self._watcher.start()
            await self._router.warm()
            if self._watcher.up:
                self._resolve_helo_once()
            watch = self._spawn(self._follow_link(self._watcher))
            self._spawn(self._watchdog())
            self._restart_repeat()
            self.notifier.ready(self.summary())
            log.info("daemon_ready", link="up" if self._watcher.up else "down",
                     why=self._watcher.why, relays=[r.label for r in self.config.relays])
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stop, watch], return_when=asyncio.FIRST_COMPLETED)
            failed = watch.done() and not watch.cancelled() and watch.exception() is not None
            return 1 if failed else 0
        finally:
            await self._shutdown()

    def _warm_up(self) -> None:
        """Load the trust stores TLS relays need now, off the loop, so that no link-up ever
        waits on them. The machine's FQDN is looked up once a link is up (_resolve_helo_once):
        DNS queries sent into a WAN without carrier leave the next hop's ARP entry
        INCOMPLETE, and the first SYN after the line comes back then waits in that entry's
        queue for the kernel's next probe (retrans_time_ms, 1 s) instead of leaving at once."""
        for verify in {r.verify for r in self.config.relays if r.tls != "none"}:
            self._spawn(self._load_trust(verify))

    def _resolve_helo_once(self) -> None:
        """Start the FQDN lookup, off the loop, the first time a link is up; sessions use the
        host name until it answers (smtp.helo_name), so a round never waits on DNS."""
        if self._helo_owed:
            self._helo_owed = False
            self._spawn(self._resolve_helo())

    async def _resolve_helo(self) -> None:
        await smtp.resolve_helo()

    async def _load_trust(self, verify: bool) -> None:
        with contextlib.suppress(Exception):  # a session that needs it will try and say why
            await smtp.tls_context_off_loop(verify)

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE
        self.notifier.stopping()
        log.info("daemon_stop")
        rounds = [*self._tasks.values(), *self._closing]
        for task in [*rounds, *self._background]:
            task.cancel()
        if rounds:
            # Rounds close their sessions on cancel (QUIT within STOP_GRACE, an ODMR hang-up
            # within its drain): wait for them, never past STOP_LIMIT.
            await asyncio.wait(rounds, timeout=STOP_LIMIT)
        if self._watcher is not None:
            await self._watcher.close()
        if self._control is not None:
            await self._control.close()
        await metrics.close()
        await self.state.close(max(0.05, min(STATE_SAVE_AT_STOP, deadline - loop.time())))
        # STOPPING=1 to a supervisor that is not reading: a short try, within the grace.
        await self.notifier.drain(min(STOP_NOTIFY_DRAIN, max(0.05, deadline - loop.time())))
        self._router.close()
        if self._publish_timer is not None:
            self._publish_timer.cancel()
        self.notifier.close()

    def on_stall(self, stall: Stall) -> None:
        # `where`: the loop thread's innermost frames while it was stuck, when sampled.
        metrics.stall()
        where = {"where": stall.where} if stall.where else {}
        log.warning("event_loop_stalled", duration_ms=round(stall.duration * 1000, 1),
                    threshold_ms=round(self.stalls.threshold * 1000), **where)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _follow_link(self, watcher: LinkWatcher) -> None:
        try:
            async for decision in watcher.decisions():
                self.on_decision(decision)
        except Exception as exc:
            log.error("daemon_fatal", reason="link watcher failed", error=str(exc))
            raise

    def _on_link(self, change: LinkChange) -> None:
        """A link's decided state changed (not a blip): count it, tell the metrics."""
        if not change.initial and change.kind != "blip":
            self.link_transitions[change.link] = self.link_transitions.get(change.link, 0) + 1
        drives = self._watcher.plan.drives(change.link) if self._watcher is not None else ()
        metrics.link(change.kind, change.since, change.initial, change.link, drives)

    def on_decision(self, decision: Decision) -> None:
        """A link decision for the relays it names (etrnd.link.lines: their link, failover);
        one that names none concerns every relay."""
        relays = set(decision.relays) or {r.label for r in self.config.relays}
        if decision.kind == "up":
            self._finishing -= relays  # may run again: a round still on retries as usual
            self._resolve_helo_once()
            self._warn_not_public(decision.iface, relays)
        elif decision.kind == "down":
            self._served_early -= relays
            # link_down or standby (seam.LINK_DOWN, STANDBY): an ODMR transfer in progress
            # goes on (its line may return; a backup's own line is still up).
            self.cancel_rounds(decision.reason, only=relays)
        else:
            served = self._served_early & relays
            self._served_early -= relays
            self.start_rounds(None, decision.reason, skip=served, among=relays)
        self._publish()

    def wan_not_public(self, iface: str | None) -> str | None:
        """Why the ISP cannot connect back to `iface` (CGNAT, RFC 1918), or None."""
        watcher = self._watcher
        if watcher is None or iface is None:
            return None
        return not_public(watcher.addresses(iface, socket.AF_INET),
                          watcher.addresses(iface, socket.AF_INET6))

    def _warn_not_public(self, iface: str | None, relays: Collection[str]) -> None:
        """Once per link-up: ETRN asks the ISP to connect to us, which it cannot here."""
        reason = self.wan_not_public(iface)
        if reason is None:
            return
        for relay in self.config.relays:
            if relay.protocol == "etrn" and relay.label in relays:
                log.warning("etrn_wan_not_public", relay=relay.label, iface=iface,
                            reason=reason, hint="the ISP cannot connect to this line to "
                            "deliver; ODMR (protocol: odmr) collects mail over our own "
                            "connection")

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        seen = self.stalls.stalls
        while True:
            # Only a live loop runs this; only a live netlink reader earns the ping, and not
            # right after a stall: the late wake-up must not vouch for the blocked period.
            if (self._watcher is not None and self._watcher.healthy()
                    and self.stalls.stalls == seen):
                self.notifier.watchdog()
            seen = self.stalls.stalls
            await asyncio.sleep(interval)

    def _restart_repeat(self) -> None:
        if self._repeat is not None:
            self._repeat.cancel()
            self._repeat = None
            self.repeat_next = None
        if self.config.repeat > 0:
            self._repeat = self._spawn(self._repeat_rounds(self.config.repeat))

    async def _repeat_rounds(self, every: float) -> None:
        while True:
            self.repeat_next = time.time() + every
            await asyncio.sleep(every)
            watcher = self._watcher
            if watcher is not None:
                running = {r.label for r in self.config.relays if watcher.may_run(r.label)}
                if running:
                    self.start_rounds(None, "repeat", among=running)

    # --- rounds ----------------------------------------------------------------------------
    def start_rounds(self, only: str | None, reason: str, skip: Collection[str] = (),
                     among: Collection[str] | None = None) -> list[str]:
        """Start a round on each relay (or one, or those `among`) that has none running;
        returns their names."""
        return [name for name, what in self.rounds_for(only, reason, skip, among).items()
                if what == ROUND_STARTED]

    def rounds_for(self, only: str | None, reason: str, skip: Collection[str] = (),
                   among: Collection[str] | None = None) -> dict[str, str]:
        """Like start_rounds; returns what happened to each relay, in words for `trigger`."""
        started: list[str] = []
        done: dict[str, str] = {}
        for relay in self.config.relays:
            if ((only is not None and relay.label != only) or relay.label in skip
                    or (among is not None and relay.label not in among)):
                continue
            running = self._tasks.get(relay.label)
            if running is not None:
                # A round is already on it: a trigger cuts its backoff short, nothing queues.
                st = self._status.get(relay.label)
                if self._gate is not None and relay.label in self._gate.waiting:
                    done[relay.label] = (f"round waiting for the local MTA "
                                         f"{self._gate.target}")
                elif st is not None and st.next_try is not None:
                    done[relay.label] = "retrying now (was in backoff)"
                else:
                    done[relay.label] = "round already in progress"
                if reason not in ("link_up", "failover", "repeat"):
                    self._wake[relay.label].set()
                log.info("round_busy", relay=relay.label, reason=reason)
                continue
            done[relay.label] = ROUND_STARTED
            started.append(relay.label)
            self._wake.setdefault(relay.label, asyncio.Event()).clear()
            self._tasks[relay.label] = asyncio.create_task(
                self._round(relay, reason), name=f"etrnd-round-{relay.label}")
        if started:
            self.rounds_started += 1
            self.last_round = time.time()
        return done

    async def _round(self, relay: Relay, reason: str) -> None:
        status = self._status.setdefault(relay.label, RelayStatus(relay.label))
        wake = self._wake[relay.label]
        ended: RoundResult | str = "cancelled"  # for metrics: what became of the round

        async def sleep(delay: float) -> None:
            self.state.changed()  # the failed attempt is worth keeping across a restart
            if relay.label in self._finishing:  # standby: no retry after that session
                raise asyncio.CancelledError(STANDBY)
            # Backoff that `etrnd trigger` or SIGUSR1 can cut short. asyncio.timeout, not
            # wait_for: in 3.11 wait_for can swallow the cancel a link-down sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()

        try:
            metrics.round_started(relay.label, reason)
            if self._gate is not None:
                await self._hold(relay)  # False when the wait ran out: the round goes ahead
            log.info("round_start", relay=relay.label, reason=reason, args=list(relay.etrn))
            with egress.expecting(self._expected(relay.label)):
                ended = await run_round(relay, self.config.retry, None, status, sleep=sleep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must cost one relay one round, not the daemon
            ended = "crashed"
            log.error("round_crashed", relay=relay.label, error=type(exc).__name__,
                      text=str(exc)[:300])
        finally:
            metrics.round_ended(relay.label, ended)
            if self._tasks.get(relay.label) is asyncio.current_task():
                del self._tasks[relay.label]
                self._finishing.discard(relay.label)
            self.state.changed()
            self._publish()

    async def _hold(self, relay: Relay) -> bool:
        """Wait for the office MTA's 220 (config local_mta), shared by all relays' rounds."""
        assert self._gate is not None
        self._publish()
        try:
            return await self._gate.ready(relay.label)
        finally:
            self._publish()

    def _set_gate(self, config: Config) -> None:
        mta = config.local_mta
        if mta is None:
            self._gate = None
        elif self._gate is None or (self._gate.target, self._gate.max_wait) != (mta.address,
                                                                                 mta.max_wait):
            self._gate = Gate(mta.address, mta.max_wait)

    def _expected(self, relay: str) -> egress.Expected:
        """The relay's own link: the interface its route must leave through."""
        watcher = self._watcher

        def iface() -> str | None:
            verdict = watcher.verdict_of(relay) if watcher is not None else None
            return verdict.iface if verdict is not None else None

        return egress.Expected(
            iface=iface,
            patterns=(watcher.interfaces_of(relay) if watcher is not None
                      else tuple(self.config.watch.interfaces)),
            addresses=watcher.addresses if watcher is not None else lambda _n, _f: [],
            router=self._router)

    def cancel_rounds(self, reason: str, only: set[str] | None = None) -> None:
        for label, task in list(self._tasks.items()):
            if only is not None and label not in only:
                continue
            st = self._status.get(label)
            if reason == STANDBY and st is not None and st.running and st.next_try is None:
                # A backup in a session when the line it stands in for returns: its own line
                # is up, so the session ends as it would (an ODMR transfer finishes and is
                # counted), and the round stops there instead of retrying.
                self._finishing.add(label)
                log.info("round_ends_after_session", relay=label, reason=reason)
                continue
            log.info("round_cancelled", relay=label, reason=reason)
            task.cancel(reason)  # LINK_DOWN lets a turnaround go on: see seam.keeps_session
            del self._tasks[label]
            # Still closing its session; a new round for the relay may start right away.
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def trigger(self, relay: str | None, reason: str) -> dict[str, str]:
        """A round now on `relay` (None: all); returns what happened to each, in words."""
        took = self._take_pending(relay)
        # A trigger for all leaves out a backup on standby (a link it stands in for is up);
        # one that names the relay runs it all the same.
        watcher = self._watcher
        standby = ({r.label for r in self.config.relays if watcher.standby(r.label)}
                   if watcher is not None and relay is None else set())
        log.info("round_requested", relay=relay or "all", reason=reason, took_link_up=took,
                 **({"standby": sorted(standby)} if standby else {}))
        done = self.rounds_for(relay, reason, skip=standby)
        for label in sorted(standby):
            done[label] = "standby: a link it stands in for is up (name it to run it)"
        self._publish()
        return done

    def _take_pending(self, relay: str | None) -> bool:
        """A trigger while a link-up round is owed (settle) is that round, not one more: the
        ISP would get every ETRN twice. True if the trigger took it (for all relays)."""
        watcher = self._watcher
        if watcher is None or watcher.round_due(relay) is None:
            return False
        if relay is not None:
            group = watcher.plan.group_of(relay)
            together = set(group.relays) if group is not None else {relay}
            self._served_early.add(relay)
            if not together <= self._served_early:
                return False  # the others still get theirs when it is due
            self._served_early -= together
            return watcher.take_pending(together)
        self._served_early.clear()
        return watcher.take_pending()

    # --- reload ----------------------------------------------------------------------------
    def request_reload(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # a SIGHUP storm collapses into one more reload
            return
        self._reloading = self._spawn(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            self.notifier.reloading(time.monotonic_ns() // 1000)
            try:
                new = await offloop.bounded(RELOAD_READ_TIMEOUT, load_config, self.path)
            except TimeoutError:
                self._reload_failed([f"reading the configuration took over "
                                     f"{RELOAD_READ_TIMEOUT:g}s"])
            except ConfigError as exc:
                self._reload_failed(exc.problems)
            else:
                await self._apply(new)
            self.notifier.ready(self.summary())
            if not self._reload_again:
                return

    def _reload_failed(self, problems: list[str]) -> None:
        self.reload_failed = (time.time(), list(problems))
        log.error("config_reload_failed", config=str(self.path), problems=problems,
                  kept="previous configuration")

    async def _apply(self, new: Config) -> None:
        old = self.config
        if new.control.socket != old.control.socket:
            server = ControlServer(new.control.socket, self.handle_request)
            try:
                await server.start()
            except ControlError as exc:
                self._reload_failed([str(exc)])
                return
            if self._control is not None:
                await self._control.close()
            self._control = server
        if new.log != old.log:
            logs.configure(new.log.level, new.log.format, background=True)
        kept = {r.label: r for r in new.relays}
        before = {r.label: r for r in old.relays}
        gone = {r.label for r in old.relays if kept.get(r.label) != r}  # changed or removed
        interrupted = gone & self._tasks.keys()
        self.cancel_rounds("config_reloaded", only=gone)
        for label in gone - kept.keys():
            self._status.pop(label, None)
            self._wake.pop(label, None)
        self.config = new
        self.config_loaded, self.reload_failed = time.time(), None
        self._set_gate(new)
        if self._watcher is not None and plan(new) != self._watcher.plan:
            self._watcher.reconfigure(plan(new))
        if new.repeat != old.repeat:
            self._restart_repeat()
        await metrics.serve(new, link_up=self._watcher is not None and self._watcher.up,
                            last_success=self._last_successes, links=self._metric_links())
        added = sorted(kept.keys() - before.keys())
        changed = sorted(gone & kept.keys())
        log.info("config_reloaded", config=str(self.path),
                 relays=[r.label for r in new.relays], added=added,
                 removed=sorted(before.keys() - kept.keys()), changed=changed)
        watcher = self._watcher
        if watcher is not None:
            # A relay added while its link is up (or changed mid-round: that round was
            # cancelled) would otherwise wait for the next link-up.
            for label in [*added, *sorted(interrupted & kept.keys())]:
                if watcher.may_run(label):
                    self.start_rounds(label, "config_reloaded")
        self.state.changed()

    # --- control socket and status -----------------------------------------------------------
    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "status":
            return {"ok": True, **self.status()}
        relay = request.get("relay")
        if relay is not None and (not isinstance(relay, str)
                                  or relay not in {r.label for r in self.config.relays}):
            return {"ok": False, "error": f"no relay named {str(relay)[:64]!r}"}
        done = self.trigger(relay, "trigger")
        return {"ok": True, "relays": list(done),
                "results": [{"relay": name, "what": what} for name, what in done.items()]}

    def status(self) -> dict[str, Any]:
        watcher = self._watcher
        links = self._links()
        # `link`: the only link, or (relays on links of their own) all of them in one.
        link = links[0] if len(links) == 1 else status_doc.LinkView(
            up=bool(watcher and watcher.up), why=watcher.why if watcher else "",
            since=max((ln.since for ln in links if ln.since is not None), default=None),
            transitions=sum(ln.transitions for ln in links),
            watching=tuple(p for ln in links for p in ln.watching),
            up_when=self.config.watch.up_when,
            not_public=next((ln.not_public for ln in links if ln.not_public), None))
        doc = status_doc.build(status_doc.DaemonView(
            path=self.path, config=self.config, started=self.started, link=link, links=links,
            rounds_started=self.rounds_started,
            last_round=self.last_round, tasks=len(asyncio.all_tasks()),
            statuses=self._status, running=self._tasks.keys(),
            round_due=watcher.round_due() if watcher else None, now=time.time(),
            config_loaded=self.config_loaded, reload_failed=self.reload_failed,
            repeat_next=self.repeat_next if self.config.repeat else None,
            state_file=self.state.as_dict()))
        if self._gate is not None:
            doc["local_mta"] = self._gate.as_dict()
            for relay in doc["relays"]:
                if relay["name"] in self._gate.waiting:
                    relay["state"] = "waiting-local-mta"
        # The stall detector's view: steps of the loop longer than threshold_ms.
        doc["loop"] = {"stalls": self.stalls.stalls,
                       "threshold_ms": round(self.stalls.threshold * 1000),
                       "longest_step_ms": round(self.stalls.longest * 1000, 1)}
        return doc

    def summary(self) -> str:
        """The one-line STATUS= that `systemctl status etrnd` shows."""
        watcher = self._watcher
        line = status_doc.summary(bool(watcher and watcher.up), self.config.relays,
                                  self._status, self._tasks.keys(), self._links())
        if self._gate is not None and self._gate.waiting:
            line += f"; waiting for the local MTA {self._gate.target}"
        return line

    def _links(self) -> list[status_doc.LinkView]:
        """Each link, the relays it drives and which of them wait on failover (wall clock)."""
        watcher = self._watcher
        if watcher is None:
            return []
        offset = time.time() - time.monotonic()  # the watcher's times are monotonic

        def wall(mono: float | None) -> float | None:
            return None if mono is None else mono + offset

        backs_up = {r.label: r.watch.only_when_down for r in self.config.relays
                    if r.watch is not None and r.watch.only_when_down}
        etrn = {r.label for r in self.config.relays if r.protocol == "etrn"}
        out = []
        for view in watcher.links():
            spec = watcher.plan.link(view.name)
            active = {r: t + offset for r in view.relays
                      if (t := watcher.may_run_since(r)) is not None}
            out.append(status_doc.LinkView(
                up=view.up, why=view.why, since=wall(view.since),
                transitions=self.link_transitions.get(view.name, 0),
                watching=spec.interfaces, up_when=spec.up_when,
                not_public=(self.wan_not_public(view.iface)
                            if view.up and etrn & set(view.relays) else None),
                name=view.name, relays=view.relays,
                standby=frozenset(r for r in view.relays if watcher.standby(r)),
                backs_up={r: backs_up[r] for r in view.relays if r in backs_up},
                active_since=active, holding=wall(view.holding)))
        return out

    def _metric_links(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        watcher = self._watcher
        return [] if watcher is None else [(v.name, v.up, v.relays) for v in watcher.links()]

    def _publish(self) -> None:
        """STATUS= for `systemctl status`: nothing at all without a notify socket; else built
        once for all the changes of the next PUBLISH_DELAY, so a link-up's connect goes first."""
        if self.notifier.enabled and self._publish_timer is None:
            self._publish_timer = asyncio.get_running_loop().call_later(
                PUBLISH_DELAY, self._publish_now)

    def _publish_now(self) -> None:
        self._publish_timer = None
        self.notifier.status(self.summary())

    def _last_successes(self) -> dict[str, float | None]:
        """For metrics: each relay's last accepted reply (wall clock), as status shows it."""
        marks = {r.label: (st.history.last_success if (st := self._status.get(r.label))
                           else None) for r in self.config.relays}
        return {label: mark.when if mark else None for label, mark in marks.items()}

    def _histories(self) -> tuple[dict[str, RelayHistory], dict[str, tuple[str, ...]]]:
        """For the state file: every relay's history and its configured arguments."""
        return ({name: st.history for name, st in self._status.items()},
                {r.label: r.etrn for r in self.config.relays})


def run_command(path: str | None) -> int:
    config = load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    logs.configure(config.log.level, config.log.format, background=True)
    stalls = StallDetector()
    # Read before the loop runs (nothing waits on it yet); a bad file costs the history only.
    state_path = statefile.default_path()
    histories, problem = statefile.load(state_path, {r.label for r in config.relays})
    if problem is not None:
        log.warning("state_file_unusable", path=str(state_path), reason=problem)
    daemon = Daemon(resolve_path(path), config, stalls=stalls, state_path=state_path,
                    histories=histories)
    try:
        with asyncio.Runner(loop_factory=stalls.new_event_loop) as runner:
            return runner.run(daemon.run())
    except ControlError as exc:
        log.error("daemon_fatal", reason=str(exc))
        print(f"etrnd: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # netlink refused (a sandbox), out of memory, ...: one clear line
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        log.error("daemon_fatal", reason=reason, error=type(exc).__name__)
        print(f"etrnd: cannot run: {reason}", file=sys.stderr)
    return 1


