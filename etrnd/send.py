"""`etrnd send`: one ETRN round now on all (or one) relays, without link watching."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from etrnd.cli import EXIT_CONFIG, load_or_report
from etrnd.config import Relay, check_etrn_argument
from etrnd.logs import configure
from etrnd.rounds import RoundResult, run_all

EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


def exit_status(results: Sequence[RoundResult]) -> int:
    """0 all accepted; 4 if any argument failed after retries; else 3 if any was refused."""
    # Failures win over refusals: a script that retries on 4 then still has work to do.
    if any(r.failed for r in results):
        return EXIT_FAILED
    if any(r.refused for r in results):
        return EXIT_REFUSED
    return EXIT_OK


def _err(message: str) -> None:
    print(f"etrnd: {message}", file=sys.stderr)


def send_command(path: str | None, relay: str | None, args: list[str]) -> int:
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
        except ValueError as exc:
            _err(f"argument {arg!r}: {exc}")
            return EXIT_CONFIG
    configure(config.log.level, config.log.format)
    try:
        results = asyncio.run(run_all(relays, config.retry, tuple(args) or None))
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    return exit_status(results)
