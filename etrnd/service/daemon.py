"""`etrnd run`: link decisions start ETRN rounds; signals, control socket and systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Collection
from pathlib import Path

from etrnd import __version__
from etrnd.config.model import Config, resolve_path
from etrnd.config.preflight import EXIT_CONFIG, load_or_report, warn_secrets
from etrnd.link import egress
from etrnd.link.lines import LinkChange, plan
from etrnd.link.watcher import Decision, LinkWatcher
from etrnd.loop import offloop
from etrnd.loop.stall import Stall, StallDetector
from etrnd.outputs import logs, metrics, statefile
from etrnd.outputs.logs import get_logger
from etrnd.outputs.sdnotify import Notifier
from etrnd.protocols import smtp
from etrnd.protocols.odmr.hangup import STOP_DRAIN
from etrnd.service.control import ControlError, ControlServer
from etrnd.service.dispatch import Dispatch
from etrnd.service.history import RelayHistory
from etrnd.service.mtagate import Gate
from etrnd.service.reloading import Reloading
from etrnd.service.reporting import Reporting
from etrnd.service.rounds import RelayStatus

log = get_logger()

# SIGTERM must end the process within a second even mid-session: QUIT gets this long.
STOP_GRACE = 0.7
# ... except when a provider is still sending over an ODMR turnaround: that connection is
# hung up (421, FIN) and drained for up to hangup.STOP_DRAIN, since closing it with data
# coming would reset the provider mid-DATA (see docs/odmr.md). Below TimeoutStopSec=30s.
STOP_LIMIT = STOP_DRAIN + STOP_GRACE
# ... and a supervisor that does not read its notify socket gets this long for STOPPING=1.
STOP_NOTIFY_DRAIN = 0.2
# The state file's last write at stop, inside STOP_GRACE.
STATE_SAVE_AT_STOP = 0.3


class Daemon(Dispatch, Reloading, Reporting):
    """Owns the watcher, one round task per relay at most, and the outside interfaces: the
    lifecycle and link decisions here; rounds, reload and status in their own modules."""

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


