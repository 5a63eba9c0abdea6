"""Validate the YAML configuration with pydantic (whose descriptions are the man page)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

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

from etrnd.config import failover, model, yamlsource
from etrnd.config.credentials import DEFER_CREDENTIALS, Secret, read_password
from etrnd.config.model import ConfigError, resolve_path
from etrnd.config.problems import problems
from etrnd.config.values import (
    DeliverTo,
    check_atrn_domain,
    check_etrn_argument,
    check_hostname,
    check_ifname,
    check_listen,
    check_server,
    check_source,
    no_blank_or_control,
    parse_deliver_to,
    parse_duration,
    parse_size,
)
from etrnd.config.yamlsource import Document

# The runtime classes (etrnd.config.model) repeat these models' field names and defaults:
# change both (tests/config/test_model.py compares them).


def _local_mta_shorthand(value: object) -> object:
    # `local_mta: 127.0.0.1:25` is `local_mta: {address: 127.0.0.1:25}`.
    return {"address": value} if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
EtrnArgument = Annotated[str, AfterValidator(check_etrn_argument)]
HostName = Annotated[str, AfterValidator(check_hostname)]
ServerName = Annotated[str, AfterValidator(check_server)]  # connect() takes no [literal]
WireToken = Annotated[str, AfterValidator(no_blank_or_control)]
InterfacePattern = Annotated[str, AfterValidator(check_ifname)]
# Dumped as its source path so model_dump()/JSON status can never carry the password.
DeliverTarget = Annotated[
    DeliverTo, BeforeValidator(parse_deliver_to), PlainSerializer(str, return_type=str)
]


def validate_password(value: object, info: ValidationInfo) -> Secret:
    """`password_file:` read (etrnd.config.credentials.read_password) in pydantic's context."""
    return read_password(value, bool(info.context and info.context.get(DEFER_CREDENTIALS)))


Password = Annotated[
    Secret, BeforeValidator(validate_password), PlainSerializer(lambda s: s.source, return_type=str)
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class Watch(_Model):
    interfaces: tuple[InterfacePattern, ...] = Field(default=(), description=(
        "The WAN: interface names or shell globs (`ppp0`, `wwan*`), followed by name, so an "
        "interface that vanishes and comes back with a new index is the same WAN. Empty: any "
        "interface."))
    up_when: Literal["carrier", "address", "default-route"] = Field(
        default="default-route", description=(
            "When the link counts as up. `carrier`: admin up and lower up, and the operstate "
            "not DORMANT, TESTING or NOTPRESENT. `address`: that, and a usable global address "
            "of `family`. `default-route`: that, and a default route through the interface "
            "(through any interface when `interfaces` is empty)."))
    family: Literal["ipv4", "ipv6", "any"] = Field(default="any", description=(
        "The address family that `address` and `default-route` look at."))
    settle: Duration = Field(default=2.0, description=(
        "Wait this long after the link comes up before the first round; a down within it "
        "cancels the round."))
    min_interval: Duration = Field(default=30.0, description=(
        "Never start two link-up rounds closer together than this: a later link-up's round "
        "waits until then."))
    # 5 s: longer than the gaps real clients leave while the line stays up (dhcpcd and
    # udhcpc change a gateway by delete+add 157 µs apart; dhcpcd deletes the IPv6 default
    # for ~3.1 s on each RA, its issue 244), and no longer than retry.first_delay's default,
    # so a real outage cancels the round's retries before more than one more try is wasted.
    down_hold: Duration = Field(default=5.0, description=(
        "A down undone within this time is a blip, not a down: nothing is cancelled and no "
        "new round starts (logged at debug as link_blip). A longer down is acted on when the "
        "hold ends, dated from when it began. 0 acts on every down at once. An IPv6 default "
        "route whose router lifetime runs out is a down at once, without this hold."))


def _names(value: object) -> object:
    # `only_when_down: fiber` is `only_when_down: [fiber]`.
    return (value,) if isinstance(value, str) else value


class RelayWatch(_Model):
    """A relay's own link (`relays[].watch`): each key left out is the top-level watch's."""

    interfaces: tuple[InterfacePattern, ...] | None = Field(default=None, description=(
        "This relay's interfaces (names or shell globs; [] = any interface). "
        "Default: the top-level watch.interfaces."))
    up_when: Literal["carrier", "address", "default-route"] | None = Field(
        default=None, description="Default: the top-level watch.up_when.")
    family: Literal["ipv4", "ipv6", "any"] | None = Field(
        default=None, description="Default: the top-level watch.family.")
    settle: Duration | None = Field(default=None, description=(
        "Wait after this relay may run (its link up, or the link it backs up down) before "
        "its round. Default: the top-level watch.settle."))
    min_interval: Duration | None = Field(
        default=None, description="Default: the top-level watch.min_interval.")
    down_hold: Duration | None = Field(
        default=None, description="Default: the top-level watch.down_hold.")
    only_when_down: Annotated[tuple[WireToken, ...], BeforeValidator(_names)] = Field(
        default=(), description=(
            "Failover: run this relay only while the link of each relay named here is down "
            "(after that link's down_hold). When one of those links is up again, this "
            "relay's round is cancelled as on its own link-down."))


class Auth(_Model):
    username: WireToken = Field(description="The AUTH user name.")
    password_file: Password = Field(description=(
        "The file that holds the password on one line: a path, or a bare name looked up in "
        "`$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`, the image's /run/secrets)."))
    allow_plaintext: bool = Field(default=False, description=(
        "Allow AUTH without TLS, which sends the password in clear; only with `tls: none`."))


TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]


