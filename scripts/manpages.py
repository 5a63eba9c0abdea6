"""Write man/etrnd.8 and man/etrnd.yaml.5 from the argparse parser and the pydantic models.

Run it after changing a CLI option, a help text, a config key or its description:

    .venv/bin/python scripts/manpages.py            # rewrite the pages
    .venv/bin/python scripts/manpages.py --check    # exit 1 with a diff when they are stale

The pages are committed (tests/deploy/test_manpages.py checks they are current), so neither
the wheel nor an installed system needs this script. The commands, their options, exit
status and signals come from the parser (each command's --help epilog lists `exit status:`
and, for run, `signals:`); the keys, types, defaults and descriptions from the models; the
files, environment and examples are below.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from etrnd import __version__  # noqa: E402 - after the path, so a checkout needs no install
from etrnd.cli import build_parser  # noqa: E402
from etrnd.config.schema import Config  # noqa: E402

PAGES = {"etrnd.8": "man/etrnd.8", "etrnd.yaml.5": "man/etrnd.yaml.5"}


# --- roff --------------------------------------------------------------------------------

def esc(text: str, *, code: bool = True) -> str:
    """Plain text as roff: backslashes and dashes escaped, non-ASCII as \\[uXXXX],
    `code` in bold (unless not `code`), and no line that roff would take for a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)
    if code:
        out = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", out)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in out.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def header(name: str, section: int, title: str) -> list[str]:
    # No date: it would change the page on every run; the version says which etrnd it is.
    return [f'.TH {name.upper()} {section} "" "etrnd {__version__}" "{title}"',
            ".nh", ".ad l"]  # key names and options never hyphenated or stretched


def sentence(text: str) -> str:
    """A help text as a sentence: capital first, full stop last."""
    text = text.strip()
    if not text:
        return text
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def para(text: str) -> list[str]:
    return [".PP", esc(text)]


def item(term: str, text: str) -> list[str]:
    """A tagged paragraph; `term` is roff already."""
    return [".TP", term, esc(text)]


# --- etrnd(8), from the parser -------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        yield action


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:  # as argparse expands it
        text = text % {**vars(action), "prog": prog}
    return text


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    return action.dest.upper()


def _usage(action: argparse.Action) -> str:
    """`[-c FILE]`, `[--json]`, `[ARG ...]` in roff."""
    if not action.option_strings:
        name = italic(_metavar(action))
        if action.nargs in ("*", "?"):
            return f"[{name} ...]" if action.nargs == "*" else f"[{name}]"
        return f"{name} ..." if action.nargs == "+" else name
    flag = bold(action.option_strings[0])
    if action.nargs == 0:
        return f"[{flag}]"
    return f"[{flag} {italic(_metavar(action))}]"


def _term(action: argparse.Action) -> str:
    if not action.option_strings:
        return italic(_metavar(action))
    flags = ", ".join(bold(s) for s in action.option_strings)
    return flags if action.nargs == 0 else f"{flags} {italic(_metavar(action))}"


def epilog_lists(parser: argparse.ArgumentParser) -> dict[str, list[tuple[str, str]]]:
    """The lists of a command's epilog, by title: `exit status:` then `  0  text` rows (a row
    may go on, further indented, on the next lines)."""
    lists: dict[str, list[tuple[str, str]]] = {}
    rows: list[tuple[str, str]] | None = None
    for line in (parser.epilog or "").splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            rows = lists.setdefault(line[:-1], [])
        elif rows is not None and line.startswith("    ") and rows:
            rows[-1] = (rows[-1][0], rows[-1][1] + " " + line.strip())
        elif rows is not None and line.strip():
            key, _, text = line.strip().partition("  ")
            rows.append((key, text.strip()))
    return lists


FILES = [
    ("/etc/etrnd/etrnd.yaml", "The configuration; see etrnd.yaml(5)."),
    ("/run/etrnd/control.sock", "The control socket of `etrnd status` and `etrnd trigger` "
                                "(control.socket in the configuration)."),
    ("/var/lib/etrnd/state.json", "Each relay's last success and failure, so that `etrnd status` "
                                  "still knows them after a restart ($STATE_DIRECTORY; the "
                                  "unit's StateDirectory=). Without it nothing is kept."),
    ("/var/lib/etrnd/config-*.json, ~/.cache/etrnd/config-*.json",
     "The configuration as last validated, read instead of validating again while the file, "
     "etrnd's version and its code are unchanged; no password in it. Always safe to delete."),
    ("/etc/systemd/system/etrnd.service", "The systemd unit; it hands the relay's password "
                                          "over with LoadCredential=."),
]

