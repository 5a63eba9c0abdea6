"""Two lines, two protocols: a fixed line to a real Postfix (ETRN) and an LTE line to a real
Exim ODMR provider, each relay on its own link, the ODMR relay only while the fixed line is down.

Black-box: one config, `etrnd run` in the office namespace, its JSON events and `etrnd status`;
what counts is which mail reached the office (one receiver on the office's port 25 takes the
fixed line's deliveries and the ODMR relay's) and what each ISP still holds.
"""

from __future__ import annotations

import contextlib
import email
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemonproc import Daemon, running, wait_for
from tests.support.exim import PASSWORD, USER, Exim, exim_provider
from tests.support.nettools import Netns, netns, unique, veth
from tests.support.postfix import Postfix, Receiver, postfix, receiver
from tests.support.promlab import sample

pytestmark = pytest.mark.root
FIBER_GW, FIBER_ME = "198.51.100.1", "198.51.100.2"
LTE_GW, LTE_ME = "203.0.113.1", "203.0.113.2"
DOMAIN = "example.test"
N = 5
HOLD = 2.0  # watch.down_hold in these tests
STATUS_LOG = os.environ.get("ETRND_TWO_LINES_STATUS")  # where to copy each case's status
METRICS_PORT = 9469  # in the office namespace: nothing else listens there
FETCH = ("import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
         "sys.argv[1], timeout=10).read().decode())")


@dataclass
class TwoLines:
    office: Netns
    fiber_if: str  # office end of the fixed line (ISP A: Postfix, ETRN)
    lte_if: str  # office end of the LTE line (ISP B: Exim, ODMR)
    postfix: Postfix
    exim: Exim
    inbox: Receiver
    workdir: Path

    def line(self, which: str, up: bool) -> None:
        """What pppd/ModemManager do: the link comes up with a default route; or goes away."""
        iface, gw, metric = ((self.fiber_if, FIBER_GW, "100") if which == "fiber"
                             else (self.lte_if, LTE_GW, "200"))
        self.office.ip("link", "set", iface, "up" if up else "down")
        if up:
            self.office.ip("route", "replace", "default", "via", gw, "dev", iface,
                           "metric", metric)

    def collect_lte(self, case: str, odmr: list[str]) -> None:
        """Leave the lab empty for the next case: the fixed line down, the LTE line up and a
        daemon run until the ODMR provider's mail for `case` is in the office."""
        self.line("fiber", False)
        self.line("lte", True)
        with running(self.config(), self.workdir / f"{case}2.log", self.office):
            wait_for(lambda: self.received(f"{case}-lte") == odmr, 60, "the LTE mail, afterwards")

    def received(self, prefix: str) -> list[str]:
        """Recipients (To:) of the messages the office received whose local part starts so."""
        found = []
        for path in self.inbox.maildir.glob("*.eml"):
            to = email.message_from_bytes(path.read_bytes())["To"] or ""
            if to.startswith(prefix):
                found.append(to)
        return sorted(found)

    def queue_etrn(self, recipients: list[str]) -> None:
        """Mail for the office at ISP A while the fixed line is down: Postfix tries once,
        defers it (for an hour: only ETRN brings it now) and holds it."""
        before = self.postfix.deferred()
        for rcpt in recipients:
            self.postfix.enqueue(1, rcpt)
        wait_for(lambda: self.postfix.deferred() == before + len(recipients), 30,
                 "Postfix to have tried the office and deferred")

    def queue_both(self, tag: str) -> tuple[list[str], list[str]]:
        """N messages for the office at each ISP, lines down; returns (ETRN's, ODMR's)."""
        self.line("fiber", False)
        self.line("lte", False)
        etrn = sorted(f"{tag}-fiber{n}@{DOMAIN}" for n in range(N))
        odmr = sorted(f"{tag}-lte{n}@{DOMAIN}" for n in range(N))
        self.queue_etrn(etrn)
        self.exim.enqueue(odmr)  # Exim holds it until an ATRN asks
        return etrn, odmr

    def config(self, name: str = "etrnd.yaml") -> Path:
        secret = self.workdir / "odmr.secret"
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        path = self.workdir / name
        path.write_text(f"""\
watch: {{up_when: default-route, settle: 0s, min_interval: 0s, down_hold: {HOLD}s}}
relays:
  - name: fiber
    host: {FIBER_GW}
    helo: office.{DOMAIN}
    timeout: 10s
    etrn: ["@{DOMAIN}"]
    watch: {{interfaces: [{self.fiber_if}]}}
  - name: lte
    protocol: odmr
    host: {LTE_GW}
    tls: none
    helo: office.{DOMAIN}
    auth: {{username: {USER}, password_file: {secret}}}
    timeout: 10s
    etrn: [{DOMAIN}]
    deliver_to: 127.0.0.1:25
    watch: {{interfaces: [{self.lte_if}], only_when_down: fiber}}
retry: {{first_delay: 200ms, max_delay: 1s, give_up_after: 5s}}
control: {{socket: {self.workdir / (name + '.sock')}}}
metrics: {{listen: "127.0.0.1:{METRICS_PORT}"}}
log: {{level: debug, format: json}}
""")
        return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoLines]:
    work = tmp_path_factory.mktemp("twolines")
    with netns("tlo") as office, netns("tla") as isp_a, netns("tlb") as isp_b, \
            contextlib.ExitStack() as stack:
        fiber_if, lte_if = unique("tlf"), unique("tll")
        a_if, b_if = unique("tfa"), unique("tfb")
        veth(isp_a, a_if, office, fiber_if)
        veth(isp_b, b_if, office, lte_if)
        for ns, iface, addr in ((isp_a, a_if, FIBER_GW), (isp_b, b_if, LTE_GW)):
            ns.ip("addr", "add", f"{addr}/24", "dev", iface)
            # A connect over a line without carrier fails at once instead of waiting for ARP.
            ns.run("sysctl", "-qw", f"net.ipv4.conf.{iface}.ignore_routes_with_linkdown=1")
            ns.ip("link", "set", iface, "up")
        office.ip("addr", "add", f"{FIBER_ME}/24", "dev", fiber_if)
        office.ip("addr", "add", f"{LTE_ME}/24", "dev", lte_if)
        mta = stack.enter_context(postfix(
            isp_a, work / "isp-a", address=FIBER_GW, relay_domains=(DOMAIN,),
            transport={DOMAIN: f"smtp:[{FIBER_ME}]:25"},
            settings={"smtp_connect_timeout": "2s"}))
        exim = stack.enter_context(exim_provider(isp_b, work / "isp-b", address=LTE_GW,
                                                 domains=(DOMAIN,)))
        # The office MTA: the fixed line's ISP delivers to it, and so does etrnd's ODMR leg.
        inbox = stack.enter_context(receiver(office, work / "inbox", "0.0.0.0"))
        yield TwoLines(office, fiber_if, lte_if, mta, exim, inbox, work)