class Relay(_Model):
    name: WireToken | None = Field(default=None, description=(
        "The relay's name in the log, `etrnd status` and `--relay`. Default: its (first) host."))
    protocol: Literal["etrn", "odmr"] = Field(default="etrn", description=(
        "`etrn`: ask the relay to start delivering its queue to the office (RFC 1985). `odmr`: "
        "authenticate, send ATRN and take the mail over this connection, relaying each message "
        "to `deliver_to` (RFC 2645)."))
    host: ServerName | None = Field(default=None, description=(
        "The relay's host name (the one on its certificate) or address. Give `host` or "
        "`hosts`."))
    hosts: tuple[ServerName, ...] | None = Field(default=None, min_length=1, description=(
        "Several hosts of one relay, tried in order; after a failure the next one is tried "
        "first. Give `host` or `hosts`."))
    port: int | None = Field(default=None, ge=1, le=65535, description=(
        "The TCP port. Default: 25; 465 with `tls: implicit`; 366 with `protocol: odmr`."))
    tls: TlsMode = Field(default="opportunistic", description=(
        "`none`: never. `opportunistic`: STARTTLS when the server offers it. `starttls`: "
        "STARTTLS or nothing is sent. `implicit`: TLS from the connect (port 465)."))
    verify: bool = Field(default=True, description=(
        "Check the certificate and that it names the host, whenever TLS is used."))
    helo: HostName | None = Field(default=None, description=(
        "The name etrnd gives in EHLO. Default: this machine's FQDN (looked up once at start, "
        "for at most 2 s; the host name until then)."))
    auth: Auth | None = Field(default=None, description=(
        "SMTP AUTH (RFC 4954) before ETRN or ATRN; required with `protocol: odmr`. Never sent "
        "without TLS unless `tls: none` and `allow_plaintext: true` (ODMR without TLS uses only "
        "CRAM-MD5, which does not send the password)."))
    timeout: Duration = Field(default=30.0, description=(
        "The bound of each SMTP step (connect, greeting, each command); with ODMR also the "
        "longest silence of the provider after the turnaround."))
    etrn: tuple[EtrnArgument, ...] = Field(min_length=1, description=(
        "What to ask for. ETRN: a node name, `@domain` (the domain and its subdomains) or "
        "`#queue`. ODMR: plain domains for ATRN. White space, control characters and names a "
        "server would refuse as syntax are rejected when the file is loaded."))
    deliver_to: DeliverTarget | None = Field(default=None, description=(
        "ODMR only: the office MTA that takes the mail, `HOST:PORT` (SMTP), `lmtp:HOST:PORT` or "
        "`lmtp:/path/to/socket` (LMTP). Default: 127.0.0.1:25."))
    max_message_size: Size | None = Field(default=None, description=(
        "ODMR only: the largest message taken from the provider, in octets (or 25M, 50MiB); "
        "advertised to it as SIZE (RFC 1870); a larger one is refused with 552. Default: the "
        "office MTA's own EHLO SIZE, or no limit when it has none. DATA is streamed to the "
        "office MTA, so this is not a memory bound."))
    source: Annotated[str, AfterValidator(check_source)] = Field(default="auto", description=(
        "The address to send from. `auto`: the address of the interface that made this "
        "relay's link up, when the kernel routes packets from it through that interface, else "
        "the kernel's choice. `kernel`: "
        "never bind. An address: always send from it. A route through another interface than "
        "the one that is up logs etrn_egress_mismatch either way."))
    watch: RelayWatch | None = Field(default=None, description=(
        "This relay's own link, e.g. {interfaces: [wwan0], only_when_down: fiber}; "
        "keys left out, or no watch at all, mean the top-level watch's."))

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
        if self.protocol == "etrn" and self.max_message_size is not None:
            raise ValueError("max_message_size only applies with protocol: odmr")
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



