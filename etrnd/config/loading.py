"""Load the config for run, send and reload: validated once, then remembered until it changes.

A full validation (etrnd.config.schema: PyYAML and pydantic, ~200 ms of imports) runs only
when the file, etrnd's version or etrnd/config's own code changed since the last one; its
result is kept as JSON in the state directory, without any password: a password is kept as
the file or credential name the config gave and read again at every load, by the same rules.
Whatever goes wrong with the cache means a full validation, never an error of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import stat
from dataclasses import fields, is_dataclass
from pathlib import Path

from etrnd import __version__
from etrnd.config.credentials import Secret, read_password
from etrnd.config.model import CLASSES, Config, ConfigError, resolve_path
from etrnd.config.values import DeliverTo

# Bump when the file's layout changes (the version and source hash cover the rest).
FORMAT = 1
_MAX_BYTES = 1 << 20
_CONFIG_DIR = Path(__file__).parent
# pydantic's version.py holds its VERSION (and pins pydantic_core's); PyYAML's __init__ its own.
VALIDATORS = (("pydantic", "version.py"), ("yaml", "__init__.py"))
# Validation reads nothing but the file and the password files (audited: no host names are
# resolved, no path but password_file is opened; $CREDENTIALS_DIRECTORY only locates a bare
# credential name). The passwords are read again at each load with the same function, so a
# change of either is seen without being part of the key.


def cache_dir() -> Path | None:
    """systemd's StateDirectory= (the image's state volume), else the user's cache dir."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "etrnd"
    home = os.path.expanduser("~")
    return Path(home) / ".cache" / "etrnd" if home.startswith("/") else None


def cache_file(config_path: Path) -> Path | None:
    """Where the validated copy of the config at `config_path` is kept (one per file)."""
    directory = cache_dir()
    if directory is None:
        return None
    name = hashlib.sha256(os.fsencode(os.path.abspath(config_path))).hexdigest()[:16]
    return directory / f"config-{name}.json"


def validator_files() -> list[Path]:
    """The files that say which pydantic and PyYAML validate (their version strings), found
    without importing either: an upgrade of the validator alone must validate again too."""
    found = []
    for package, name in VALIDATORS:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            found.append(Path(next(iter(spec.submodule_search_locations))) / name)
    return found


def cache_key(raw: bytes) -> str:
    """What a cached copy is valid for: these bytes, this etrnd, this etrnd/config code, this
    pydantic and PyYAML."""
    digest = hashlib.sha256(f"etrnd config cache {FORMAT} {__version__}\0".encode())
    for source in [*sorted(_CONFIG_DIR.glob("*.py")), *validator_files()]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    digest.update(hashlib.sha256(raw).digest())
    return digest.hexdigest()


def load_config(path: str | os.PathLike[str] | None = None, *,
                defer_credentials: bool = False) -> Config:
    """Read the config: from the cache when it holds this file's validated copy, else by a
    full validation (whose result is then cached). Raises ConfigError as the schema does.

    With `defer_credentials` (check-config) the file is always validated in full and the
    cache neither read nor written.
    """
    resolved = resolve_path(path)
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{resolved}: cannot read: {exc.strerror or exc}"]) from None
    where = None if defer_credentials else cache_file(resolved)
    key = ""
    if where is not None:
        try:
            key = cache_key(raw)
            config = _read(where, key)
        except (OSError, ValueError, TypeError, KeyError):
            config = None
        if config is not None:
            return config
    from etrnd.config.schema import validate_bytes  # pydantic and PyYAML: only on a miss

    config = validate_bytes(raw, resolved, defer_credentials=defer_credentials)
    if where is not None and key:
        # A read-only state directory, no home: validated again at the next start.
        with contextlib.suppress(OSError, TypeError, ValueError):
            _write(where, key, config)
    return config


def _read(where: Path, key: str) -> Config | None:
    """The cached Config for `key`, or None (absent, stale, not ours, or unreadable)."""
    # O_NONBLOCK: a FIFO put there must not hang the start.
    fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        # Only a file this user wrote and nobody else can have changed is believed.
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return None
        data = json.loads(file.read(_MAX_BYTES))  # a longer one is cut: not JSON, a miss
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    config = decode(data["config"])
    return config if isinstance(config, Config) else None


def _write(where: Path, key: str, config: Config) -> None:
    import tempfile  # a miss only

    text = json.dumps({"key": key, "config": encode(config)}, separators=(",", ":"))
    if not os.environ.get("STATE_DIRECTORY"):  # systemd makes that one, with its mode
        where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=where.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, where)  # atomic: a reader sees the old copy or the new one
    except BaseException:
        os.unlink(tmp)
        raise


def encode(value: object) -> object:
    """JSON for a config value; a dataclass tagged with its class, a password by its name."""
    if isinstance(value, Secret):
        if value.unread is not None or not value.written:
            raise ValueError("an unread secret is not cached")
        return {"@": "Secret", "written": value.written}
    if isinstance(value, Path):
        return {"@": "Path", "path": str(value)}
    if is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if CLASSES.get(name) is not type(value) and not isinstance(value, DeliverTo):
            raise TypeError(f"{name} is not a config class")
        return {"@": name, **{f.name: encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"{type(value).__name__} is not cached")


def decode(value: object) -> object:
    """The config value `encode` wrote; a password is read again (ValueError if it cannot
    be: the full validation then reports it in the config's words)."""
    if isinstance(value, list):
        return tuple(decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    tag = value.pop("@")
    if tag == "Secret":
        return read_password(value["written"])
    if tag == "Path":
        return Path(value["path"])
    cls = DeliverTo if tag == "DeliverTo" else CLASSES[tag]
    return cls(**{k: decode(v) for k, v in value.items()})
