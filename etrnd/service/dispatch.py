"""The daemon's rounds: at most one per relay, started, woken, cancelled; repeat rounds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection

from etrnd.config.model import Config, Relay
from etrnd.link import egress
from etrnd.outputs import metrics
from etrnd.outputs.logs import get_logger
from etrnd.protocols.seam import STANDBY
from etrnd.service.core import DaemonCore
from etrnd.service.mtagate import Gate
from etrnd.service.rounds import RelayStatus, RoundResult, run_round

log = get_logger()
ROUND_STARTED = "round started"


class Dispatch(DaemonCore):
    """Rounds for the relays that may run, by link decision, trigger, repeat or reload."""

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