class Retry(_Model):
    first_delay: Duration = Field(default=5.0, description=(
        "The first retry after a transient failure (connect, TLS, time-out, 4xx)."))
    max_delay: Duration = Field(default=600.0, description="The longest wait between tries.")
    factor: float = Field(default=2.0, ge=1.0, le=100.0, description=(
        "Each wait is the previous one times this."))
    jitter: float = Field(default=0.2, ge=0.0, le=1.0, description=(
        "Each wait varies by up to this fraction either way, so that many gateways do not "
        "retry in step."))
    give_up_after: Duration = Field(default=7200.0, description=(
        "Stop retrying a round after this long (etrn_gave_up); 0: never, while the link is up."))

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
    socket: Annotated[Path, AfterValidator(_check_socket_path)] = Field(
        default=Path("/run/etrnd/control.sock"), description=(
            "The unix socket that `etrnd status` and `etrnd trigger` talk to (mode 0660)."))


class Log(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description=(
        "The least severe level logged; `debug` adds the SMTP dialogue, AUTH redacted."))
    format: Literal["auto", "console", "json", "journal"] = Field(default="auto", description=(
        "`console`: one readable line an event. `json`: one object a line. `journal`: native "
        "journal fields. `auto`: the journal when standard error is systemd's journal stream, "
        "the console on a terminal, else JSON."))


class LocalMtaCheck(_Model):
    """Hold rounds until this MTA greets with 220 (etrnd.service.mtagate), at most max_wait."""

    address: DeliverTarget = Field(description=(
        "The office MTA, `HOST:PORT` or `lmtp:...` as for `deliver_to`; probed once a second "
        "until it greets with 220."))
    max_wait: Duration = Field(default=300.0, description=(
        "After this long the round goes ahead anyway (local_mta_wait_gave_up)."))


class Metrics(_Model):
    """Prometheus exposition over HTTP (etrnd.outputs.metrics); absent = off, at no cost."""

    listen: Annotated[str, AfterValidator(check_listen)] = Field(
        default="127.0.0.1:9469", description=(
            "ADDRESS:PORT to serve GET /metrics on, e.g. 127.0.0.1:9469 or [::1]:9469. No "
            "authentication: keep it on loopback or a management network."))


class Health(_Model):
    """Thresholds of `etrnd check` and of the `health` in `etrnd status --json`."""

    warning_after: Duration = Field(
        default=900.0,
        description="WARNING when the link has been up this long without a relay's round "
                    "being accepted (counted from the link-up, or from the relay's first "
                    "failure if later); 0 = never")
    critical_after: Duration = Field(
        default=3600.0,
        description="CRITICAL when the link has been up this long without a relay's round "
                    "being accepted; 0 = never")

    @model_validator(mode="after")
    def _check(self) -> Health:
        if self.warning_after < 0 or self.critical_after < 0:
            raise ValueError("thresholds must not be negative")
        if self.warning_after and self.critical_after and self.critical_after < self.warning_after:
            raise ValueError("critical_after must not be shorter than warning_after")
        return self


class Config(_Model):
    local_mta: Annotated[LocalMtaCheck | None, BeforeValidator(_local_mta_shorthand)] = Field(
        default=None, description=(
            "Hold every round until the office's own MTA greets with 220, so the ISP does not "
            "deliver into a closed door at boot. `local_mta: HOST:PORT` is short for "
            "`local_mta: {address: HOST:PORT}`."))
    watch: Watch = Field(default=Watch(), description=(
        "Which interfaces make up the WAN, and when it counts as up."))
    relays: tuple[Relay, ...] = Field(min_length=1, description=(
        "The servers to ask for the mail: at least one, each with its own protocol, hosts, TLS "
        "and arguments."))
    retry: Retry = Field(default=Retry(), description=(
        "Backoff after transient failures, per relay and round."))
    repeat: Duration = Field(default=0.0, description=(
        "While the link stays up, start a new round this often; 0: only on link-up."))
    control: Control = Field(default=Control(), description="The control socket.")
    log: Log = Field(default=Log(), description="What is logged, and how.")
    metrics: Metrics | None = Field(default=None, description=(
        "Prometheus metrics over HTTP (docs/metrics.md); off, and nothing loaded, when absent."))
    health: Health = Field(default=Health(), description=(
        "Thresholds of `etrnd check` and of the `health` in `etrnd status --json`."))



