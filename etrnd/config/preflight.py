"""Load the config for a command: problems and unchecked secrets reported, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from etrnd.config.credentials import Secret, check_password_text, password_notice
from etrnd.config.loading import load_config
from etrnd.config.model import Config, ConfigError, key_path, resolve_path
from etrnd.outputs.logs import get_logger

EXIT_CONFIG = 2
# The unit the README installs; a credential named in the config is looked up in it.
UNIT = "etrnd.service"


def _err(message: str) -> None:
    print(f"etrnd: {message}", file=sys.stderr)


def load_or_report(path: str | None, *, defer_credentials: bool = False) -> Config | None:
    """Load the config, or print every problem (no traceback) and return None.

    `defer_credentials` is for check-config only: a systemd credential that exists only inside
    the service is then left unread (see `check_secrets`) instead of being a problem.
    """
    try:
        return load_config(path, defer_credentials=defer_credentials)
    except ConfigError as exc:
        report(path, exc.problems)
        return None


def report(path: str | None, problems: list[str], why: str = "") -> None:
    """Print `problems` (each `key.path: reason`) under the config's path, to stderr."""
    _err(f"invalid configuration {resolve_path(path)}{f' ({why})' if why else ''}:")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


@dataclass(frozen=True)
class Finding:
    """What check-config learnt about one secret: `problem` fails the check, a note does not."""

    key: str
    text: str
    problem: bool = False


def check_secrets(config: Config) -> list[Finding]:
    """Findings for every secret the config could not read here (a credential outside its unit).

    Such a credential is looked up where systemd would load it from: the unit's
    `LoadCredential=NAME:FILE` (asked of systemd over D-Bus, so drop-ins count). A missing FILE, an
    empty or multi-line one, or no such LoadCredential= is a problem (the service could not
    start or authenticate); a FILE this user may not read, or no systemd, is only a note.
    """
    findings = []
    for i, relay in enumerate(config.relays):
        if relay.auth is None:
            continue
        key = key_path(("relays", i, "auth", "password_file"), {i: relay.label})
        secret = relay.auth.password_file
        if secret.unread is not None:
            findings.append(_check_credential(key, secret))
        elif secret.notice is not None:
            findings.append(Finding(key, f"notice: {secret.source}: {secret.notice}"))
    return findings


def warn_secrets(config: Config) -> None:
    """Log `password_white_space` (warning: file, never the value) for each secret that may be
    a mistake, at the start of `run` and `send`: AUTH would fail with no other clue."""
    for relay in config.relays:
        secret = relay.auth.password_file if relay.auth is not None else None
        if secret is not None and secret.notice is not None:
            get_logger().warning("password_white_space", relay=relay.label,
                                 file=secret.source, text=secret.notice)


def _check_credential(key: str, secret: Secret) -> Finding:
    name = secret.credential or secret.source
    unit = secret.unit or UNIT
    why = f"not checked: {secret.unread}"
    loaded = unit_credentials(unit)
    if isinstance(loaded, str):
        return Finding(key, f"{why}; {loaded}")
    source = loaded.get(name)
    if source is None:
        return Finding(key, f"{unit} has no LoadCredential={name}:FILE, so the service "
                            f"would not find credential {name!r}", problem=True)
    if not source.startswith("/"):
        return Finding(key, f"{why}; {unit} loads it from the credential store ({source!r})")
    try:
        text = Path(source).read_text(encoding="utf-8")
    except PermissionError:
        return Finding(key, f"{why}; {unit} loads it from {source}, which this user cannot "
                            "read (run check-config as root to check it)")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        return Finding(key, f"{unit} loads credential {name!r} from {source}: cannot read: "
                            f"{reason}; the service would not start", problem=True)
    try:
        password = check_password_text(text, source)
    except ValueError as exc:
        return Finding(key, f"credential {name!r} of {unit}: {exc}", problem=True)
    notice = password_notice(password)
    if notice is not None:
        return Finding(key, f"notice: credential {name!r}: {unit} loads it from {source}: "
                            f"{notice}")
    return Finding(key, f"credential {name!r}: {unit} loads it from {source}: readable, "
                        "one line")


def _bus_path(unit: str) -> str:
    # sd_bus_path_encode(): every byte but [A-Za-z0-9] (and a leading digit) becomes _XX.
    encoded = "".join(c if c.isascii() and c.isalnum() and (i or not c.isdigit())
                      else "".join(f"_{b:02x}" for b in c.encode()) for i, c in enumerate(unit))
    return "/org/freedesktop/systemd1/unit/" + (encoded or "_")


def _unit_property(unit: str, interface: str, prop: str) -> object:
    """One property of `unit` from systemd over D-Bus (busctl); loads the unit if need be.

    `systemctl show` prints LoadCredential= as "[unprintable]" in systemd 252, hence busctl.
    Raises OSError (no busctl), subprocess.TimeoutExpired or RuntimeError (systemd said no).
    """
    res = subprocess.run(
        ["busctl", "--json=short", "get-property", "org.freedesktop.systemd1",
         _bus_path(unit), f"org.freedesktop.systemd1.{interface}", prop],
        capture_output=True, text=True, timeout=10, check=False,
    )
    if res.returncode != 0:
        raise RuntimeError((res.stderr.strip().splitlines() or ["busctl failed"])[0])
    return json.loads(res.stdout)["data"]


def unit_credentials(unit: str) -> dict[str, str] | str:
    """The unit's `LoadCredential=` as {name: source}, or why systemd could not tell."""
    try:
        state = _unit_property(unit, "Unit", "LoadState")
        if state != "loaded":
            return f"{unit} is not installed ({state})"
        pairs = _unit_property(unit, "Service", "LoadCredential")
    except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        return f"systemd could not say where {unit} loads it from ({exc})"
    if not isinstance(pairs, list):
        return f"systemd could not say where {unit} loads it from (got {pairs!r})"
    return {str(name): str(source) for name, source in pairs}


def unit_runtime_directories(unit: str) -> list[str] | str:
    """The unit's `RuntimeDirectory=` names (made under /run at start), or why systemd could
    not tell."""
    try:
        if _unit_property(unit, "Unit", "LoadState") != "loaded":
            return f"{unit} is not installed"
        names = _unit_property(unit, "Service", "RuntimeDirectory")
    except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        return f"systemd could not tell: {exc}"
    return [str(n) for n in names] if isinstance(names, list) else []


__all__ = ["EXIT_CONFIG", "UNIT", "Finding", "check_secrets", "load_or_report", "report",
           "unit_credentials", "unit_runtime_directories", "warn_secrets"]