ENVIRONMENT = [
    ("ETRND_CONFIG", "The configuration file when -c is not given."),
    ("CREDENTIALS_DIRECTORY", "Where a password_file given as a bare name is looked up "
                              "(systemd sets it for LoadCredential=; the image sets "
                              "/run/secrets)."),
    ("NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID", "systemd's notify protocol: READY=1, "
                                                   "STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1."),
    ("STATE_DIRECTORY", "Where the state file and the validated configuration are kept "
                        "(systemd sets it for StateDirectory=; the image sets /var/lib/etrnd)."),
    ("XDG_CACHE_HOME", "Without STATE_DIRECTORY, the validated configuration is kept in "
                       "$XDG_CACHE_HOME/etrnd, else ~/.cache/etrnd."),
    ("JOURNAL_STREAM", "With log.format auto, log to the journal natively when standard "
                       "error is the journal stream systemd set up."),
    ("SSL_CERT_FILE, SSL_CERT_DIR", "Trust store for verifying relays' certificates."),
]

EXAMPLES = [
    ("Check the configuration, including the secrets systemd will hand over:",
     "sudo etrnd check-config"),
    ("Show the link, each relay's last replies and the next try:", "sudo etrnd status"),
    ("Ask the running daemon for a round now:", "sudo etrnd trigger"),
    ("One round from a shell, with the SMTP dialogue (AUTH redacted):",
     "systemd-run --quiet --wait --pipe -p LoadCredential=isp:/etc/etrnd/isp.secret "
     "/usr/local/bin/etrnd send -v"),
    ("Follow the log; only one relay's replies:",
     "journalctl -u etrnd -f\njournalctl -u etrnd RELAY=isp EVENT=etrn_reply -o cat"),
]


def etrnd_8() -> str:
    parser = build_parser()
    subs = _subcommands(parser)
    lines = header("etrnd", 8, "System Manager's Manual")
    name_line = (parser.description or "").rstrip(".")
    lines += [".SH NAME", f"etrnd \\- {esc(name_line[:1].lower() + name_line[1:])}"]
    synopsis = [f"{bold('etrnd')} {bold(name)} " + " ".join(_usage(a) for a in _options(sub))
                for name, _, sub in subs]
    shared = {s for _, _, sub in subs for a in _options(sub) for s in a.option_strings}
    synopsis += [f"{bold('etrnd')} {bold(a.option_strings[0])}" for a in _options(parser)
                 if not shared & set(a.option_strings)]  # --version
    synopsis.append(f"{bold('etrnd')} [{italic('COMMAND')}] {bold('--help')}")
    lines += [".SH SYNOPSIS", "\n.br\n".join(synopsis)]
    lines += [".SH DESCRIPTION"]
    lines += para("etrnd watches the kernel's netlink events for the WAN link named in its "
                  "configuration and, the moment it is up, asks each configured relay to "
                  "deliver the mail it holds for the office: with SMTP ETRN (RFC 1985), or with "
                  "ODMR ATRN (RFC 2645), where the provider delivers over etrnd's own "
                  "connection and etrnd relays each message to the office MTA. It retries with "
                  "backoff until each relay answers, stops when the link goes away, and logs "
                  "one event per line (to the journal under systemd).")
    lines += para("`python -m etrnd` is the same program.")
    lines += [".SH COMMANDS"]
    for name, summary, sub in subs:
        # The longer description where the command has one, else its one-line summary.
        lines += [".SS " + esc(name), esc(sub.description or sentence(summary))]
        for action in _options(sub):
            lines += item(_term(action), sentence(_help(action, f"etrnd {name}")))
    lines += [".SH OPTIONS"]
    for action in _options(parser):
        text = _help(action, "etrnd")
        if isinstance(action, argparse._VersionAction):
            text = text or "print the version and exit"
        lines += item(_term(action), sentence(text))
    lines += item(bold("-h") + ", " + bold("--help"),
                  "Print help and exit; after a command, that command's help.")
    # Exit codes and signals are in each command's --help epilog: the page lists the same.
    lines += [".SH EXIT STATUS"]
    for name, _, sub in subs:
        codes = epilog_lists(sub).get("exit status")
        if not codes:
            raise SystemExit(f"scripts/manpages.py: `etrnd {name} --help` has no exit status")
        lines += [".SS " + esc(name)]
        for code, text in codes:
            lines += item(bold(code), sentence(text))
    lines += [".SH SIGNALS", *para("Sent to `etrnd run` (under systemd: `systemctl reload "
                                   "etrnd` sends SIGHUP).")]
    for _, _, sub in subs:
        for signal, text in epilog_lists(sub).get("signals", []):
            lines += item(bold(signal), sentence(text))
    lines += [".SH FILES"]
    for name, text in FILES:
        lines += item(italic(name), text)
    lines += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        lines += item(bold(name), text)
    lines += [".SH EXAMPLES"]
    for text, command in EXAMPLES:
        lines += [*para(text), ".PP", ".RS 4", ".nf", esc(command), ".fi", ".RE"]
    lines += [".SH SEE ALSO", "\\fBetrnd.yaml\\fR(5), \\fBsystemd.exec\\fR(5), "
              "\\fBjournalctl\\fR(1); RFC 1985 (ETRN), RFC 2645 (ODMR); the README and "
              "docs/ of the source."]
    return "\n".join(lines) + "\n"


