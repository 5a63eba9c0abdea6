"""Prometheus metrics (config `metrics:`): one-line hooks feed them, the event loop serves them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from etrnd import __version__
from etrnd.config.values import split_listen
from etrnd.outputs.logs import get_logger

if TYPE_CHECKING:  # prometheus_client is imported only once metrics are configured
    from prometheus_client import CollectorRegistry

    from etrnd.config.model import Config

log = get_logger()

# A scraper that connects and sends nothing (or trickles) is dropped after this long, and a
# request head larger than this is refused: the daemon's memory does not depend on a client.
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192
# Link-up to the relay's first ETRN/ATRN reply: a few ms on a LAN, settle + connect on a real
# line, minutes when the first sessions fail and the round backs off.
LINK_UP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0)
# The text format every Prometheus 2.x reads; all our names are plain, so the body is the
# same as version 1.0.0's (prometheus_client's newer default).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_RESULTS = ("accepted", "refused", "failed", "cancelled", "crashed")


class Reply(Protocol):
    """What the hooks read of a classified reply (protocols.replies.Verdict): this module
    sits below the protocols, which call it, so it names no type of theirs."""

    @property
    def code(self) -> int | None: ...
    @property
    def outcome(self) -> str: ...  # "accepted" for 250-253 (ATRN: 250, 453)


class Round(Protocol):
    """What the hooks read of a finished round (service.rounds.RoundResult)."""

    @property
    def failed(self) -> tuple[str, ...]: ...
    @property
    def ok(self) -> bool: ...


class _Metrics:
    """The metric objects, in a registry of their own (the process's default one stays empty)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        # A `_created` series for every label set: clutter, of no use here.
        prom.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = reg = prom.CollectorRegistry()
        prom.PlatformCollector(registry=reg)
        prom.GCCollector(registry=reg)
        _process_collector(reg)
        prom.Gauge("etrnd_build_info", "Always 1; the running etrnd's version.", ["version"],
                   registry=reg).labels(__version__).set(1)
        self.rounds_started = prom.Counter(
            "etrnd_rounds_started", "Rounds started, by relay and reason (link_up, repeat, "
            "trigger, SIGUSR1, ...).", ["relay", "reason"], registry=reg)
        self.rounds = prom.Counter(
            "etrnd_rounds", "Rounds ended, by relay and result: accepted (every argument), "
            "refused (some permanently), failed (gave up), cancelled (link down, reload, "
            "stop), crashed (a bug; see round_crashed in the log).",
            ["relay", "result"], registry=reg)
        self.replies = prom.Counter(
            "etrnd_replies", "Replies to ETRN/ATRN commands, by relay, command and reply "
            "code class (2xx, 4xx, 5xx).", ["relay", "command", "class"], registry=reg)
        self.failures = prom.Counter(
            "etrnd_attempt_failures", "Attempts that ended before every argument was "
            "answered, by relay and cause (as etrnd status words it): refused, timeout, dns, "
            "connect, tls, auth, auth_without_tls, setup, disconnected, protocol, reply (the "
            "server refused, e.g. 502), other.", ["relay", "cause"], registry=reg)
        self.odmr_messages = prom.Counter(
            "etrnd_odmr_messages", "ODMR messages taken over the provider's connection, by "
            "outcome: relayed (the office MTA took it), refused (5xx), deferred (4xx or not "
            "confirmed; the provider keeps it).", ["relay", "outcome"], registry=reg)
        self.link_up = prom.Gauge(
            "etrnd_link_up", "1 while the watched link is up (watch.up_when), else 0; with "
            "relays on links of their own, while any of them is.", registry=reg)
        self.relay_link_up = prom.Gauge(
            "etrnd_relay_link_up", "1 while the link that drives the relay is up, else 0, by "
            "link (its interfaces as written) and relay: which link drives which relay "
            "(relays[].watch, docs/two-lines.md).", ["link", "relay"], registry=reg)
        self.link_transitions = prom.Counter(
            "etrnd_link_transitions", "Link changes after start, by new state (up, down); "
            "blips within watch.down_hold are not changes.", ["to"], registry=reg)
        self.link_to_etrn = prom.Histogram(
            "etrnd_link_up_to_etrn_seconds", "Seconds from the link coming up to the relay's "
            "first reply to ETRN/ATRN after it (settle, the local MTA check, connect, TLS, "
            "retries included).", ["relay"], buckets=LINK_UP_BUCKETS, registry=reg)
        self.stalls = prom.Counter(
            "etrnd_event_loop_stalls", "Event loop steps longer than the stall threshold "
            "(event_loop_stalled in the log).", registry=reg)
        self.link_up.set(0)
        self.stalls.inc(0)
        self._links: dict[str, bool] = {}  # link name -> up
        self._up_at: dict[str, float] = {}  # relay -> monotonic time its link came up
        self._answered: set[str] = set()  # relays that replied since their link came up

    def relays(self, labels: Iterable[str]) -> None:
        """Series for every configured relay exist from the start (rate() needs a 0)."""
        for relay in labels:
            for result in ROUND_RESULTS:
                self.rounds.labels(relay, result)

    def link(self, up: bool, at: float, initial: bool, name: str,
             relays: Iterable[str]) -> None:
        self._links[name] = up
        self.link_up.set(1 if any(self._links.values()) else 0)
        if not initial:
            self.link_transitions.labels("up" if up else "down").inc()
        for relay in relays:
            self.relay_link_up.labels(name, relay).set(1 if up else 0)
            self._answered.discard(relay)
            if up:
                self._up_at[relay] = at
            else:
                self._up_at.pop(relay, None)

    def reply(self, relay: str, command: str, verdict: Reply) -> None:
        if verdict.code is None:
            return  # not a reply: the argument was never sent, or the session failed
        self.replies.labels(relay, command, f"{verdict.code // 100}xx").inc()
        up_at = self._up_at.get(relay)
        if up_at is not None and relay not in self._answered:
            self._answered.add(relay)
            self.link_to_etrn.labels(relay).observe(time.monotonic() - up_at)

    def round_ended(self, relay: str, ended: Round | str) -> None:
        if isinstance(ended, str):
            result = ended
        elif ended.failed:
            result = "failed"
        elif not ended.ok:
            result = "refused"
        else:
            result = "accepted"
        self.rounds.labels(relay, result).inc()


LastSuccess = Callable[[], Mapping[str, float | None]]


def _last_success_collector(registry: CollectorRegistry, source: LastSuccess) -> None:
    """etrnd_last_success_timestamp_seconds, read at each scrape from the relays' histories
    (what `etrnd status` shows, kept through restarts in the state file): no copy to keep
    in step, and nothing done when no one scrapes."""
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    class LastSuccessCollector(Collector):
        def collect(self) -> Iterable[Metric]:
            family = GaugeMetricFamily(
                "etrnd_last_success_timestamp_seconds", "Unix time of the relay's last "
                "accepting reply to ETRN/ATRN (250-253; ODMR 250 or 453), kept through "
                "restarts with the state file; absent while there was none.", labels=["relay"])
            for relay, when in sorted(source().items()):
                if when is not None:
                    family.add_metric([relay], when)
            yield family

    registry.register(LastSuccessCollector())


def _process_collector(registry: CollectorRegistry) -> None:
    """process_* metrics (memory, CPU, open files) that also work under the unit's
    ProcSubset=pid: prometheus_client reads the boot time from /proc/stat, which that hides,
    and then reports nothing. CLOCK_BOOTTIME gives the same boot time without /proc."""
    from prometheus_client import ProcessCollector

    collector = ProcessCollector(registry=None)
    if not getattr(collector, "_btime", 0):
        collector._btime = round(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME))
    registry.register(collector)


