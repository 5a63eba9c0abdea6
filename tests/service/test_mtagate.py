"""`local_mta:` (issue 11, case 6): no ETRN until the office's own MTA greets with 220."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from etrnd.config.values import DeliverTo
from etrnd.service.mtagate import Gate
from tests.support.daemonproc import running, wait_for
from tests.support.nettools import linked
from tests.support.postfix import ISP_ADDR, OFFICE_ADDR, PREFIX_LEN, postfix, receiver

TARGET = DeliverTo(lmtp=False, host="127.0.0.1", port=25)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay


def test_gate_waits_for_220_then_opens_once_for_every_relay() -> None:
    t = FakeTime()
    answers = iter(["ConnectionRefusedError", "ConnectionRefusedError", None])
    probes: list[float] = []

    async def probe(_: DeliverTo) -> str | None:
        probes.append(t.now)
        return next(answers)

    async def main() -> list[bool]:
        gate = Gate(TARGET, 30.0, probe=probe, sleep=t.sleep, clock=t.clock)
        results = await asyncio.gather(gate.ready("isp"), gate.ready("backup"))
        assert gate.state == "ready" and gate.waiting == set()
        return results

    assert asyncio.run(main()) == [True, True]
    assert probes == [0.0, 1.0, 2.0]  # one probe a second, shared by both relays


def test_gate_wait_is_bounded() -> None:
    t = FakeTime()

    async def probe(_: DeliverTo) -> str | None:
        return "ConnectionRefusedError"

    async def main() -> tuple[bool, str]:
        gate = Gate(TARGET, 5.0, probe=probe, sleep=t.sleep, clock=t.clock)
        return await gate.ready("isp"), gate.state

    assert asyncio.run(main()) == (False, "gave-up")
    assert t.now == 5.0


@pytest.mark.root
def test_postfix_started_late_gets_one_round_and_all_mail(tmp_path: Path) -> None:
    n, domain = 10, "example.test"
    with linked("m", ISP_ADDR, OFFICE_ADDR, PREFIX_LEN) as pair:
        for ns, dev in ((pair.isp, pair.isp_if), (pair.office, pair.office_if)):
            ns.ip("link", "set", dev, "up")
        with postfix(pair.isp, tmp_path / "isp", address=ISP_ADDR, relay_domains=(domain,),
                     transport={domain: f"smtp:[{OFFICE_ADDR}]:25"}) as isp, \
                receiver(pair.office, tmp_path / "mailbox", "127.0.0.1", 2526) as mailbox:
            isp.enqueue(n, f"user@{domain}")
            # Nothing listens at the office yet: the ISP's tries are refused and deferred.
            wait_for(lambda: isp.deferred() == n, 30, f"{n} deferred at the ISP")
            config = tmp_path / "etrnd.yaml"
            config.write_text(
                f"local_mta: {{address: '{OFFICE_ADDR}:25', max_wait: 2m}}\n"
                f"watch: {{interfaces: [{pair.office_if}], up_when: carrier, settle: 0s}}\n"
                f"relays:\n  - name: isp\n    host: {ISP_ADDR}\n    helo: office.{domain}\n"
                f"    etrn: ['@{domain}']\n"
                f"control: {{socket: {tmp_path / 'control.sock'}}}\n"
                "log: {level: debug, format: json}\n")
            with running(config, tmp_path / "log", pair.office) as daemon:
                waiting = daemon.wait_event("round_waiting_local_mta", timeout=15)
                assert waiting["local_mta"] == f"{OFFICE_ADDR}:25"
                status = daemon.status()
                assert status["local_mta"]["state"] == "waiting"
                assert [r["state"] for r in status["relays"]] == ["waiting-local-mta"]
                assert "local MTA 198.51.100.2:25: waiting" in daemon.cli("status").stdout
                assert daemon.events("etrn_session") == []
                assert "ETRN" not in isp.log()
                # The office MTA: a real Postfix, started late, passing mail to the mailbox.
                with postfix(pair.office, tmp_path / "office", address=OFFICE_ADDR,
                             relay_domains=(domain,),
                             transport={domain: "smtp:[127.0.0.1]:2526"},
                             settings={"myhostname": "office.test", "mydomain": "office.test",
                                       "myorigin": "office.test",
                                       "inet_interfaces": f"{OFFICE_ADDR}, 127.0.0.1"}):
                    reply = daemon.wait_event("etrn_reply", timeout=30)
                    assert (reply["code"], reply["text"]) == (250, "Queuing started")
                    mailbox.wait_count(n, timeout=60)
                    wait_for(lambda: isp.queue() == [], 30, "the ISP queue to drain")
                names = [e["event"] for e in daemon.events()]
                assert names.index("local_mta_ready") < names.index("etrn_session")
                assert names.count("round_start") == 1 and names.count("etrn_reply") == 1
                assert daemon.status()["local_mta"]["state"] == "ready"
            assert mailbox.count() == n
