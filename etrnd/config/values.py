"""Config values checked one at a time: durations, ETRN/ATRN arguments, names, deliver_to."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^(\d+)\s*(?:([kKMG])(i)?B?)?$")
_SIZE_UNIT = {"k": 1, "K": 1, "M": 2, "G": 3}
# RFC 1985 arguments: node, @domain or #queue. The character set is deliberately narrow:
# anything outside it is a typo or an injection attempt, and it goes on the wire verbatim.
_ETRN_BODY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_IFNAME_GLOB = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!-]{1,64}$")


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `30s`, `5m`, `2h`, `1d` or a plain non-negative number."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 500ms, 30s, 5m, 2h")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # a YAML integer of hundreds of digits
            raise ValueError("a duration must be a finite number >= 0") from None
    elif isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration (use e.g. 500ms, 30s, 5m, 2h or plain seconds)"
            )
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like 500ms, 30s, 5m, 2h")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("a duration must be a finite number >= 0")
    return seconds


def parse_size(value: object) -> int:
    """Octets from a plain number or `500k`, `25M`, `1G` (powers of 1000; `Ki`, `Mi`, `Gi`
    for powers of 1024; a trailing `B` is allowed). Must be at least 1."""
    problem = f"{value!r} is not a size in octets (use e.g. 10000000, 25M, 50MiB)"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(problem)
    if isinstance(value, int):
        octets = value
    else:
        match = _SIZE.match(value.strip())
        if match is None:
            raise ValueError(problem)
        number, unit, binary = match.groups()
        octets = int(number) * ((1024 if binary else 1000) ** _SIZE_UNIT[unit] if unit else 1)
    if octets < 1:
        raise ValueError("a size must be at least 1 octet")
    return octets


def no_blank_or_control(value: str) -> str:
    bad = [c for c in value if c.isspace() or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError("must not contain white space or control characters")
    if not value:
        raise ValueError("must not be empty")
    return value


def check_etrn_argument(value: str) -> str:
    """Accept a node name, `@domain` or `#queue` (RFC 1985 section 3) that a real server takes.

    After the optional `@` or `#`, the name must pass the host name syntax Postfix's smtpd
    checks (else it answers `501 Error: invalid parameter syntax` and the queue is never
    flushed): labels of letters, digits, `_` and inner `-`, 1-63 long, no empty label (so no
    leading, trailing or double dot), at most 255 in all, and not only digits and dots.
    tests/test_etrn_syntax.py holds the table, checked against a real Postfix.
    """
    no_blank_or_control(value)
    body = value[1:] if value[0] in "@#" else value
    if not body:
        raise ValueError(f"{value!r} names nothing after {value[0]!r}")
    if not value.isascii():
        raise ValueError(f"{value!r} is not ASCII (write an internationalised domain as xn--...)")
    if not _ETRN_BODY.match(body):
        raise ValueError(
            f"{value!r} is not a node name, @domain or #queue "
            "(letters, digits, '.', '-', '_' after an optional @ or #)"
        )
    problem = _etrn_name_problem(body)
    if problem is not None:
        raise ValueError(f"{value!r}: {problem}; a real server refuses it as syntax (501)")
    return value


def _etrn_name_problem(name: str) -> str | None:
    if len(name) > 255:
        return "the name is longer than 255 characters"
    if name.endswith("."):
        return "trailing dot (write the name without it)"
    labels = name.split(".")
    if "" in labels:
        return "empty label (a leading or doubled dot)"
    for label in labels:
        if len(label) > 63:
            return f"label {label[:16]}... is longer than 63 characters"
        if label.startswith("-") or label.endswith("-"):
            return f"label {label!r} starts or ends with a hyphen"
    if all(c.isdigit() or c == "." for c in name):
        return "a name of only digits and dots is not a host name"
    return None


def check_hostname(value: str) -> str:
    no_blank_or_control(value)
    if value.startswith("[") and value.endswith("]"):
        # An address literal (RFC 5321 4.1.3) goes into EHLO verbatim: its inside must be a
        # real address, or a typo like [é] is accepted here and fails every session later.
        inner = value[1:-1]
        v6 = inner[:5].lower() == "ipv6:"
        try:
            socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, inner[5:] if v6 else inner)
        except OSError:
            raise ValueError(f"{value!r} is not an address literal "
                             "(write [192.0.2.1] or [IPv6:2001:db8::1])") from None
        return value
    if not _HOSTNAME.match(value) and not is_ip(value):
        raise ValueError(f"{value!r} is not a valid host name or address")
    return value


def check_server(value: str) -> str:
    if value.startswith("["):
        raise ValueError(f"{value!r}: write a server address without brackets")
    return check_hostname(value)


def is_ip(value: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
        except OSError:
            continue
        return True
    return False


def check_ifname(value: str) -> str:
    no_blank_or_control(value)
    if "/" in value or not _IFNAME_GLOB.match(value):
        raise ValueError(f"{value!r} is not an interface name or glob")
    if not any(c in value for c in "*?[") and len(value) > 15:
        raise ValueError(f"{value!r} is longer than an interface name can be (15)")
    return value


def check_atrn_domain(value: str) -> str:
    """An ATRN argument (RFC 2645 section 4.2.1): a domain name, no @, # or trailing dot."""
    no_blank_or_control(value)
    if value[0] == "@":
        raise ValueError(f"{value!r}: ATRN takes domain names; write {value[1:]!r}")
    if value[0] == "#":  # stripping the # would turn a queue name into a domain
        raise ValueError(f"{value!r}: ODMR (ATRN) takes domain names, no queue names; "
                         "write the domain(s) the provider holds mail for")
    if not value.isascii():
        raise ValueError(f"{value!r} is not ASCII (write an internationalised domain as xn--...)")
    if value.endswith(".") or not _HOSTNAME.match(value) or is_ip(value):
        raise ValueError(f"{value!r} is not a domain name")
    return value


