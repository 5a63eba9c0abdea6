"""check-config's warnings: a valid config that will not work here, or not as meant."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

from etrnd.config.model import Config, Relay, key_path
from etrnd.config.preflight import UNIT, unit_runtime_directories
from etrnd.config.values import split_listen

# Names reserved for examples that never resolve (RFC 2606 sections 2 and 3). `.test` is
# left out on purpose: labs (this suite's too) use it for names they do resolve.
_EXAMPLE_DOMAINS = ("example.com", "example.net", "example.org")
_EXAMPLE_TLDS = ("example", "invalid")
# Values of config/etrnd.example.yaml that are no reserved name but still the example's.
_EXAMPLE_VALUES = ("#office-queue",)
_IMPLICIT_PORT = 465
_ODMR_PORT = 366  # RFC 2645 section 3
_SHOWN_INTERFACES = 8


def is_placeholder(name: str) -> bool:
    """A host name or ETRN argument from the example (a reserved example name)."""
    if name in _EXAMPLE_VALUES:
        return True
    bare = name.lstrip("@#").rstrip(".").lower()
    return (bare.rsplit(".", 1)[-1] in _EXAMPLE_TLDS
            or any(bare == d or bare.endswith("." + d) for d in _EXAMPLE_DOMAINS))


def warnings(config: Config) -> list[str]:
    """Each warning as `key.path: what and why`; none of them stops the config loading."""
    found = list(_placeholders(config))
    for i, relay in enumerate(config.relays):
        found.extend(_ports(relay, _path(config, i)))
        found.extend(_password_file(relay, _path(config, i)))
    found.extend(_interfaces(config))
    found.extend(_control_socket(config))
    found.extend(_metrics(config))
    return found


def _metrics(config: Config) -> Iterator[str]:
    if config.metrics is None:
        return
    host, port = split_listen(config.metrics.listen)
    if host in ("0.0.0.0", "::"):  # noqa: S104 - what we warn about
        yield (f"metrics.listen: {config.metrics.listen} serves the metrics on every address, "
               "the WAN's too, without authentication; give 127.0.0.1, [::1] or a "
               f"management network's address (e.g. 127.0.0.1:{port})")


def _path(config: Config, i: int, *keys: str) -> str:
    return key_path(("relays", i, *keys), {i: config.relays[i].label})


def _placeholders(config: Config) -> Iterator[str]:
    for i, relay in enumerate(config.relays):
        key = _path(config, i, "hosts" if relay.hosts is not None else "host")
        hosts = [h for h in relay.all_hosts if is_placeholder(h)]
        if hosts:
            yield (f"{key}: {', '.join(hosts)} is a placeholder (reserved example names never "
                   "resolve, RFC 2606): put your provider's relay")
        if relay.helo is not None and is_placeholder(relay.helo):
            yield (f"{_path(config, i, 'helo')}: {relay.helo} is a placeholder: put this "
                   "gateway's name as your provider knows it, or leave helo out (the FQDN)")
        args = [a for a in relay.etrn if is_placeholder(a)]
        if args:
            what = "domains" if relay.protocol == "odmr" else "@domains, nodes or #queues"
            yield (f"{_path(config, i, 'etrn')}: {', '.join(args)} "
                   f"{'is' if len(args) == 1 else 'are'} the example's placeholder"
                   f"{'' if len(args) == 1 else 's'}: put your own {what}")


def _ports(relay: Relay, key: str) -> Iterator[str]:
    if relay.port != 25:
        return
    if relay.tls == "implicit":
        yield (f"{key}.port: 25 with tls: implicit: port 25 starts in plain text, so the TLS "
               f"handshake fails; use port {_IMPLICIT_PORT}, or tls: starttls on port 25")
    if relay.protocol == "odmr":
        yield (f"{key}.port: 25 with protocol: odmr: providers take ATRN on port {_ODMR_PORT} "
               "(RFC 2645) and answer it on 25 with 502; leave port out or set 366")


def _password_file(relay: Relay, key: str) -> Iterator[str]:
    secret = relay.auth.password_file if relay.auth is not None else None
    if secret is None or secret.credential is not None or secret.unread is not None:
        return  # a credential: systemd hands it to the unit's user, whoever owns the file
    path = Path(secret.source)
    for each in (path, *path.parents):
        try:
            st = each.stat()
        except OSError:
            return
        need, bit = ("read", 0o004) if each == path else ("enter", 0o001)
        # DynamicUser= is neither the owner nor in the file's group: only "other" counts.
        if st.st_uid == 0 and not st.st_mode & bit and not (st.st_gid and st.st_mode & bit * 8):
            what = "it" if each == path else f"its directory {each}"
            yield (f"{key}.auth.password_file: only root may {need} {what} (mode "
                   f"{st.st_mode & 0o7777:04o}), so the unit's DynamicUser= cannot read "
                   f"{path}; make it a credential: LoadCredential={_name(relay)}:{path} in "
                   f"the unit and password_file: {_name(relay)}")
            return


def _name(relay: Relay) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in relay.label)


def _interfaces(config: Config) -> Iterator[str]:
    # The top-level watch and each relay's own (docs/two-lines.md).
    watched = [("watch.interfaces", config.watch.interfaces)]
    watched += [(f"{_path(config, i)}.watch.interfaces", relay.watch.interfaces)
                for i, relay in enumerate(config.relays)
                if relay.watch is not None and relay.watch.interfaces]
    if not any(patterns for _, patterns in watched):
        return
    try:
        present = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return
    shown = [*present[:_SHOWN_INTERFACES], "..."] if len(present) > _SHOWN_INTERFACES \
        else present
    for key, patterns in watched:
        missing = [p for p in patterns if not any(fnmatchcase(n, p) for n in present)]
        if missing:
            yield (f"{key}: {', '.join(missing)} "
                   f"{'matches' if len(missing) == 1 else 'match'} no interface now (present: "
                   f"{', '.join(shown) or 'none'}); right if it appears with the link (ppp, "
                   "a modem), else a typo: no round would ever start")


def _control_socket(config: Config) -> Iterator[str]:
    directory = config.control.socket.parent
    if directory.is_dir():
        return
    made = unit_runtime_directories(UNIT)
    if (isinstance(made, list) and directory.parent == Path("/run")
            and directory.name in made):
        return  # the unit's RuntimeDirectory= makes it when the service starts
    if directory.parent != Path("/run"):
        # RuntimeDirectory= makes directories under /run only: no hint about it elsewhere.
        yield (f"control.socket: directory {directory} does not exist: run fails to create "
               "the socket unless it is made first")
        return
    if isinstance(made, list):
        made = f"{UNIT} has " + (f"RuntimeDirectory={' '.join(made)}" if made else "none")
    yield (f"control.socket: directory {directory} does not exist: run fails to create the "
           f"socket unless it is made first (a unit's RuntimeDirectory={directory.name} "
           f"does; {made})")


__all__ = ["is_placeholder", "warnings"]
