"""`local_mta:` gate: hold rounds until the office MTA greets (220), not into a closed door."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtplib import SMTP

from etrnd.config.values import DeliverTo
from etrnd.outputs.logs import get_logger, iso

PROBE_TIMEOUT = 2.0  # connect + greeting, per probe (seconds)
PROBE_EVERY = 1.0  # between probes while waiting (seconds): loopback, cheap

Probe = Callable[[DeliverTo], Awaitable[str | None]]


async def greets(target: DeliverTo) -> str | None:
    """None when `target` answers a connection with 220 (RFC 5321 4.3.1), else why not."""
    if target.path is not None:
        smtp = SMTP(socket_path=target.path, timeout=PROBE_TIMEOUT, local_hostname="localhost")
    else:
        smtp = SMTP(hostname=target.host, port=target.port, timeout=PROBE_TIMEOUT,
                    local_hostname="localhost", use_tls=False, start_tls=False)
    try:
        await smtp.connect()  # reads the greeting; anything but 220 raises
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await smtp.quit()
    except Exception:  # noqa: S110 - it greeted; its manners at QUIT change nothing
        pass
    finally:
        smtp.close()
    return None


class Gate:
    """One wait shared by every relay's round: the MTA is probed once, not per relay.

    `state`: "unchecked" (no round asked yet), "waiting", "ready", or "gave-up" (the bounded
    wait ran out; the round went ahead, as it would without `local_mta:`).
    """

    def __init__(self, target: DeliverTo, max_wait: float, *, probe: Probe = greets,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.target = target
        self.max_wait = max_wait
        self._probe, self._sleep, self._clock, self._wall = probe, sleep, clock, wall
        self._task: asyncio.Task[bool] | None = None
        self.state = "unchecked"
        self.since: float | None = None  # wall clock of the last state change
        self.last_error: str | None = None
        self.waiting: set[str] = set()  # relays whose round is held

    async def ready(self, relay: str) -> bool:
        """Wait (at most max_wait seconds) for a 220; True if it came. Cancel-safe."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._wait(), name="etrnd-local-mta")
        self.waiting.add(relay)
        try:
            # shield: one relay's round being cancelled must not end the others' wait.
            return await asyncio.shield(self._task)
        finally:
            self.waiting.discard(relay)
            if not self.waiting and self._task is not None and not self._task.done():
                self._task.cancel()

    def _set(self, state: str) -> None:
        self.state, self.since = state, self._wall()

    async def _wait(self) -> bool:
        log = get_logger().bind(local_mta=str(self.target))
        started = self._clock()
        error = await self._probe(self.target)
        if error is None:
            self._set("ready")
            return True
        self._set("waiting")
        self.last_error = error
        log.warning("round_waiting_local_mta", error=error, max_wait=self.max_wait)
        while self._clock() - started < self.max_wait:
            await self._sleep(min(PROBE_EVERY, max(0.0, self.max_wait - (self._clock() - started))))
            error = await self._probe(self.target)
            if error is None:
                self._set("ready")
                log.info("local_mta_ready", waited_s=round(self._clock() - started, 3))
                return True
            self.last_error = error
        self._set("gave-up")
        log.error("local_mta_wait_gave_up", waited_s=round(self._clock() - started, 3),
                  error=self.last_error, action="the round goes ahead")
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"address": str(self.target), "state": self.state,
                "since": iso(self.since) if self.since is not None else None,
                "max_wait": self.max_wait, "error": self.last_error if self.state != "ready"
                else None, "holding": sorted(self.waiting)}