@dataclass(frozen=True)
class DeliverTo:
    """Where ODMR mail goes: the office MTA by SMTP or LMTP, over TCP or a unix socket."""

    lmtp: bool
    host: str | None = None  # TCP: a host name or address (no brackets)
    port: int | None = None
    path: str | None = None  # LMTP over a unix socket

    def __str__(self) -> str:
        if self.path is not None:
            return f"lmtp:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'lmtp:' if self.lmtp else ''}{host}:{self.port}"


DEFAULT_DELIVER_TO = DeliverTo(lmtp=False, host="127.0.0.1", port=25)
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d{1,5}))?$")


def parse_deliver_to(value: object) -> DeliverTo:
    """`HOST:PORT` (SMTP, port 25 if left out), `lmtp:HOST:PORT` (port 24), `lmtp:/path`."""
    if isinstance(value, DeliverTo):
        return value
    if not isinstance(value, str):
        raise ValueError('must be "HOST:PORT", "lmtp:HOST:PORT" or "lmtp:/path/to/socket"')
    no_blank_or_control(value)
    lmtp = value.lower().startswith("lmtp:")
    rest = value[5:] if lmtp else value
    if rest.startswith("/"):
        if not lmtp:
            raise ValueError(f"{value!r}: a socket path needs LMTP; write 'lmtp:{rest}'")
        return DeliverTo(lmtp=True, path=rest)
    match = _HOST_PORT.match(rest)
    if match is None:
        raise ValueError(f'{value!r} is not "HOST:PORT", "lmtp:HOST:PORT" or "lmtp:/path" '
                         "(an IPv6 address goes in brackets: [::1]:25)")
    host = match.group("v6") or match.group("host")
    if match.group("v6") is not None and not is_ip(host):
        raise ValueError(f"{value!r}: {host!r} is not an IPv6 address")
    check_server(host)
    port = int(match.group("port") or (24 if lmtp else 25))
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return DeliverTo(lmtp=lmtp, host=host, port=port)


def check_source(value: str) -> str:
    """`source:` of a relay: auto, kernel, or an address of this machine (see etrnd.link.egress)."""
    if value in ("auto", "kernel") or is_ip(value):
        return value
    raise ValueError(f"{value!r} is not auto, kernel or an IP address to send from")


def split_listen(value: str) -> tuple[str, int]:
    """`ADDRESS:PORT` of a listening socket (`127.0.0.1:9469`, `[::1]:9469`, `localhost:9469`)
    as (host without brackets, port). Raises ValueError in the config's words."""
    example = "e.g. 127.0.0.1:9469 or [::1]:9469"
    if not isinstance(value, str) or not value:
        raise ValueError(f'should be "ADDRESS:PORT", {example}')
    no_blank_or_control(value)
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f'{value!r} should be "ADDRESS:PORT", {example}')
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host or not is_ip(host):
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address")
    elif ":" in host:
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:9469")
    elif re.fullmatch(r"[\d.]+", host) and not is_ip(host):
        raise ValueError(f"{value!r}: {host!r} is not an IPv4 address")
    else:
        check_server(host)
    return host, int(port)


def check_listen(value: str) -> str:
    split_listen(value)
    return value


def default_helo(name: str | None = None) -> str:
    """The machine's FQDN (or `name`), or its host name when that is all /etc/hosts knows.

    Without `name` this asks the resolver, which can hang for many seconds: never call it on
    the event loop (smtp.resolve_helo runs it off the loop with a bound).
    """
    name = socket.getfqdn() if name is None else name
    try:
        return check_hostname(name)
    except ValueError:
        return "localhost"
