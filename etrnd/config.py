"""Load and validate the YAML configuration into frozen pydantic models."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_PATH = Path("/etc/etrnd/etrnd.yaml")
ENV_CONFIG = "ETRND_CONFIG"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# RFC 1985 arguments: node, @domain or #queue. The character set is deliberately narrow:
# anything outside it is a typo or an injection attempt, and it goes on the wire verbatim.
_ETRN_BODY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_IFNAME_GLOB = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!-]{1,64}$")


class ConfigError(Exception):
    """Every problem found in a config file, each as `key.path: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


def _no_blank_or_control(value: str) -> str:
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
    _no_blank_or_control(value)
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


def _check_hostname(value: str) -> str:
    _no_blank_or_control(value)
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
    if not _HOSTNAME.match(value) and not _is_ip(value):
        raise ValueError(f"{value!r} is not a valid host name or address")
    return value


def _check_server(value: str) -> str:
    if value.startswith("["):
        raise ValueError(f"{value!r}: write a server address without brackets")
    return _check_hostname(value)


def _is_ip(value: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
        except OSError:
            continue
        return True
    return False


def _check_ifname(value: str) -> str:
    _no_blank_or_control(value)
    if "/" in value or not _IFNAME_GLOB.match(value):
        raise ValueError(f"{value!r} is not an interface name or glob")
    if not any(c in value for c in "*?[") and len(value) > 15:
        raise ValueError(f"{value!r} is longer than an interface name can be (15)")
    return value


# systemd puts a service's credentials (LoadCredential=) here and says so in this variable.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
_CREDENTIALS_ROOT = Path("/run/credentials")
# Validation context key: when true, a credential that only exists inside the service is not
# an error but an unread Secret (check-config from an operator's shell). run/send never set it.
DEFER_CREDENTIALS = "defer_credentials"


@dataclass(frozen=True, repr=False)
class Secret:
    """A password read from a file; it never prints itself.

    `credential` is the systemd credential name when the config named one (a bare name, or a
    path under /run/credentials/UNIT/). `unread` says why the value was not read: only
    check-config run outside the service gets such a Secret, and its `value` is then empty.
    """

    source: str
    value: str
    credential: str | None = None
    unit: str | None = None
    unread: str | None = None
    notice: str | None = None  # something odd but maybe genuine (see password_notice)

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r}, value='**********')"

    __str__ = __repr__


def _credential_of(path: Path) -> tuple[str, str] | None:
    """(unit, name) for /run/credentials/UNIT/NAME, the path systemd gives a credential."""
    if path.parent.parent == _CREDENTIALS_ROOT:
        return path.parent.name, path.name
    return None


def _read_password(value: object, info: ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a file path or a credential name")
    defer = bool(info.context and info.context.get(DEFER_CREDENTIALS))
    cred: tuple[str | None, str] | None = None
    if "/" in value:
        path = Path(value)
        cred = _credential_of(path)
    else:
        cred = (None, value)
        cred_dir = os.environ.get(CREDENTIALS_ENV)
        if not cred_dir:
            why = (f"{value!r} is a systemd credential (LoadCredential=), present only inside "
                   f"the service, and ${CREDENTIALS_ENV} is not set")
            if defer:
                return Secret(source=value, value="", credential=value, unread=why)
            raise ValueError(why + "; outside the service run: systemd-run --wait --pipe "
                             f"-p LoadCredential={value}:FILE etrnd ...")
        path = Path(cred_dir) / value
    if defer and cred is not None and cred[0] is not None and not path.exists():
        unit, name = cred
        return Secret(source=value, value="", credential=name, unit=unit,
                      unread=f"{path} exists only inside {unit}")
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    password = check_password_text(raw, str(path))
    return Secret(source=str(path), value=password, credential=cred[1] if cred else None,
                  notice=password_notice(password))


def check_password_text(raw: str, where: str) -> str:
    """The password in a secret file's text: one line, the line break stripped.

    Raises ValueError naming `where` when it is empty or holds more than one line.
    """
    password = raw.rstrip("\r\n")
    if not password:
        raise ValueError(f"{where} is empty")
    if any(c in password for c in "\r\n\0"):
        raise ValueError(f"{where} holds more than one line")
    return password


def password_notice(password: str) -> str | None:
    """Why a password may be a mistake although it could be genuine: blanks at either end
    (`echo 'secret ' > file`, an editor's trailing space). Never quotes the password."""
    ends = [where for where, edge in (("begins", password[:1]), ("ends", password[-1:]))
            if edge.isspace()]
    if not ends:
        return None
    return (f"the password {' and '.join(ends)} with white space; kept as is (sent so in "
            "AUTH): remove it from the file unless it is part of the password")


def check_atrn_domain(value: str) -> str:
    """An ATRN argument (RFC 2645 section 4.2.1): a domain name, no @, # or trailing dot."""
    _no_blank_or_control(value)
    if value[0] == "@":
        raise ValueError(f"{value!r}: ATRN takes domain names; write {value[1:]!r}")
    if value[0] == "#":  # stripping the # would turn a queue name into a domain
        raise ValueError(f"{value!r}: ODMR (ATRN) takes domain names, no queue names; "
                         "write the domain(s) the provider holds mail for")
    if not value.isascii():
        raise ValueError(f"{value!r} is not ASCII (write an internationalised domain as xn--...)")
    if value.endswith(".") or not _HOSTNAME.match(value) or _is_ip(value):
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
    _no_blank_or_control(value)
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
    if match.group("v6") is not None and not _is_ip(host):
        raise ValueError(f"{value!r}: {host!r} is not an IPv6 address")
    _check_server(host)
    port = int(match.group("port") or (24 if lmtp else 25))
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return DeliverTo(lmtp=lmtp, host=host, port=port)


def _check_source(value: str) -> str:
    """`source:` of a relay: auto, kernel, or an address of this machine (see etrnd.egress)."""
    if value in ("auto", "kernel") or _is_ip(value):
        return value
    raise ValueError(f"{value!r} is not auto, kernel or an IP address to send from")


def _local_mta_shorthand(value: object) -> object:
    # `local_mta: 127.0.0.1:25` is `local_mta: {address: 127.0.0.1:25}`.
    return {"address": value} if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
EtrnArgument = Annotated[str, AfterValidator(check_etrn_argument)]
HostName = Annotated[str, AfterValidator(_check_hostname)]
ServerName = Annotated[str, AfterValidator(_check_server)]  # connect() takes no [literal]
WireToken = Annotated[str, AfterValidator(_no_blank_or_control)]
InterfacePattern = Annotated[str, AfterValidator(_check_ifname)]
# Dumped as its source path so model_dump()/JSON status can never carry the password.
DeliverTarget = Annotated[
    DeliverTo, BeforeValidator(parse_deliver_to), PlainSerializer(str, return_type=str)
]
Password = Annotated[
    Secret, BeforeValidator(_read_password), PlainSerializer(lambda s: s.source, return_type=str)
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class Watch(_Model):
    interfaces: tuple[InterfacePattern, ...] = ()
    up_when: Literal["carrier", "address", "default-route"] = "default-route"
    family: Literal["ipv4", "ipv6", "any"] = "any"
    settle: Duration = 2.0
    min_interval: Duration = 30.0


class Auth(_Model):
    username: WireToken
    password_file: Password
    allow_plaintext: bool = False


TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]


def default_helo(name: str | None = None) -> str:
    """The machine's FQDN (or `name`), or its host name when that is all /etc/hosts knows.

    Without `name` this asks the resolver, which can hang for many seconds: never call it on
    the event loop (etrn.resolve_helo runs it off the loop with a bound).
    """
    name = socket.getfqdn() if name is None else name
    try:
        return _check_hostname(name)
    except ValueError:
        return "localhost"


class Relay(_Model):
    name: WireToken | None = None
    protocol: Literal["etrn", "odmr"] = "etrn"  # odmr: RFC 2645 ATRN, mail over this session
    host: ServerName | None = None
    hosts: tuple[ServerName, ...] | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = "opportunistic"
    verify: bool = True
    helo: HostName | None = None
    auth: Auth | None = None
    timeout: Duration = 30.0
    etrn: tuple[EtrnArgument, ...] = Field(min_length=1)  # odmr: the domains for ATRN
    deliver_to: DeliverTarget | None = None  # odmr only; default DEFAULT_DELIVER_TO
    # Address to send from: auto | kernel | an address (etrnd.egress; README "egress").
    source: Annotated[str, AfterValidator(_check_source)] = "auto"

    @field_validator("etrn")
    @classmethod
    def _check_atrn(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("protocol") == "odmr":
            problems = []
            for domain in value:
                try:
                    check_atrn_domain(domain)
                except ValueError as exc:
                    problems.append(str(exc))
            if problems:
                raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _check(self) -> Relay:
        if (self.host is None) == (self.hosts is None):
            raise ValueError("give exactly one of host or hosts")
        if self.protocol == "etrn" and self.deliver_to is not None:
            raise ValueError("deliver_to only applies with protocol: odmr")
        if self.protocol == "odmr" and self.auth is None:
            raise ValueError("protocol: odmr needs auth (RFC 2645: ATRN only after AUTH)")
        # ODMR without TLS may still AUTH with CRAM-MD5, which never sends the password.
        if (self.auth is not None and self.tls == "none" and not self.auth.allow_plaintext
                and self.protocol != "odmr"):
            raise ValueError(
                "auth with tls: none would send the password in clear; "
                "use TLS or set auth.allow_plaintext: true"
            )
        if self.auth is not None and self.auth.allow_plaintext and self.tls != "none":
            raise ValueError("auth.allow_plaintext only applies with tls: none")
        if self.timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        return self

    @property
    def label(self) -> str:
        return self.name or self.all_hosts[0]

    @property
    def all_hosts(self) -> tuple[str, ...]:
        return self.hosts if self.hosts is not None else (self.host or "",)

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.protocol == "odmr":
            return 366  # RFC 2645 section 3, with or without implicit TLS
        return 465 if self.tls == "implicit" else 25

    @property
    def effective_deliver_to(self) -> DeliverTo:
        return self.deliver_to if self.deliver_to is not None else DEFAULT_DELIVER_TO


class Retry(_Model):
    first_delay: Duration = 5.0
    max_delay: Duration = 600.0
    factor: float = Field(default=2.0, ge=1.0, le=100.0)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    give_up_after: Duration = 7200.0

    @model_validator(mode="after")
    def _check(self) -> Retry:
        if self.first_delay <= 0:
            raise ValueError("first_delay must be greater than 0")
        if self.max_delay < self.first_delay:
            raise ValueError("max_delay must not be shorter than first_delay")
        return self


def _check_socket_path(value: Path) -> Path:
    # bind() raises ValueError, not OSError, on a NUL: the daemon would die with a traceback.
    if any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
        raise ValueError("must not contain control characters")
    return value


class Control(_Model):
    socket: Annotated[Path, AfterValidator(_check_socket_path)] = Path("/run/etrnd/control.sock")


class Log(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json", "journal"] = "auto"


class LocalMtaCheck(_Model):
    """Hold rounds until this MTA greets with 220 (etrnd.mtagate), at most max_wait."""

    address: DeliverTarget
    max_wait: Duration = 300.0


class Config(_Model):
    local_mta: Annotated[LocalMtaCheck | None, BeforeValidator(_local_mta_shorthand)] = None
    watch: Watch = Watch()
    relays: tuple[Relay, ...] = Field(min_length=1)
    retry: Retry = Retry()
    repeat: Duration = 0.0
    control: Control = Control()
    log: Log = Log()

    @model_validator(mode="after")
    def _check(self) -> Config:
        seen: set[str] = set()
        for relay in self.relays:
            if relay.label in seen:
                raise ValueError(f"relay name {relay.label!r} is used twice")
            seen.add(relay.label)
        return self

    def relay(self, name: str) -> Relay:
        for relay in self.relays:
            if relay.label == name:
                return relay
        known = ", ".join(r.label for r in self.relays)
        raise KeyError(f"no relay named {name!r} (configured: {known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:  # `? [a]: b` or `{a: 1}: b`: YAML allows it, no config key is one
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping",
                key_node.start_mark) from None
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """`-c FILE`, else `$ETRND_CONFIG`, else the system default."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_PATH


def _format_loc(loc: tuple[int | str, ...]) -> str:
    # Pydantic puts validator names (e.g. "function-after[...]") into some locations.
    parts = [_key(p) for p in loc if not (isinstance(p, str) and "[" in p)]
    return ".".join(parts) or "(top level)"


def _key(part: int | str) -> str:
    # An unknown key is the user's text: quote it when it is empty or holds a line break or
    # other control, so each problem stays one readable `key.path: reason` line.
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


# Pydantic's words for its own types (tuple, dict, model) mean nothing to someone writing
# YAML: say it in YAML's terms. Keyed by error type, so every field gets the same wording.
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "tuple_type": "should be a list, e.g. [a, b]",
    "list_type": "should be a list, e.g. [a, b]",
    "dict_type": "should be a mapping of keys (key: value)",
    "model_type": "should be a mapping of keys (key: value)",
}


def _problems(exc: ValidationError) -> Iterator[str]:
    errors = exc.errors(include_url=False, include_input=False)
    locs = [_format_loc(err["loc"]) for err in errors]
    for err, loc in zip(errors, locs, strict=True):
        # A list whose items failed also reports "too short": only the items' reasons help.
        if err["type"] == "too_short" and any(o.startswith(loc + ".") for o in locs):
            continue
        msg = _MESSAGES.get(err["type"], err["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        yield f"{loc}: {msg}"


def parse_config(data: object, *, defer_credentials: bool = False) -> Config:
    """Validate an already-parsed YAML document.

    With `defer_credentials`, a systemd credential that exists only inside the service is
    returned as an unread Secret instead of failing (check-config from a shell).
    """
    if data is None:
        raise ConfigError(["(top level): the file is empty; at least relays: is required"])
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of keys (watch, relays, retry, ...)"])
    try:
        return Config.model_validate(data, context={DEFER_CREDENTIALS: defer_credentials})
    except ValidationError as exc:
        raise ConfigError(list(_problems(exc))) from None


def parse_yaml(text: str, source: str = "<config>", *,
               defer_credentials: bool = False) -> Config:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: YAML syntax: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        # e.g. ReaderError (a control character): its text spans lines; a problem is one.
        raise ConfigError([f"{source}: YAML syntax: {' '.join(str(exc).split())}"]) from None
    except RecursionError:
        # PyYAML composes recursively: `[[[[...` a few thousand deep exhausts the stack.
        raise ConfigError([f"{source}: YAML syntax: nested too deeply"]) from None
    return parse_config(data, defer_credentials=defer_credentials)


def load_config(path: str | os.PathLike[str] | None = None, *,
                defer_credentials: bool = False) -> Config:
    """Read, parse and validate; every failure is a ConfigError with readable problems."""
    resolved = resolve_path(path)
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{resolved}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{resolved}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_yaml(text, str(resolved), defer_credentials=defer_credentials)
