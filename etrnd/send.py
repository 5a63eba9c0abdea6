"""`etrnd send`: one round now (ETRN or ODMR) on all (or one) relays, without link watching."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from etrnd.config.model import Config, Relay, Retry
from etrnd.config.preflight import EXIT_CONFIG, load_or_report, warn_secrets
from etrnd.config.values import check_atrn_domain, check_etrn_argument
from etrnd.link import egress
from etrnd.loop.offloop import ThreadPerCall
from etrnd.outputs.logs import configure
from etrnd.protocols.smtp import resolve_helo
from etrnd.service.mtagate import Gate
from etrnd.service.rounds import RoundResult, run_all

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


def exit_status(results: Sequence[RoundResult]) -> int:
    """0 all accepted; 4 if any argument failed after retries; else 3 if any was refused.

    ODMR: a message the office MTA refused (5xx) counts as a refusal; one it deferred leaves
    its domain failed unless a retry in the same round delivered it.
    """
    # Failures win over refusals: a script that retries on 4 then still has work to do.
    if any(r.failed for r in results):
        return EXIT_FAILED
    if any(r.refused or r.messages.refused for r in results):
        return EXIT_REFUSED
    return EXIT_OK


def report(relay: Relay, result: RoundResult) -> str:
    """One line per relay on stdout: what a script or an operator checks after `send`.

    `relay NAME: accepted: ARGS; refused: ARG (REASON), ...; failed: ARG (REASON), ...;
    [relay refused|failed for ARGS: REASON; ]attempts: N` ("-" for an empty list; ODMR
    relays start with their message counts). An argument the relay failed for (AUTH, ETRN
    not supported, connect, TLS, time-out) is named under the relay's reason, not its own.
    """
    counts = ""
    if relay.protocol == "odmr":
        m = result.messages
        counts = f"{m.relayed} relayed, {m.refused} refused, {m.deferred} deferred; "

    def own(args: tuple[str, ...]) -> str:
        mine = [a for a in args if a not in result.by_relay]
        return ", ".join(f"{a} ({result.reasons.get(a, 'no reason known')})"
                         for a in mine) or "-"

    relay_part = ""
    if result.by_relay:
        verb = "failed" if any(a in result.failed for a in result.by_relay) else "refused"
        relay_part = (f"relay {verb} for {', '.join(result.by_relay)}: "
                      f"{result.relay_reason or 'no reason known'}; ")
    return (f"relay {result.relay}: {counts}accepted: {', '.join(result.accepted) or '-'}; "
            f"refused: {own(result.refused)}; failed: {own(result.failed)}; "
            f"{relay_part}attempts: {result.attempts}")


def _err(message: str) -> None:
    print(f"etrnd: {message}", file=sys.stderr)


async def _send(relays: Sequence[Relay], retry: Retry,
                args: tuple[str, ...] | None, config: Config | None = None) -> list[RoundResult]:
    # A lookup hung on a dead name server must not hold up the exit (see offloop).
    asyncio.get_running_loop().set_default_executor(ThreadPerCall())
    # No watcher here: the route to each relay is checked against its own link's state, read
    # once (when it matters) by the daemon's own rules (etrnd.link.egress.expected_for_send),
    # while the HELO name resolves.
    reading = ([asyncio.create_task(egress.expected_for_send(config.watch_of(r)))
                for r in relays] if config else None)
    if any(r.helo is None for r in relays):
        await resolve_helo()  # bounded: a dead name server costs 2 s, then the host name
    expected = [await r for r in reading] if reading is not None else None
    if config is not None and config.local_mta is not None:
        await Gate(config.local_mta.address, config.local_mta.max_wait).ready("send")

    async def one(relay: Relay, link: egress.Expected | None) -> RoundResult:
        with egress.expecting(link):
            return (await run_all([relay], retry, args))[0]

    links = expected if expected is not None else [None] * len(relays)
    return list(await asyncio.gather(*(one(r, e) for r, e in zip(relays, links, strict=True))))


def send_command(path: str | None, relay: str | None, args: list[str],
                 debug: bool = False) -> int:
    config = load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    relays: tuple[Relay, ...] = config.relays
    if relay is not None:
        try:
            relays = (config.relay(relay),)
        except KeyError as exc:
            _err(str(exc.args[0]))
            return EXIT_CONFIG
    for arg in args:
        try:
            check_etrn_argument(arg)
            if any(r.protocol == "odmr" for r in relays):
                check_atrn_domain(arg)
        except ValueError as exc:
            _err(f"argument {arg!r}: {exc}")
            return EXIT_CONFIG
    configure("debug" if debug else config.log.level, config.log.format)
    warn_secrets(config)
    try:
        results = asyncio.run(_send(relays, config.retry, tuple(args) or None, config))
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    for r, result in zip(relays, results, strict=True):
        print(report(r, result))
    return exit_status(results)