_metrics: _Metrics | None = None  # None until metrics are configured: every hook does nothing
_server: asyncio.Server | None = None
_listen: str | None = None


# --- hooks: one line where the event happens; no-ops while metrics are off -----------------
def round_started(relay: str, reason: str) -> None:
    if _metrics is not None:
        _metrics.rounds_started.labels(relay, reason).inc()


def round_ended(relay: str, ended: Round | str) -> None:
    """`ended`: the round's result, or "cancelled" / "crashed" when it has none."""
    if _metrics is not None:
        _metrics.round_ended(relay, ended)


def reply(relay: str, command: str, verdict: Reply) -> None:
    """A relay's reply to ETRN or ATRN (`command`), as classified."""
    if _metrics is not None:
        _metrics.reply(relay, command, verdict)


def odmr_message(relay: str, outcome: str) -> None:
    """One ODMR message settled: relayed, refused or deferred (protocols.seam.Messages)."""
    if _metrics is not None:
        _metrics.odmr_messages.labels(relay, outcome).inc()


def attempt_failed(relay: str, cause: str) -> None:
    """An attempt ended early; `cause` is service.history.cause's kind (refused, tls, ...)."""
    if _metrics is not None:
        _metrics.failures.labels(relay, cause).inc()


def link(kind: str, at: float, initial: bool, name: str = "*",
         relays: Iterable[str] = ()) -> None:
    """A link's decided state changed (up/down; monotonic time, state at start or not):
    `name` is the link's, `relays` the ones it drives (etrnd.link.lines)."""
    if _metrics is not None and kind in ("up", "down"):
        _metrics.link(kind == "up", at, initial, name, relays)


