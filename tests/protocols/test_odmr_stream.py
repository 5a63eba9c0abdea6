"""ODMR's office leg (issue 16): DATA streamed with memory independent of the message size,
the office MTA kept in step with the provider, refusals booked as what they were, and the
10-minute cliff of RFC 5321 4.5.3.2.6.

Real Exim 4.100 provider and real Postfix office MTA (tests/support/odmrlab.py); a scripted
provider (tests/support/odmr_server.py) only for what Exim does not do on demand: a leg dying
mid-DATA, MAIL straight after a failed DATA. The duplicate-risk test's slow office MTA too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.protocols.test_odmr_exim import events
from tests.support.daemonproc import ROOT
from tests.support.odmrlab import ASKED, ISP_ADDR, OdmrLab, odmr_lab

MB = 1_000_000
DOMAIN = ASKED[0]


def message(rcpt: str, n: int, size: int = 0, *, extra_line: str = "") -> str:
    """A message of about `size` octets with lines starting with a dot (dot-stuffing)."""
    head = (f"From: sender@isp.test\r\nTo: {rcpt}\r\nSubject: stream {n}\r\n"
            f"Message-ID: <stream{n}.{size}@isp.test>\r\n\r\n.leading dot {n}\r\n")
    row = "x" * 76 + "\r\n"
    rows = max(size - len(head), 0) // len(row)
    return head + extra_line + row * rows + f"..two dots {n}\r\nend {n}\r\n"


def delivered_bodies(lab: OdmrLab) -> dict[str, str]:
    """Delivered-To -> the whole delivered file (Postfix's maildir stores LF line ends)."""
    found = {}
    for path in sorted((lab.mta.maildir / "new").iterdir()):
        text = path.read_text(errors="replace")
        to = re.search(r"^Delivered-To: (\S+)", text, re.MULTILINE)
        assert to is not None, text[:500]
        found[to.group(1)] = text
    return found


def send_sampled(lab: OdmrLab, config: Path, timeout: float = 300,
                 tree: Path = ROOT) -> tuple[subprocess.CompletedProcess[str], int]:
    """`etrnd send` (the package in `tree`) in the office namespace, sampling its peak RSS
    (/proc/PID/status VmHWM, KiB) every 20 ms until it exits (`ip netns exec` execs, so the
    PID is etrnd's)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(lab.office.cmd(sys.executable, "-m", "etrnd", "send", "-c",
                                               str(config)),
                                stdout=out, stderr=err, text=True, cwd=tree)
        peak, deadline = 0, time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                except OSError:
                    break
                found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
                if found:
                    peak = max(peak, int(found.group(1)))
                time.sleep(0.02)
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, code, out.read(), err.read()), peak


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[OdmrLab]:
    with odmr_lab(tmp_path, wan_up=True, retry_interval="1h") as env:
        yield env


@pytest.mark.root
def test_peak_memory_does_not_grow_with_the_message(lab: OdmrLab) -> None:
    # Before issue 16, aiosmtpd collected the whole message and aiosmtplib copied it again:
    # +5 MiB of RSS per MB (10 MB: ~100 MiB, 60 MB: ~330 MiB).
    peaks = {}
    for n, size in enumerate((10 * MB, 60 * MB)):
        rcpt = f"user{n}@{DOMAIN}"
        lab.exim.enqueue_message(rcpt, message(rcpt, n, size))
        res, peaks[size] = send_sampled(lab, lab.config(f"m{n}.yaml", domains=[DOMAIN],
                                                        timeout="60s"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "1 relayed, 0 refused, 0 deferred" in res.stdout, res.stdout
        lab.mta.wait_count(n + 1)
        body = delivered_bodies(lab)[rcpt]
        # Every octet arrived, dots as sent: stuffing kept on the wire, undone by Postfix.
        assert f"\n.leading dot {n}\n" in body and f"\n..two dots {n}\nend {n}\n" in body
        assert len(body) > size * 76 // 78
    assert lab.exim.queue_count() == 0
    assert peaks[60 * MB] - peaks[10 * MB] < 16 * 1024, peaks


def send_until_delivered(lab: OdmrLab, config: Path, rcpt: str,
                         ) -> list[subprocess.CompletedProcess[str]]:
    """`etrnd send` until `rcpt` is in the office mailbox (at most 4 sends). Exim ends its ATRN
    session after a refused message; what was queued behind it waits for the next ATRN and
    the lab's 1 s retry time (FIELD-NOTES, "Exim quirks")."""
    runs = []
    for _ in range(4):
        runs.append(lab.etrnd("send", "-c", str(config)))
        if rcpt in lab.mta.received():
            break
        time.sleep(1.5)
    return runs


@pytest.mark.root
def test_a_3000_octet_line_is_refused_and_the_next_message_delivered(tmp_path: Path) -> None:
    with odmr_lab(tmp_path, wan_up=True, retry_interval="1s") as lab:
        bad, good = f"user0@{DOMAIN}", f"user1@{DOMAIN}"
        lab.exim.enqueue_message(bad, message(bad, 0, extra_line="y" * 3000 + "\r\n"))
        lab.exim.enqueue_message(good, message(good, 1))
        runs = send_until_delivered(lab, lab.config(domains=[DOMAIN]), good)
        assert runs[0].returncode == 3, runs[0].stderr[-3000:]  # a refusal, not "deferred"
        booked = [(m["code"], m["outcome"], m["text"].split(" (")[0].split(" as ")[0])
                  for r in runs for m in events(r.stderr, "odmr_message")]
        assert booked == [(500, "refused", "5.5.2 Line too long"),
                          (250, "relayed", "2.0.0 Ok: queued")], booked
        lab.mta.wait_count(1)
        assert lab.mta.received() == [good]
        assert not {bad, good} & set(lab.exim.queued_recipients())  # bounced / delivered
        assert good in lab.exim.delivered() and "500 5.5.2 Line too long" in lab.exim.log()
        assert "nested MAIL" not in "".join(r.stderr for r in runs) + lab.mta.postfix.log()


@pytest.mark.root
def test_a_message_over_max_message_size_is_refused_with_its_size(tmp_path: Path) -> None:
    with odmr_lab(tmp_path, wan_up=True, retry_interval="1s") as lab:
        big, small = f"user0@{DOMAIN}", f"user1@{DOMAIN}"
        lab.exim.enqueue_message(big, message(big, 0, 2 * MB))
        lab.exim.enqueue_message(small, message(small, 1))
        config = lab.config(domains=[DOMAIN], relay_extra="    max_message_size: 1M\n")
        runs = send_until_delivered(lab, config, small)
        assert runs[0].returncode == 3, runs[0].stderr[-3000:]
        assert "0 relayed, 1 refused, 0 deferred" in runs[0].stdout, runs[0].stdout
        first, second = [m for r in runs for m in events(r.stderr, "odmr_message")]
        assert (first["outcome"], first["code"], first["size_limit"]) == ("refused", 552, MB)
        assert first["size"] > 2 * MB * 76 // 78 and str(MB) in first["text"], first
        assert (second["outcome"], second["code"]) == ("relayed", 250)
        lab.mta.wait_count(1)
        assert lab.mta.received() == [small]
        assert "lost connection after DATA" in lab.mta.postfix.log()  # our copy, aborted
        assert "no DATA was sent" not in "".join(r.stderr for r in runs)


def scripted(lab: OdmrLab, messages: int, *actions: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        lab.isp.cmd(sys.executable, "-m", "tests.support.odmr_server", ISP_ADDR, "3660",
                    str(messages), *actions), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "READY"
    return server


def stop(server: subprocess.Popen[str]) -> list[str]:
    server.terminate()
    out, _ = server.communicate(timeout=10)
    return out.splitlines()


@pytest.mark.root
@pytest.mark.parametrize(("action", "limit", "code"), [
    ("longline", "", 500), ("big:300000", "    max_message_size: 100k\n", 552)])
def test_mail_straight_after_our_own_refusal_is_delivered(
        lab: OdmrLab, action: str, limit: str, code: int) -> None:
    server = scripted(lab, 3, action)
    try:
        res = lab.etrnd("send", "-c", str(lab.config(port=3660, domains=[DOMAIN],
                                                      relay_extra=limit)))
    finally:
        lines = stop(server)
    assert res.returncode == 3, res.stderr[-3000:]
    assert lines.count(f"SENT user0@{DOMAIN} {code}") == 1, lines
    assert [ln for ln in lines if ln.startswith("SENT")][1:] == [
        f"SENT user{n}@{DOMAIN} 250" for n in (1, 2)], lines
    lab.mta.wait_count(2)
    assert lab.mta.received() == [f"user1@{DOMAIN}", f"user2@{DOMAIN}"]
    assert "2 relayed, 1 refused, 0 deferred" in res.stdout, res.stdout


@pytest.mark.root
def test_provider_leg_dying_mid_data_leaves_the_office_nothing(lab: OdmrLab) -> None:
    # The first session dies 2 MB into a 4 MB message; the next one delivers it whole.
    server = scripted(lab, 1, "die:2000000", "quit")
    try:
        res = lab.etrnd("send", "-c", str(lab.config(
            port=3660, domains=[DOMAIN],
            retry="{first_delay: 200ms, max_delay: 500ms, give_up_after: 30s}")))
    finally:
        lines = stop(server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert lines.count("DIED") == 1 and f"SENT user0@{DOMAIN} 250" in lines, lines
    first = events(res.stderr, "odmr_message")[0]
    assert (first["outcome"], first["code"]) == ("deferred", 451), first
    assert first["size"] > MB, first  # it was streaming when the leg died
    lab.mta.wait_count(1)
    time.sleep(1)  # a partial copy would be delivered by now too
    assert lab.mta.count() == 1
    body = delivered_bodies(lab)[f"user0@{DOMAIN}"]
    assert body.rstrip("\n").endswith("end")  # the whole message, from the second session
    log = lab.mta.postfix.log()
    assert re.search(r"lost connection after DATA \(\d{6,} bytes\)", log), log[-2000:]


async def test_office_silent_past_the_bound_means_451_and_duplicate_risk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etrnd.protocols.odmr import client as odmr
    from etrnd.protocols.odmr import turnaround
    from tests.protocols.test_odmr_session import relay_for
    from tests.support.odmr_provider import Message, Office, Provider, serving

    class SlowOffice(Office):
        async def handle_DATA(self, *args: object) -> str:
            await asyncio.sleep(1.0)  # past the bound, then it does take the message
            self.received.append(args[2])  # type: ignore[arg-type]
            return "250 2.0.0 Ok: queued as 4OfficeQ1"

    monkeypatch.setattr(turnaround, "FINAL_REPLY_BOUND", 0.3, raising=False)
    body = (b"Received: from a.test by provider.test with esmtp id 1tProv-000001-AB\r\n"
            b"\tfor <u@example.test>; Sun, 6 Dec 2026 05:00:00 +0000\r\n"
            b"Subject: slow\r\n\r\nhello\r\n")
    queue = [Message("s@far.test", ["u@example.test"], body)]
    provider, office = Provider(queue=list(queue)), SlowOffice()
    async with serving(provider, office) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        with capture_logs() as logged:
            started = time.monotonic()
            result = await odmr.attempt(relay, relay.etrn)
            assert time.monotonic() - started < 1.0  # the provider was not kept waiting
            deadline = time.monotonic() + 10
            while len([e for e in logged if e["event"] == "odmr_duplicate_risk"]) < 2:
                assert time.monotonic() < deadline, logged
                await asyncio.sleep(0.05)
    assert (result.messages.relayed, result.messages.deferred) == (0, 1)
    assert provider.queue == queue and not provider.delivered  # it will offer it again
    assert any(line.startswith("C: 451 4.4.2") for line in provider.log), provider.log
    now, later = [e for e in logged if e["event"] == "odmr_duplicate_risk"]
    assert now["provider_queue_id"] == later["provider_queue_id"] == "1tProv-000001-AB"
    assert (now["office_queue_id"], later["office_queue_id"]) == ("", "4OfficeQ1")
    assert (later["office_code"], later["log_level"]) == (250, "warning")


def test_data_lines_reach_the_office_stuffed_and_with_crlf_only() -> None:
    from etrnd.protocols.odmr.stream import data_octets

    assert data_octets(b"..leading dot\r\n") == b"..leading dot\r\n"  # kept as stuffed
    assert data_octets(b"plain\r\n") == b"plain\r\n"
    # A bare LF followed by a dot must not become "CRLF . CRLF" at the office (smuggling).
    assert data_octets(b"a\n.\r\n") == b"a\r\n..\r\n"
    assert data_octets(b"a\r.b\nc\r\n") == b"a\r\n..b\r\nc\r\n"
    assert data_octets(b".x\n.\r\n") == b"x\r\n..\r\n"


async def test_size_is_advertised_from_the_office_or_max_message_size(tmp_path: Path) -> None:
    from etrnd.protocols.odmr import client as odmr
    from tests.protocols.test_odmr_session import mails, relay_for
    from tests.support.odmr_provider import Office, Provider, serving

    for limit, advertised in ((None, 33554432), (5000, 5000)):  # aiosmtpd's default, ours
        provider = Provider(queue=mails(1))
        async with serving(provider, Office()) as (port, office_port):
            relay, _ = relay_for(tmp_path, port, office_port)
            relay = dataclasses.replace(relay, max_message_size=limit)
            result = await odmr.attempt(relay, relay.etrn)
        assert result.messages.relayed == 1
        assert f"C: 250-SIZE {advertised}" in provider.log, provider.log