def report(daemon: Daemon, case: str) -> str:
    res = daemon.cli("status")
    assert res.returncode == 0, res.stderr
    if STATUS_LOG:
        with open(STATUS_LOG, "a") as out:
            out.write(f"== {case}\n$ etrnd status\n{res.stdout}\n")
    return res.stdout


def relay_link_up(lab: TwoLines) -> dict[str, float | None]:
    """etrnd_relay_link_up per relay, scraped from the daemon in the office namespace."""
    body = lab.office.run(sys.executable, "-c", FETCH,
                          f"http://127.0.0.1:{METRICS_PORT}/metrics").stdout
    return {"fiber": sample(body, "etrnd_relay_link_up", link=lab.fiber_if, relay="fiber"),
            "lte": sample(body, "etrnd_relay_link_up", link=lab.lte_if, relay="lte")}


def rounds(daemon: Daemon, relay: str) -> list[dict[str, object]]:
    return [e for e in daemon.events("round_start") if e["relay"] == relay]


def test_fixed_line_up_only_etrn_runs_and_its_mail_arrives_over_the_fixed_line(
        lab: TwoLines) -> None:
    etrn, odmr = lab.queue_both("a")
    lab.line("fiber", True)
    lab.line("lte", False)
    with running(lab.config(), lab.workdir / "a.log", lab.office) as daemon:
        wait_for(lambda: lab.received("a-fiber") == etrn, 30, "the fixed line's mail")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "fiber")
        text = report(daemon, "fixed line up, LTE down")
        assert [e["reason"] for e in rounds(daemon, "fiber")] == ["link_up"]
        assert rounds(daemon, "lte") == []
        assert lab.received("a-lte") == []
        assert set(odmr) <= set(lab.exim.queued_recipients())  # the provider keeps it
        assert f"link {lab.fiber_if}: UP" in text and "drives fiber" in text
        assert f"link {lab.lte_if}: DOWN" in text
        assert "drives lte (only while fiber down: standby)" in text
    lab.collect_lte("a", odmr)


def test_both_lines_up_only_etrn_runs(lab: TwoLines) -> None:
    etrn, odmr = lab.queue_both("b")
    lab.line("fiber", True)
    lab.line("lte", True)
    with running(lab.config(), lab.workdir / "b.log", lab.office) as daemon:
        wait_for(lambda: lab.received("b-fiber") == etrn, 30, "the fixed line's mail")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "fiber")
        standby = daemon.wait_event("backup_standby")
        assert standby["relays"] == ["lte"] and standby["initial"] is True
        text = report(daemon, "both lines up")
        assert rounds(daemon, "lte") == []
        assert "drives lte (only while fiber down: standby)" in text
        status = daemon.status()
        assert {r["name"]: r["state"] for r in status["relays"]}["lte"] == "standby"
        assert [(lk["name"], lk["up"]) for lk in status["links"]] == [
            (lab.fiber_if, True), (lab.lte_if, True)]
        assert relay_link_up(lab) == {"fiber": 1, "lte": 1}
        # A trigger for all leaves the standby backup out.
        assert daemon.cli("trigger").returncode == 0
        daemon.wait_event("round_requested")
        assert daemon.events("round_requested")[0]["standby"] == ["lte"]
        assert rounds(daemon, "lte") == []
        assert lab.received("b-lte") == []
        assert set(odmr) <= set(lab.exim.queued_recipients())
    lab.collect_lte("b", odmr)


