"""Egress (issue 11, case 4): the ETRN leaves through another interface than the watched one.

The office watches wwan (default route metric 700) while wan has a default route with metric
100. The ISP's real Postfix allows ETRN only from the wwan network (smtpd_etrn_restrictions),
as ISPs do: from wan's address it answers 554.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonproc import running
from tests.support.nettools import Netns, netns, unique, uplink
from tests.support.postfix import postfix

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]
RELAY = "192.0.2.25"
WWAN_ADDR, WAN_ADDR = "198.51.100.2", "203.0.113.2"


@dataclass
class Lab:
    isp: Netns
    office: Netns
    wwan: str
    wan: str

    def policy_rule(self) -> None:
        """What a multi-WAN setup has: packets from wwan's address leave through wwan."""
        self.office.ip("rule", "add", "from", WWAN_ADDR, "table", "100")
        self.office.ip("route", "add", "default", "via", "198.51.100.1", "dev", self.wwan,
                       "table", "100")

    def config(self, path: Path, source: str | None = None, extra: str = "") -> Path:
        path.write_text(
            "watch: {interfaces: ['wwan*'], family: ipv4, settle: 0s}\n"
            f"relays:\n  - name: isp\n    host: {RELAY}\n    helo: office.example.test\n"
            "    timeout: 10s\n    etrn: ['@example.test']\n"
            + (f"    source: {source}\n" if source else "")
            + "retry: {first_delay: 200ms, max_delay: 1s, give_up_after: 2s}\n"
            "log: {level: debug, format: json}\n" + extra)
        return path

    def send(self, config: Path) -> tuple[int, list[dict[str, Any]]]:
        res = subprocess.run(self.office.cmd(sys.executable, "-m", "etrnd", "send", "-c",
                                             str(config)),
                             capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        assert "Traceback" not in res.stderr, res.stderr
        return res.returncode, [json.loads(line) for line in res.stderr.splitlines()
                                if line.startswith("{")]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with netns("egi") as isp, netns("ego") as office:
        wwan, wan = unique("wwan"), unique("wan")
        uplink(office, wwan, WWAN_ADDR, isp, "198.51.100.1", "700")
        uplink(office, wan, WAN_ADDR, isp, "203.0.113.1", "100")
        isp.ip("addr", "add", f"{RELAY}/32", "dev", "lo")
        with postfix(isp, tmp_path / "isp", address=RELAY, relay_domains=("example.test",),
                     settings={"mynetworks": "198.51.100.0/24",
                               "smtpd_etrn_restrictions": "permit_mynetworks, reject"}):
            yield Lab(isp, office, wwan, wan)


def only(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def test_send_says_the_route_leaves_elsewhere_and_the_isp_refuses(lab: Lab,
                                                                   tmp_path: Path) -> None:
    # source: kernel (and auto without a policy rule): warn, do not bind.
    for source in ("kernel", None):
        code, events = lab.send(lab.config(tmp_path / "e.yaml", source))
        mismatch = only(events, "etrn_egress_mismatch")
        assert [(m["expected_iface"], m["route_iface"], m["source"]) for m in mismatch] == [
            (lab.wwan, lab.wan, "kernel")], events
        if source is None:
            assert "add a policy rule" in mismatch[0]["reason"]
        assert code == 3  # 554 Access denied: the ISP saw wan's address
        assert [r["code"] for r in only(events, "etrn_refused")] == [554]


def test_send_auto_sends_from_the_watched_address_when_routed_back(lab: Lab,
                                                                    tmp_path: Path) -> None:
    lab.policy_rule()
    code, events = lab.send(lab.config(tmp_path / "e.yaml"))
    mismatch = only(events, "etrn_egress_mismatch")
    assert [(m["route_iface"], m["source"]) for m in mismatch] == [(lab.wan, WWAN_ADDR)]
    assert code == 0
    assert [(r["code"], r["text"]) for r in only(events, "etrn_reply")] == [
        (250, "Queuing started")]


def test_send_with_a_configured_address_binds_to_it(lab: Lab, tmp_path: Path) -> None:
    lab.policy_rule()
    code, events = lab.send(lab.config(tmp_path / "e.yaml", WWAN_ADDR))
    assert code == 0, events


def test_send_without_mismatch_says_nothing(lab: Lab, tmp_path: Path) -> None:
    lab.office.ip("route", "del", "default", "dev", lab.wan)
    code, events = lab.send(lab.config(tmp_path / "e.yaml"))
    assert code == 0 and only(events, "etrn_egress_mismatch") == [], events
    assert [e["route_iface"] for e in only(events, "etrn_egress")] == [lab.wwan]


def test_daemon_round_checks_against_the_interface_that_made_the_link_up(
        lab: Lab, tmp_path: Path) -> None:
    lab.policy_rule()
    config = lab.config(tmp_path / "e.yaml",
                        extra=f"control: {{socket: {tmp_path / 'control.sock'}}}\n")
    with running(config, tmp_path / "log", lab.office) as daemon:
        assert daemon.events("daemon_ready")[0]["link"] == "up"
        reply = daemon.wait_event("etrn_reply", timeout=20)
        assert (reply["code"], reply["text"]) == (250, "Queuing started")
        mismatch = daemon.events("etrn_egress_mismatch")
        assert [(m["expected_iface"], m["route_iface"], m["source"]) for m in mismatch] == [
            (lab.wwan, lab.wan, WWAN_ADDR)]
