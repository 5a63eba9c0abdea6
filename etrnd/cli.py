"""Command line: `etrnd run | check-config | send | trigger | status`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from etrnd import __version__
from etrnd.config.preflight import EXIT_CONFIG, check_secrets, load_or_report, report
from etrnd.config.schema import Config, resolve_path

EXIT_OK = 0
EXIT_FATAL = 1


def build_parser() -> argparse.ArgumentParser:
    """The `etrnd` command line; scripts/manpages.py writes etrnd(8) from it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="config file (default: $ETRND_CONFIG, then /etc/etrnd/etrnd.yaml)",
    )
    parser = argparse.ArgumentParser(
        prog="etrnd", parents=[common],
        description="Send SMTP ETRN to your ISP's relays when the WAN link comes up.",
    )
    parser.add_argument("--version", action="version", version=f"etrnd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    sub.add_parser("check-config", parents=[common], help="validate the config and summarise it")
    send = sub.add_parser("send", parents=[common], help="one ETRN round now, no link watching")
    send.add_argument("--relay", metavar="NAME", help="only this relay")
    send.add_argument("-v", "--debug", action="store_true",
                      help="log at debug level for this run: the SMTP dialogue, AUTH redacted")
    send.add_argument("args", nargs="*", metavar="ARG",
                      help="ETRN arguments to send instead of the configured ones")
    trigger = sub.add_parser("trigger", parents=[common], help="ask the daemon for a round now")
    trigger.add_argument("--relay", metavar="NAME", help="only this relay")
    status = sub.add_parser("status", parents=[common], help="show the running daemon's state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _err(message: str) -> None:
    print(f"etrnd: {message}", file=sys.stderr)


def summary(config: Config, path: Path) -> str:
    watch = config.watch
    ifaces = ", ".join(watch.interfaces) or "any interface"
    lines = [
        f"config {path}: valid",
        f"watch: {ifaces}; up when {watch.up_when} ({watch.family}); "
        f"settle {watch.settle:g}s, min_interval {watch.min_interval:g}s",
    ]
    for relay in config.relays:
        auth = f", auth as {relay.auth.username}" if relay.auth else ""
        what = (f"odmr: atrn {' '.join(relay.etrn)}, deliver to "
                f"{relay.effective_deliver_to}" if relay.protocol == "odmr"
                else f"etrn {' '.join(relay.etrn)}")
        lines.append(
            f"relay {relay.label}: {', '.join(relay.all_hosts)} port {relay.effective_port}, "
            f"tls {relay.tls}{'' if relay.verify else ' (NOT verified)'}{auth}; {what}"
            + ("" if relay.source == "auto" else f"; source {relay.source}")
        )
    r = config.retry
    give_up = f"{r.give_up_after:g}s" if r.give_up_after else "never"
    lines.append(
        f"retry: {r.first_delay:g}s x{r.factor:g} up to {r.max_delay:g}s, "
        f"jitter {r.jitter:g}, give up after {give_up}; "
        f"repeat {'every ' + format(config.repeat, 'g') + 's' if config.repeat else 'off'}"
    )
    if config.local_mta is not None:
        lines.append(f"local MTA: {config.local_mta.address}, rounds wait for its 220 "
                     f"up to {config.local_mta.max_wait:g}s")
    lines.append(f"control socket: {config.control.socket}; log {config.log.level} "
                 f"as {config.log.format}")
    return "\n".join(lines)


def _check_config(path: str | None) -> int:
    # A credential that systemd hands only to the service is checked where the unit loads it
    # from, or named as not checked: from a shell it cannot be read and that is not an error.
    config = load_or_report(path, defer_credentials=True)
    if config is None:
        return EXIT_CONFIG
    findings = check_secrets(config)
    problems = [f"{f.key}: {f.text}" for f in findings if f.problem]
    if problems:
        report(path, problems)
        return EXIT_CONFIG
    print(summary(config, resolve_path(path)))
    for finding in findings:
        print(f"secret {finding.key}: {finding.text}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path: str | None = getattr(args, "config", None)
    try:
        if args.command == "check-config":
            return _check_config(path)
        if args.command == "send":
            from etrnd.send import send_command

            return send_command(path, args.relay, list(args.args), debug=args.debug)
        if args.command == "run":
            from etrnd.service.daemon import run_command

            return run_command(path)
        if args.command == "trigger":
            from etrnd.service.control import trigger_command

            return trigger_command(path, args.relay)
        if args.command == "status":
            from etrnd.service.control import status_command

            return status_command(path, as_json=args.json)
    except KeyboardInterrupt:
        return EXIT_OK
    _err(f"unknown command {args.command!r}")
    return EXIT_FATAL
