"""Relay passwords from files or systemd credentials (LoadCredential=); never printed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    `written` is `password_file` as the config wrote it: what the validated-config cache
    keeps, to read the password again at each load (etrnd.config.loading).
    """

    source: str
    value: str
    written: str = ""
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


def read_password(value: object, defer: bool = False) -> Secret:
    """The Secret `password_file: value` names, its file read now.

    With `defer` (check-config from a shell), a systemd credential present only inside the
    service is an unread Secret instead. Raises ValueError in the config's words.
    """
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a file path or a credential name")
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
                return Secret(source=value, value="", written=value, credential=value,
                              unread=why)
            raise ValueError(why + "; outside the service run: systemd-run --wait --pipe "
                             f"-p LoadCredential={value}:FILE etrnd ...")
        path = Path(cred_dir) / value
    if defer and cred is not None and cred[0] is not None and not path.exists():
        unit, name = cred
        return Secret(source=value, value="", written=value, credential=name, unit=unit,
                      unread=f"{path} exists only inside {unit}")
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    password = check_password_text(raw, str(path))
    return Secret(source=str(path), value=password, written=value,
                  credential=cred[1] if cred else None, notice=password_notice(password))


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
