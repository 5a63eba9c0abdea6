"""check-config's rules across relays: a relay watch (only_when_down) that can never be up."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Protocol


class Watch(Protocol):
    """What these rules read of a relay's effective watch (config.schema.Watch has it)."""

    @property
    def interfaces(self) -> tuple[str, ...]: ...
    @property
    def up_when(self) -> str: ...
    @property
    def family(self) -> str: ...

# How much each up_when asks of one interface: a stronger one implies every weaker one
# (etrnd.link.state: carrier, then an address, then a default route).
_STRENGTH = {"carrier": 0, "address": 1, "default-route": 2}
_GLOB = frozenset("*?[")


def _covers(theirs: tuple[str, ...], mine: tuple[str, ...]) -> bool:
    """Whether every interface name `mine` can match is matched by `theirs` (sound, not
    complete: a glob of mine is covered only by the same glob or by `*`)."""
    if not theirs:  # any interface but loopback
        return all(not fnmatchcase("lo", p) for p in mine) if mine else True
    if not mine:
        return "*" in theirs
    return all(any(fnmatchcase(p, q) for q in theirs) if not _GLOB & set(p)
               else (p in theirs or "*" in theirs) for p in mine)


def implies(mine: Watch, theirs: Watch) -> bool:
    """Whether `mine` being up means `theirs` is up too (on the same interface)."""
    if not _covers(theirs.interfaces, mine.interfaces):
        return False
    if _STRENGTH[mine.up_when] < _STRENGTH[theirs.up_when]:
        return False
    return theirs.up_when == "carrier" or theirs.family in ("any", mine.family)


def _describe(watch: Watch) -> str:
    ifaces = ", ".join(watch.interfaces) or "any interface"
    family = "" if watch.up_when == "carrier" else f" ({watch.family})"
    return f"{ifaces} up by {watch.up_when}{family}"


def problems(backs_up: Mapping[str, tuple[str, ...]], watches: Mapping[str, Watch]) -> list[str]:
    """`relays[NAME].watch...: reason` for each relay watch that can never be up: an
    only_when_down naming no relay or the relay itself, a cycle, or a link that is up only
    when the link it waits for is up too. `backs_up`: each relay's only_when_down, in the
    config's order; `watches`: each relay's effective watch (its own over the top level)."""
    found: list[str] = []
    names = list(backs_up)
    waits: dict[str, tuple[str, ...]] = {}
    for label, others in backs_up.items():
        key = f"relays[{label}].watch.only_when_down"
        for other in others:
            if other == label:
                found.append(f"{key}: names this relay itself: it would run only while its "
                             "own link is down, that is never")
            elif other not in names:
                found.append(f"{key}: no relay named {other!r} (configured: "
                             f"{', '.join(names)})")
            else:
                waits.setdefault(label, ())
                waits[label] += (other,)
                mine, theirs = watches[label], watches[other]
                if implies(mine, theirs):
                    found.append(
                        f"relays[{label}].watch: can never be up: it runs only while "
                        f"{other}'s link ({_describe(theirs)}) is down, and its own link "
                        f"({_describe(mine)}) is never up without that one")
    found.extend(_cycles(waits))
    return found


def _cycles(waits: Mapping[str, tuple[str, ...]]) -> list[str]:
    """One problem per cycle of only_when_down (a relay naming itself is reported apart)."""
    found, reported = [], set[frozenset[str]]()

    def walk(path: list[str]) -> None:
        for nxt in waits.get(path[-1], ()):
            if nxt == path[0] and len(path) > 1 and frozenset(path) not in reported:
                reported.add(frozenset(path))
                chain = " -> ".join([*path, nxt])
                found.append(f"relays[{path[0]}].watch.only_when_down: a cycle ({chain}): "
                             "while all these links are up none of these relays runs; only "
                             "the backup names the relay it stands in for")
            elif nxt not in path:
                walk([*path, nxt])

    for start in waits:
        walk([start])
    return found
