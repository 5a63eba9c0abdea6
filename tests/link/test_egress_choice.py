"""The egress decision (etrnd.link.egress.choose): pure, no network."""

from __future__ import annotations

import socket

import pytest

from etrnd.link.egress import Choice, Expected, Route, Router, choose

V4 = socket.AF_INET
WATCHED = Expected(lambda: "wwan0", ("wwan*",), lambda name, fam: ["198.51.100.2"]
                   if (name, fam) == ("wwan0", V4) else [], Router())
NOTHING_UP = Expected(lambda: None, ("wwan*",), lambda _n, _f: [], Router())


@pytest.mark.parametrize(("mode", "expected", "route_iface", "routed_from", "choice"), [
    ("auto", WATCHED, "wwan0", None, (None, False)),
    ("auto", WATCHED, "lo", None, (None, False)),  # a relay on this machine
    ("auto", WATCHED, "wan1", "wwan0", ("198.51.100.2", True)),  # a policy rule routes it back
    ("auto", WATCHED, "wan1", "wan1", (None, True)),  # no rule: binding would be dropped
    ("kernel", WATCHED, "wan1", "wwan0", (None, True)),
    ("192.0.2.7", WATCHED, "wan1", None, ("192.0.2.7", True)),
    ("192.0.2.7", WATCHED, "wwan0", None, ("192.0.2.7", False)),
    ("auto", NOTHING_UP, "wwan1", None, (None, False)),  # send: any watched interface
    ("auto", NOTHING_UP, "eth0", None, (None, True)),
])
def test_choose(mode: str, expected: Expected, route_iface: str, routed_from: str | None,
                choice: tuple[str | None, bool]) -> None:
    got: Choice = choose(mode, Route("192.0.2.25", V4, route_iface), expected,
                         lambda _: routed_from)
    assert (got.source, got.mismatch) == choice