def stall() -> None:
    if _metrics is not None:
        _metrics.stalls.inc()


# --- the listener ------------------------------------------------------------------------
async def serve(config: Config, link_up: bool, last_success: LastSuccess,
                links: Iterable[tuple[str, bool, tuple[str, ...]]] = ()) -> None:
    """Make the listener match `config.metrics`: start, move or stop it (at start and reload).
    `link_up`: the link's state now, for metrics that a reload turns on while it is up, and
    `links` each link's (name, up, the relays it drives);
    `last_success`: each relay's last accepted reply (wall clock), read at each scrape.

    The first time metrics are configured this imports prometheus_client (~0.1 s, once).
    A listen address that cannot be bound is logged (metrics_listen_failed, with the reason)
    and the daemon carries on without metrics: they must never cost a link-up its round.
    """
    global _metrics, _server, _listen
    wanted = config.metrics.listen if config.metrics is not None else None
    if wanted is not None and _metrics is None:
        _metrics = _Metrics()
        _metrics.link_up.set(1 if link_up else 0)
        for name, up, relays in links:
            _metrics.link(up, time.monotonic(), True, name, relays)
        _last_success_collector(_metrics.registry, last_success)
    if _metrics is not None:
        _metrics.relays(r.label for r in config.relays)
    if wanted == _listen and (_server is not None or wanted is None):
        return
    await close()
    if wanted is None:
        return
    host, port = split_listen(wanted)
    try:
        _server = await asyncio.start_server(_handle, host, port, limit=MAX_REQUEST_HEAD)
    except OSError as exc:
        # asyncio wraps bind()'s error in a sentence of its own; the errno's words suffice.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        log.error("metrics_listen_failed", listen=wanted, reason=reason)
        return
    _listen = wanted
    log.info("metrics_listening", listen=wanted, path="/metrics")


async def close() -> None:
    """Stop listening (metrics removed at reload, or the daemon stopping)."""
    global _server, _listen
    server, _server, _listen = _server, None, None
    if server is not None:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()


def exposition() -> bytes:
    """The text exposition format (version 0.0.4), as GET /metrics returns it."""
    from prometheus_client import generate_latest

    assert _metrics is not None
    return generate_latest(_metrics.registry)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.x request, then close: GET /metrics, anything else 404/405."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            request = head.split(b"\r\n", 1)[0].split(b" ")
            method, path = [*request, b"", b""][:2]
            status, body, ctype = _respond(method, path.split(b"?", 1)[0])
            headers = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(headers.encode("ascii") + (b"" if method == b"HEAD" else body))
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        pass  # a scraper that gave up or never spoke: nothing to answer, nothing to log
    except Exception as exc:  # a bug (a collector's?) costs this scrape, not the daemon
        log.error("metrics_scrape_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


def _respond(method: bytes, path: bytes) -> tuple[str, bytes, str]:
    text = "text/plain; charset=utf-8"
    if path not in (b"/metrics", b"/"):
        return "404 Not Found", b"etrnd serves its metrics at /metrics\n", text
    if method not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", b"GET /metrics\n", text
    return "200 OK", exposition(), EXPOSITION_TYPE