# --- etrnd.yaml(5), from the models --------------------------------------------------------

def duration(seconds: float) -> str:
    """Seconds as the config writes them: 2s, 10m, 2h, 500ms."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == 0:
        return "0s"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _split(metadata: Any) -> tuple[set[str], list[Any]]:
    """The names of the functions that check or convert a value (e.g. parse_duration), and the
    other constraints (Ge, Le, ...), of a field's or an Annotated type's metadata."""
    names: set[str] = set()
    constraints: list[Any] = []
    for meta in metadata:
        func = getattr(meta, "func", None)
        if func is not None:
            names.add(getattr(func, "__name__", ""))
        else:
            constraints.append(meta)
    return names, constraints


def _validators(field: FieldInfo) -> set[str]:
    return _split(field.metadata)[0]


def _unwrap(annotation: Any) -> tuple[Any, set[str], list[Any]]:
    """(type, validator names, constraints) of an Annotated type, recursively."""
    names: set[str] = set()
    constraints: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *metadata = typing.get_args(annotation)
        more_names, more = _split(metadata)
        names |= more_names
        constraints += more
    return annotation, names, constraints


# What a value must look like, by the function that checks it (etrnd/config/values.py).
VALUE_KINDS = {
    "parse_duration": "duration",
    "parse_size": "size in octets",
    "check_ifname": "interface name or glob",
    "check_hostname": "host name",
    "check_server": "host name or address",
    "check_etrn_argument": "ETRN argument",
    "parse_deliver_to": "HOST:PORT, lmtp:HOST:PORT or lmtp:/path",
    "validate_password": "path or credential name",
    "check_source": "auto, kernel or an address",
}


def _optional(annotation: Any) -> Any:
    """X for `X | None`, else the annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model a key's value is (or is a list of), else None."""
    inner = _unwrap(_optional(_unwrap(annotation)[0]))[0]
    if typing.get_origin(inner) in (tuple, list):
        inner = _unwrap(typing.get_args(inner)[0])[0]
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def kind(annotation: Any, field: FieldInfo | None = None) -> str:
    """The value a key takes, in words: `carrier | address`, `duration`, `[host name, ...]`."""
    base, names, constraints = _unwrap(_optional(annotation))
    base = _optional(base)
    names |= _validators(field) if field is not None else set()
    constraints += list(field.metadata) if field is not None else []
    for name in sorted(names & VALUE_KINDS.keys()):  # sorted: the same page on every run
        return VALUE_KINDS[name]
    if typing.get_origin(base) is Literal:
        return " | ".join(str(v) for v in typing.get_args(base))
    if typing.get_origin(base) in (tuple, list):
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        return "[" + (kind(args[0]) if args else "value") + ", ...]"
    if base is bool:
        return "true | false"
    words = {int: "integer", float: "number", str: "string", Path: "path"}.get(base, "value")
    low = [c.ge for c in constraints if isinstance(c, annotated_types.Ge)]
    high = [c.le for c in constraints if isinstance(c, annotated_types.Le)]
    if low and high:
        words += f" from {low[0]:g} to {high[0]:g}"
    return words


