"""The validated config as etrnd runs by it: frozen dataclasses, no pydantic, cheap to import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from etrnd.config.credentials import Secret
from etrnd.config.values import DEFAULT_DELIVER_TO, DeliverTo

# The field lists below are written twice: here (what run and send import: no pydantic,
# ~2 ms) and in etrnd.config.schema (the pydantic models that validate the file and whose
# descriptions are the man page). tests/config/test_model.py fails when names, order or
# defaults differ. Everything checked lives in the schema; these classes only hold values.
# Each has a docstring: without one, @dataclass builds it from inspect.signature at import.

DEFAULT_PATH = Path("/etc/etrnd/etrnd.yaml")
ENV_CONFIG = "ETRND_CONFIG"

UpWhen = Literal["carrier", "address", "default-route"]
Family = Literal["ipv4", "ipv6", "any"]
TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]


class ConfigError(Exception):
    """Every problem found in a config file, each as `key.path: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """`-c FILE`, else `$ETRND_CONFIG`, else the system default."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_PATH


def key_path(loc: tuple[int | str, ...], names: Mapping[int, str]) -> str:
    """`relays[isp].auth.username` for ('relays', 0, 'auth', 'username')."""
    out = ""
    for i, part in enumerate(loc):
        if i == 1 and loc[0] == "relays" and isinstance(part, int) and part in names:
            out += f"[{_key(names[part])}]"
        else:
            out += ("." if out else "") + _key(part)
    return out or "(top level)"


def _key(part: int | str) -> str:
    # An unknown key is the user's text: quote it when it is empty or holds a line break or
    # other control, so each problem stays one readable `key.path: reason` line.
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class Watch:
    """Which interfaces make up the WAN, and when it counts as up (`watch:`)."""

    interfaces: tuple[str, ...] = ()
    up_when: UpWhen = "default-route"
    family: Family = "any"
    settle: float = 2.0
    min_interval: float = 30.0
    down_hold: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayWatch:
    """A relay's own link (`relays[].watch`): each key left out (None) is the top-level's."""

    interfaces: tuple[str, ...] | None = None
    up_when: UpWhen | None = None
    family: Family | None = None
    settle: float | None = None
    min_interval: float | None = None
    down_hold: float | None = None
    only_when_down: tuple[str, ...] = ()

    def over(self, top: Watch) -> Watch:
        """The watch this relay runs by: its own keys over the top-level ones."""
        mine = {f.name: v for f in fields(Watch) if (v := getattr(self, f.name)) is not None}
        return replace(top, **mine)


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """SMTP AUTH of a relay: the password read from its file (never printed)."""

    username: str
    password_file: Secret
    allow_plaintext: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Relay:
    """One server to ask for the mail (`relays[]`)."""

    name: str | None = None
    protocol: Literal["etrn", "odmr"] = "etrn"
    host: str | None = None
    hosts: tuple[str, ...] | None = None
    port: int | None = None
    tls: TlsMode = "opportunistic"
    verify: bool = True
    helo: str | None = None
    auth: Auth | None = None
    timeout: float = 30.0
    etrn: tuple[str, ...]
    deliver_to: DeliverTo | None = None
    max_message_size: int | None = None
    source: str = "auto"
    watch: RelayWatch | None = None

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Backoff after transient failures, per relay and round (seconds)."""

    first_delay: float = 5.0
    max_delay: float = 600.0
    factor: float = 2.0
    jitter: float = 0.2
    give_up_after: float = 7200.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """The control socket of `etrnd status` and `etrnd trigger`."""

    socket: Path = Path("/run/etrnd/control.sock")


@dataclass(frozen=True, slots=True, kw_only=True)
class Log:
    """What is logged, and how."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json", "journal"] = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalMtaCheck:
    """Hold rounds until this MTA greets with 220 (etrnd.service.mtagate), at most max_wait."""

    address: DeliverTo
    max_wait: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    """Prometheus exposition over HTTP (etrnd.outputs.metrics); absent = off."""

    listen: str = "127.0.0.1:9469"


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """Thresholds of `etrnd check` (seconds; 0 = never)."""

    warning_after: float = 900.0
    critical_after: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated file."""

    local_mta: LocalMtaCheck | None = None
    watch: Watch = Watch()
    relays: tuple[Relay, ...]
    retry: Retry = Retry()
    repeat: float = 0.0
    control: Control = Control()
    log: Log = Log()
    metrics: Metrics | None = None
    health: Health = Health()

    def watch_of(self, relay: Relay) -> Watch:
        """The watch `relay` runs by (its own `watch:` over the top-level one)."""
        return self.watch if relay.watch is None else relay.watch.over(self.watch)

    def relay(self, name: str) -> Relay:
        """The relay labelled `name`; KeyError naming the configured ones otherwise."""
        for relay in self.relays:
            if relay.label == name:
                return relay
        known = ", ".join(r.label for r in self.relays)
        raise KeyError(f"no relay named {name!r} (configured: {known})")


# Every class of the config tree, by name: the schema's models map onto these, and the
# validated-config cache names them so.
CLASSES: dict[str, type] = {c.__name__: c for c in (
    Config, Watch, RelayWatch, Relay, Auth, Retry, Control, Log, LocalMtaCheck, Metrics,
    Health)}