RUNTIME: dict[type[BaseModel], type] = {
    Config: model.Config, Watch: model.Watch, RelayWatch: model.RelayWatch, Relay: model.Relay,
    Auth: model.Auth, Retry: model.Retry, Control: model.Control, Log: model.Log,
    LocalMtaCheck: model.LocalMtaCheck, Metrics: model.Metrics, Health: model.Health}


def runtime(value: object) -> object:
    """`value` with each of these models turned into its etrnd.config.model dataclass."""
    if isinstance(value, BaseModel):
        return RUNTIME[type(value)](
            **{name: runtime(getattr(value, name)) for name in type(value).model_fields})
    if isinstance(value, tuple):
        return tuple(runtime(v) for v in value)
    return value


def parse_config(data: object, *, defer_credentials: bool = False,
                 document: Document | None = None) -> model.Config:
    """Validate an already-parsed YAML document (`document`: where each value was written).

    With `defer_credentials`, a systemd credential that exists only inside the service is
    returned as an unread Secret instead of failing (check-config from a shell).
    """
    if data is None:
        raise ConfigError(["(top level): the file is empty; at least relays: is required"])
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of keys (watch, relays, retry, ...)"])
    try:
        config = Config.model_validate(data, context={DEFER_CREDENTIALS: defer_credentials})
    except ValidationError as exc:
        raise ConfigError(list(problems(exc, document, data, Config))) from None
    converted = runtime(config)
    assert isinstance(converted, model.Config)
    # Across relays, on the runtime model (its `label` is the one name rule): a name used
    # twice, then a relay watch that can never be up.
    labels = [r.label for r in converted.relays]
    twice = dict.fromkeys(name for i, name in enumerate(labels) if name in labels[:i])
    if twice:
        raise ConfigError([f"(top level): relay name {name!r} is used twice" for name in twice])
    found = failover.problems(
        {r.label: (r.watch.only_when_down if r.watch is not None else ())
         for r in converted.relays},
        {r.label: converted.watch_of(r) for r in converted.relays})
    if found:
        raise ConfigError(found)
    return converted


def parse_yaml(text: str, source: str = "<config>", *,
               defer_credentials: bool = False) -> model.Config:
    try:
        document = yamlsource.read(text, source)
    except yamlsource.YamlError as exc:
        raise ConfigError([exc.problem]) from None
    return parse_config(document.data, defer_credentials=defer_credentials, document=document)


def validate_file(path: str | os.PathLike[str] | None = None, *,
                  defer_credentials: bool = False) -> model.Config:
    """Read, parse and validate the file, every time (etrnd.config.loading.load_config
    remembers the result); every failure is a ConfigError with readable problems."""
    resolved = resolve_path(path)
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{resolved}: cannot read: {exc.strerror or exc}"]) from None
    return validate_bytes(raw, resolved, defer_credentials=defer_credentials)


def validate_bytes(raw: bytes, resolved: Path, *,
                   defer_credentials: bool = False) -> model.Config:
    """Parse and validate the file's bytes as read from `resolved`."""
    try:
        text = yamlsource.decode(raw, str(resolved))
    except yamlsource.YamlError as exc:
        raise ConfigError([exc.problem]) from None
    return parse_yaml(text, str(resolved), defer_credentials=defer_credentials)


def watch_with(base: model.Watch, overrides: dict[str, object]) -> model.Watch:
    """`base` with `overrides` (the watcher's command line), validated as the file's `watch:`
    is; ConfigError with `key: reason` problems."""
    data = {f: getattr(base, f) for f in Watch.model_fields} | overrides
    try:
        watch = Watch.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(list(problems(exc, None, data, Watch))) from None
    converted = runtime(watch)
    assert isinstance(converted, model.Watch)
    return converted
