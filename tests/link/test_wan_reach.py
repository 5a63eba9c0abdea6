"""A WAN the ISP cannot connect back to (issue 18): CGNAT or RFC 1918 only, no global IPv6.

No interface here carries a 100.64.0.0/10 or RFC 1918 address: the test networking rule allows
only the documentation ranges, even inside namespaces. The classification is pure, and the
daemon's wiring (the warning once per link-up, ETRN relays only, and status) is driven with a
watcher stand-in that reports those addresses.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from etrnd.config.schema import parse_yaml
from etrnd.link.lines import GroupSpec, LinkSpec, Plan
from etrnd.link.state import Verdict, not_public
from etrnd.link.watcher import Decision, LinkView
from etrnd.outputs import status as status_doc
from etrnd.service.daemon import Daemon


@pytest.mark.parametrize(("v4", "v6", "why"), [
    (["100.64.1.2"], [], "100.64.1.2 is shared (CGNAT, RFC 6598)"),
    (["100.127.255.254"], [], "100.127.255.254 is shared (CGNAT, RFC 6598)"),
    (["10.1.2.3"], [], "10.1.2.3 is private (RFC 1918)"),
    (["172.31.0.9", "192.168.1.2"], [],
     "172.31.0.9 is private (RFC 1918); 192.168.1.2 is private (RFC 1918)"),
    (["100.64.1.2"], ["2001:4860::1"], None),   # a global IPv6 address: the ISP can reach it
    (["100.64.1.2", "8.8.4.4"], [], None),       # one public IPv4 address is enough
    (["100.128.0.1"], [], None),                 # just outside 100.64.0.0/10
    (["172.32.0.1"], [], None),                  # just outside 172.16.0.0/12
    (["198.51.100.2"], [], None),                # documentation ranges are not flagged
    ([], [], None),                              # nothing to judge
])
def test_not_public(v4: list[str], v6: list[str], why: str | None) -> None:
    assert not_public(v4, v6) == why


class _Watcher:
    """Up on wan0 with the given addresses, as LinkWatcher reports them."""

    def __init__(self, v4: list[str], v6: list[str]) -> None:
        self.up = True
        self.why = "wan0: carrier up, 100.64.1.2/10, default via 100.64.0.1"
        self.verdict = Verdict(True, self.why, "wan0")
        self._addrs = {socket.AF_INET: v4, socket.AF_INET6: v6}

    def addresses(self, name: str, family: int) -> list[str]:
        return self._addrs[family] if name == "wan0" else []

    def round_due(self, relay: str | None = None) -> None:
        return None

    # The per-link view the daemon's status reads (etrnd.link.watcher: one link, both relays).
    plan = Plan((LinkSpec("wan0", ("wan0",), "default-route", "any", 5.0),),
                (GroupSpec("wan0", ("isp", "lte"), 2.0, 30.0),))

    def links(self) -> list[LinkView]:
        return [LinkView("wan0", True, self.why, "wan0", 0.0, None, ("isp", "lte"))]

    def standby(self, relay: str) -> bool:
        return False

    def may_run_since(self, relay: str) -> float:
        return 0.0


CONFIG = """
relays:
  - {name: isp, host: 127.0.0.1, tls: none, helo: gw.example.test, etrn: ['@example.test']}
  - {name: lte, host: 127.0.0.1, protocol: odmr, tls: none, helo: gw.example.test,
     auth: {username: u, password_file: PW}, etrn: [example.test]}
"""


async def test_etrn_relay_warned_once_per_link_up_and_status_shows_it(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    config = parse_yaml(CONFIG.replace("PW", str(tmp_path / "pw")))
    daemon = Daemon(tmp_path / "etrnd.yaml", config)
    daemon._watcher = _Watcher(["100.64.1.2"], [])  # type: ignore[assignment]
    with capture_logs() as logs:
        daemon.on_decision(Decision("up", daemon._watcher.why, "wan0", 1.0,
                                    relays=("isp", "lte")))
        daemon.cancel_rounds("test")
    warned = [e for e in logs if e["event"] == "etrn_wan_not_public"]
    # The ODMR relay is the answer for such a line: only the ETRN relay is warned about.
    assert [(e["relay"], e["iface"], e["log_level"]) for e in warned] == [
        ("isp", "wan0", "warning")], warned
    assert warned[0]["reason"] == "100.64.1.2 is shared (CGNAT, RFC 6598)"
    assert "odmr" in warned[0]["hint"].lower()
    # What status shows for that link (etrnd.service.daemon._links) and how it renders it.
    assert daemon.wan_not_public("wan0") == "100.64.1.2 is shared (CGNAT, RFC 6598)"
    assert "WAN not reachable from the ISP: 100.64.1.2 is shared" in status_doc.render(
        {"link": {"up": True, "not_public": daemon.wan_not_public("wan0")}})


async def test_public_or_v6_wan_is_not_warned(tmp_path: Path) -> None:
    config = parse_yaml("relays: [{host: 127.0.0.1, tls: none, helo: gw.example.test, "
                        "etrn: ['@example.test']}]\n")
    daemon = Daemon(tmp_path / "etrnd.yaml", config)
    daemon._watcher = _Watcher(["100.64.1.2"], ["2001:db8::2", "2a00:1450::1"])  # type: ignore[assignment]
    with capture_logs() as logs:
        daemon.on_decision(Decision("up", "up", "wan0", 1.0, relays=("127.0.0.1",)))
        daemon.cancel_rounds("test")
    assert not [e for e in logs if e["event"] == "etrn_wan_not_public"]
    assert daemon.wan_not_public("wan0") is None