def test_fixed_line_down_hands_over_to_odmr_and_back_when_it_returns(lab: TwoLines) -> None:
    etrn, odmr = lab.queue_both("c")
    lab.line("fiber", True)
    lab.line("lte", True)
    with running(lab.config(), lab.workdir / "c.log", lab.office) as daemon:
        wait_for(lambda: lab.received("c-fiber") == etrn, 30, "the fixed line's mail")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "fiber")
        cut = time.monotonic()
        lab.line("fiber", False)
        late = sorted(f"c-fiber-late{n}@{DOMAIN}" for n in range(N))
        lab.queue_etrn(late)  # mail that reaches ISP A while the fixed line is down
        active = daemon.wait_event("backup_active", timeout=HOLD + 10)
        assert time.monotonic() - cut >= HOLD  # not before the down-hold ran out
        assert active["relays"] == ["lte"]
        wait_for(lambda: lab.received("c-lte") == odmr, 60, "the mail through the turnaround")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "lte", timeout=30)
        text = report(daemon, "fixed line down, LTE up")
        assert [e["reason"] for e in rounds(daemon, "lte")] == ["failover"]
        assert f"link {lab.fiber_if}: DOWN" in text
        assert "drives lte (only while fiber down: active)" in text
        assert relay_link_up(lab) == {"fiber": 0, "lte": 1}
        assert lab.received("c-fiber-late") == []  # ISP A cannot reach us: it waits
        lab.line("fiber", True)
        daemon.wait_event("backup_standby", where=lambda e: not e["initial"])
        wait_for(lambda: lab.received("c-fiber-late") == late, 30,
                 "the fixed line's mail once it is back")
        assert [e["reason"] for e in rounds(daemon, "fiber")] == ["link_up", "link_up"]
        assert len(rounds(daemon, "lte")) == 1
        report(daemon, "fixed line back")


def test_fixed_line_flapping_within_the_down_hold_starts_no_odmr_session(
        lab: TwoLines) -> None:
    etrn, odmr = lab.queue_both("d")
    lab.line("fiber", True)
    lab.line("lte", True)
    with running(lab.config(), lab.workdir / "d.log", lab.office) as daemon:
        wait_for(lambda: lab.received("d-fiber") == etrn, 30, "the fixed line's mail")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "fiber")
        flaps = 8
        for _ in range(flaps):  # each outage ~0.2 s, well within the 2 s hold
            lab.line("fiber", False)
            time.sleep(0.2)
            lab.line("fiber", True)
            time.sleep(0.3)
        blips = daemon.wait_event("link_blip", count=flaps, timeout=10)
        assert blips["link"] == lab.fiber_if
        time.sleep(HOLD + 0.5)  # a held down that was not undone would be decided by now
        text = report(daemon, "fixed line flapping within the down-hold")
        assert rounds(daemon, "lte") == []
        assert daemon.events("backup_active") == []
        assert [e for e in daemon.events("link_down") if not e["initial"]] == []
        assert daemon.events("round_cancelled") == []
        assert len(rounds(daemon, "fiber")) == 1  # a blip is no new link-up
        assert lab.received("d-lte") == []
        assert set(odmr) <= set(lab.exim.queued_recipients())
        assert "drives lte (only while fiber down: standby)" in text
    lab.collect_lte("d", odmr)


def test_fixed_line_back_during_an_odmr_transfer_lets_it_finish(lab: TwoLines) -> None:
    many = 40  # ~45 ms each at Exim: time to bring the fixed line back mid-transfer
    lab.line("fiber", False)
    lab.line("lte", False)
    odmr = sorted(f"e-lte{n}@{DOMAIN}" for n in range(many))
    lab.exim.enqueue(odmr)
    lab.line("lte", True)
    with running(lab.config(), lab.workdir / "e.log", lab.office) as daemon:
        daemon.wait_event("odmr_message", count=3, timeout=60)
        lab.line("fiber", True)  # the fixed line is back: lte goes to standby...
        assert daemon.wait_event("round_ends_after_session")["relay"] == "lte"
        # ...but its own line is up: the transfer the provider started finishes, counted.
        done = daemon.wait_event("odmr_done", timeout=60)
        assert (done["relayed"], done["refused"], done["deferred"]) == (many, 0, 0)
        wait_for(lambda: lab.received("e-lte") == odmr, 60, "every message of the transfer")
        daemon.wait_event("round_done", where=lambda e: e["relay"] == "lte")
        wait_for(lambda: lab.exim.queue_count() == 0, 30, "the provider to have none left")
        assert len(rounds(daemon, "lte")) == 1  # and no new session after it
        assert daemon.events("round_cancelled") == []
        lte = {r["name"]: r for r in daemon.status()["relays"]}["lte"]
        assert lte["state"] == "standby" and lte["args"][0]["outcome"] == "accepted", lte
        report(daemon, "fixed line back during an ODMR transfer")