def default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "parse_duration" in _validators(field) | _unwrap(
            field.annotation)[1]:
        return duration(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_list(field: FieldInfo) -> bool:
    return typing.get_origin(_optional(_unwrap(field.annotation)[0])) in (tuple, list)


def _key_entry(path: str, field: FieldInfo, nested: type[BaseModel] | None) -> list[str]:
    what = "mapping" if nested is not None else kind(field.annotation, field)
    if nested is not None and _is_list(field):
        what = "[mapping, ...]"
    shown = default(field)
    if shown == "not set":
        shown = "optional"
    elif shown != "required":
        shown = "" if nested is not None else f"default {bold(shown)}"
    term = bold(path) + " (" + italic(what) + (f"; {shown}" if shown else "") + ")"
    return item(term, field.description or "")


def _keys(prefix: str, model: type[BaseModel], documented: dict[type[BaseModel], str]) -> list[str]:
    """Every key of `model` under `prefix` (`relays[].`), nested mappings after their key; a
    model already documented elsewhere (a relay's own `watch`) is a reference to it."""
    documented.setdefault(model, prefix.rstrip("."))
    lines: list[str] = []
    for name, field in model.model_fields.items():
        path, nested = prefix + name, _model(field.annotation)
        if nested is not None and nested in documented:
            lines += item(bold(path) + " (" + italic("mapping") + ")",
                          f"{field.description or ''} It takes the keys of "
                          f"`{documented[nested]}`.".strip())
        elif nested is not None:
            lines += _key_entry(path, field, nested)
            lines += _keys(path + ("[]." if _is_list(field) else "."), nested, documented)
        else:
            lines += _key_entry(path, field, None)
    return lines


EXAMPLE = """\
watch:
  interfaces: [ppp0]
relays:
  - name: isp
    host: mail.isp.example
    tls: starttls
    auth: {username: office, password_file: isp}
    etrn: ["@example.org", example.net]
  - name: lte-backup
    host: odmr.isp.example
    protocol: odmr
    auth: {username: office, password_file: isp}
    etrn: [example.org]
    deliver_to: 127.0.0.1:25
retry: {first_delay: 5s, give_up_after: 1h}"""


def etrnd_yaml_5() -> str:
    lines = header("etrnd.yaml", 5, "File Formats Manual")
    lines += [".SH NAME", "etrnd.yaml \\- configuration of etrnd(8)"]
    lines += [".SH SYNOPSIS", italic("/etc/etrnd/etrnd.yaml")]
    lines += [".SH DESCRIPTION"]
    lines += para("A YAML mapping. Only `relays` is required; every other key has the default "
                  "shown. Unknown keys and wrong values are all reported together, each with "
                  "its key path. A YAML syntax error (a tab, a duplicate key) stops reading the "
                  "file, so it is reported alone, with its line and column: fix it and check "
                  "again to see the rest. Either way etrnd refuses to start (exit status 2). "
                  "Check a file with `etrnd check-config -c FILE`; the daemon re-reads it on "
                  "SIGHUP and keeps the running configuration if the new one is invalid.")
    lines += para("A duration is a number of seconds or a number with a unit: `500ms`, `30s`, "
                  "`5m`, `2h`, `1d`. A list is written `[a, b]` or one `- item` a line. Keys "
                  "are written as paths: `relays[].auth.username` is `username` inside `auth` "
                  "inside an entry of the `relays` list.")
    documented: dict[type[BaseModel], str] = {}
    top: list[str] = []
    sections: list[str] = []
    for name, field in Config.model_fields.items():
        nested = _model(field.annotation)
        if nested is None:
            top += _key_entry(name, field, None)
            continue
        sections += [".SH " + esc(name.upper())]
        sections += _key_entry(name, field, nested)
        sections += _keys(name + ("[]." if _is_list(field) else "."), nested, documented)
    lines += [".SH TOP\\-LEVEL KEYS", *top, *sections]
    lines += [".SH EXAMPLE", ".nf", esc(EXAMPLE, code=False), ".fi"]
    lines += para("config/etrnd.example.yaml of the source shows every key, commented.")
    lines += [".SH SEE ALSO", "\\fBetrnd\\fR(8); config/etrnd.example.yaml and "
              "docs/configuration.md of the source."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------

def render() -> dict[str, str]:
    """Each page's path under the repository and its text."""
    return {PAGES["etrnd.8"]: etrnd_8(), PAGES["etrnd.yaml.5"]: etrnd_yaml_5()}


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 with a diff when a page is not current")
    check = args.parse_args(argv).check
    stale = 0
    for rel, text in render().items():
        path = ROOT / rel
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        stale += 1
        if check:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), text.splitlines(keepends=True), rel, "generated"))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if check and stale:
        print(f"\n{stale} page(s) not current: run scripts/manpages.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
