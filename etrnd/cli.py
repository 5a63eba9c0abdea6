"""Command line: `etrnd run | check-config | send | trigger | status | check`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from etrnd import __version__
from etrnd.config.model import Config, Watch, resolve_path
from etrnd.config.preflight import EXIT_CONFIG, check_secrets, load_or_report, report

EXIT_OK = 0
EXIT_FATAL = 1


# What each command's --help says beyond its options (the man page is generated from this
# parser, so these texts are the reference): what it does, its exit codes, for run the signals.
_RUN = """\
Watch the WAN link through the kernel's netlink events and, each time it comes up, send
ETRN (or ODMR's ATRN) to every configured relay, retrying with backoff until each answers.
Runs in the foreground: systemd (Type=notify) and Docker start it so."""
_RUN_EPILOG = """\
signals:
  SIGTERM, SIGINT  stop: close open sessions cleanly, exit 0
  SIGHUP           re-read the config; an invalid one is logged and the old one kept
  SIGUSR1          start a round now, as `etrnd trigger` does

exit status:
  0  stopped by SIGTERM or SIGINT
  1  another fatal error (netlink refused, control socket taken, ...)
  2  invalid configuration (each problem on stderr; a YAML syntax error alone)"""
_CHECK = """\
Load and validate the config, print a one-screen summary of it, then any warnings: values
that are valid but will not work here (the example's placeholders, port 25 with tls: implicit
or protocol: odmr, an interface that does not exist, a missing control socket directory, a
password file the service's user cannot read). Nothing is sent anywhere."""
_CHECK_EPILOG = """\
exit status:
  0  valid (warnings, if any, on stderr)
  2  invalid, or warnings with --strict: each problem on stderr as `key.path: what is wrong`"""
_SEND = """\
One round now on every relay (or one), without watching the link: for ip-up scripts and
cron. Retries transient failures per retry: until give_up_after. Prints one line per relay
on stdout: what was accepted, refused or failed, each with the server's reason."""
_SEND_EPILOG = """\
exit status:
  0  every argument accepted
  2  invalid configuration, relay name or argument
  3  some refused permanently (a 5xx or 459 reply, AUTH refused, ETRN not supported)
  4  some still failing when retries gave up (connection, time-out, TLS, 4xx)
  130  interrupted"""
_TRIGGER = ("Ask the running daemon, over its control socket, to start a round now; prints "
            "per relay what happened (`isp: round started`, `backup: retrying now (was in "
            "backoff)`).")
_TRIGGER_EPILOG = """\
exit status:
  0  the daemon accepted the request
  1  no daemon answers on the control socket, or it refused the request"""
_STATUS = ("Show the running daemon's state: a verdict first (OK, DEGRADED or FAILING, and "
           "why), then the link, and each relay's last success, last failure with its cause, "
           "and next try (docs/status.md).")
_STATUS_EPILOG = """\
exit status:
  0  the daemon answered (even when relays fail: that is the verdict, or `etrnd check`)
  1  no daemon answers on the control socket"""
_HEALTH = """\
Health check by the Nagios plugin conventions: asks the running daemon and prints one line,
`ETRND STATE - text | perfdata`. The container image's HEALTHCHECK runs it."""
_HEALTH_EPILOG = """\
exit status:
  0  OK: every relay's round accepted since the link came up (or the link is down)
  1  WARNING: a relay's round unaccepted for health.warning_after of link-up time,
     or a config reload failed
  2  CRITICAL: unaccepted for health.critical_after
  3  UNKNOWN: no daemon answers on the control socket"""


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
        epilog="Run `etrnd COMMAND --help` for what each command does and its exit status.",
    )
    parser.add_argument("--version", action="version", version=f"etrnd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str,
                epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=summary, description=description,
                              epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)

    command("run", "run the daemon in the foreground", _RUN, _RUN_EPILOG)
    check = command("check-config", "validate the config and summarise it", _CHECK,
                    _CHECK_EPILOG)
    check.add_argument("--strict", action="store_true",
                       help="treat warnings as errors (exit 2), e.g. before a deployment")
    send = command("send", "one ETRN round now, no link watching", _SEND, _SEND_EPILOG)
    send.add_argument("--relay", metavar="NAME", help="only this relay")
    send.add_argument("-v", "--debug", action="store_true",
                      help="log at debug level for this run: the SMTP dialogue, AUTH redacted")
    send.add_argument("args", nargs="*", metavar="ARG",
                      help="ETRN arguments to send instead of the configured ones")
    trigger = command("trigger", "ask the daemon for a round now", _TRIGGER, _TRIGGER_EPILOG)
    trigger.add_argument("--relay", metavar="NAME", help="only this relay")
    status = command("status", "show the running daemon's state", _STATUS, _STATUS_EPILOG)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command("check", "health check for monitoring (Nagios plugin rules)", _HEALTH,
            _HEALTH_EPILOG)
    return parser


def _err(message: str) -> None:
    print(f"etrnd: {message}", file=sys.stderr)


def _watch_text(watch: Watch) -> str:
    ifaces = ", ".join(watch.interfaces) or "any interface"
    return (f"{ifaces}; up when {watch.up_when} ({watch.family}); "
            f"settle {watch.settle:g}s, min_interval {watch.min_interval:g}s")


def summary(config: Config, path: Path) -> str:
    lines = [f"config {path}: valid", f"watch: {_watch_text(config.watch)}"]
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
        if relay.watch is not None:  # its own link (etrnd.link.lines)
            backs_up = relay.watch.only_when_down
            lines.append(f"  its link: {_watch_text(config.watch_of(relay))}"
                         + (f"; runs only while {', '.join(backs_up)}'s link is down"
                            if backs_up else ""))
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
    if config.metrics is not None:
        lines.append(f"metrics: http://{config.metrics.listen}/metrics (Prometheus)")
    lines.append(f"control socket: {config.control.socket}; log {config.log.level} "
                 f"as {config.log.format}")
    return "\n".join(lines)


def _check_config(path: str | None, strict: bool = False) -> int:
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
    from etrnd.config.lint import warnings  # check-config only

    warned = warnings(config)
    if strict and warned:
        report(path, warned, why="--strict: warnings are errors")
        return EXIT_CONFIG
    print(summary(config, resolve_path(path)))
    for finding in findings:
        print(f"secret {finding.key}: {finding.text}")
    if warned:
        _err(f"{len(warned)} warning{'s' if len(warned) > 1 else ''} "
             f"(exit 0; --strict makes them errors):")
        for line in warned:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path: str | None = getattr(args, "config", None)
    try:
        if args.command == "check-config":
            return _check_config(path, strict=args.strict)
        if args.command == "send":
            from etrnd.send import send_command

            return send_command(path, args.relay, list(args.args), debug=args.debug)
        if args.command == "run":
            from etrnd.service.daemon import run_command

            return run_command(path)
        if args.command == "trigger":
            from etrnd.service.control import trigger_command

            return trigger_command(path, args.relay)
        if args.command == "check":
            from etrnd.service.control import check_command

            return check_command(path)
        if args.command == "status":
            from etrnd.service.control import status_command

            return status_command(path, as_json=args.json)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `etrnd status | head -2`: the reader has what it wanted; no traceback for that.
        # stdout is redirected so the interpreter's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    _err(f"unknown command {args.command!r}")
    return EXIT_FATAL
