"""The ODMR session (RFC 2645) against a scripted provider and an aiosmtpd office MTA."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs

from etrnd.config.model import Relay, Retry
from etrnd.config.schema import parse_yaml
from etrnd.outputs import status as status_doc
from etrnd.protocols.odmr import client as odmr
from etrnd.protocols.odmr import turnaround
from etrnd.protocols.replies import Outcome
from etrnd.service.rounds import ArgOutcome, RelayStatus, run_round
from tests.support.odmr_provider import PASSWORD, USER, Message, Office, Provider, serving

ROOT = Path(__file__).resolve().parents[2]


def config_text(tmp_path: Path, port: int, office: str, *, domains: tuple[str, ...] = (
        "example.test",), timeout: str = "2s", plaintext: bool = True,
        give_up: str = "5s") -> str:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    return (
        "relays:\n  - name: isp\n    host: 127.0.0.1\n    protocol: odmr\n"
        f"    port: {port}\n    tls: none\n    helo: office.test\n    timeout: {timeout}\n"
        f"    auth: {{username: {USER}, password_file: {pw}, "
        f"allow_plaintext: {'true' if plaintext else 'false'}}}\n"
        f"    etrn: {json.dumps(list(domains))}\n    deliver_to: {json.dumps(office)}\n"
        f"retry: {{first_delay: 0.05s, max_delay: 0.1s, give_up_after: {give_up}}}\n"
        "log: {level: debug, format: json}\n")


def relay_for(tmp_path: Path, port: int, office_port: int, **kw: Any) -> tuple[Relay, Retry]:
    office = kw.pop("office", f"127.0.0.1:{office_port}")
    config = parse_yaml(config_text(tmp_path, port, office, **kw))
    return config.relays[0], config.retry


def mails(n: int, domain: str = "example.test", rcpts: int = 1) -> list[Message]:
    return [Message(f"sender{i}@far.test", [f"u{i}.{r}@{domain}" for r in range(rcpts)])
            for i in range(n)]


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def test_atrn_lines_stay_within_512_octets() -> None:
    domains = [f"{'d' * 50}{i}.example.test" for i in range(40)]
    batches = odmr.atrn_batches(domains)
    assert [d for b in batches for d in b] == domains and len(batches) > 1
    assert all(len(f"ATRN {','.join(b)}\r\n") <= 512 for b in batches)
    assert odmr.atrn_batches(["a.test", "b.test"]) == [["a.test", "b.test"]]


async def test_every_message_reaches_the_office_before_the_provider_hears_250(
        tmp_path: Path) -> None:
    queue = mails(6) + mails(2, rcpts=3) + mails(2, "other.test")
    provider, office = Provider(queue=list(queue)), Office()
    async with serving(provider, office) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        with capture_logs() as events:
            result = await odmr.attempt(relay, relay.etrn)
    assert result.stop is None
    assert result.replies["example.test"].outcome is Outcome.ACCEPTED
    assert (result.messages.relayed, result.messages.refused, result.messages.deferred) == (
        8, 0, 0)
    assert len(office.received) == 8 and len(provider.delivered) == 8
    assert [m.domain() for m in provider.queue] == ["other.test"] * 2  # not asked for
    assert sum(len(e.rcpt_tos) for e in office.received) == 12
    assert office.received[0].content.endswith(b"\r\n.leading dot\r\n")  # dot-stuffing undone
    assert "ATRN example.test" in "\n".join(provider.log)
    # It relayed mail, so the domain is asked again, in a new session: 453, nothing more.
    assert [ln for ln in provider.log if ln.startswith("C: AUTH")] == ["C: AUTH CRAM-MD5"] * 2
    assert [e["relayed"] for e in events if e["event"] == "odmr_again"] == [8]
    assert result.replies["example.test"].code == 250  # the turnaround's verdict, not the 453
    done = [e for e in events if e["event"] == "odmr_done"]
    assert [(e["relayed"], e["refused"], e["deferred"], e["ended"]) for e in done] == [
        (8, 0, 0, "quit")]
    per_message = [e for e in events if e["event"] == "odmr_message"]
    assert len(per_message) == 8 and per_message[-1]["recipients"] == 3
    assert {e["outcome"] for e in per_message} == {"relayed"}
    assert all(e["size"] > 0 and e["sender"].endswith("@far.test") for e in per_message)
    assert PASSWORD not in json.dumps(events, default=str)


async def test_starttls_then_plain_and_the_turnaround_stays_encrypted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    provider, office = Provider(queue=mails(2), tls=server), Office()
    async with serving(provider, office) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, plaintext=False)
        relay = dataclasses.replace(relay, tls="starttls")
        result = await odmr.attempt(relay, relay.etrn)
    assert result.messages.relayed == 2 and len(office.received) == 2
    assert provider.tls_log[0] == "EHLO office.test"
    assert provider.tls_log[1].startswith("AUTH PLAIN ")  # under TLS PLAIN comes first
    assert "220 office.test etrnd ODMR" in provider.tls_log  # our greeting, encrypted
    assert any(line.startswith("250") for line in provider.tls_log[3:])


async def test_sessions_leave_from_the_source_address(tmp_path: Path) -> None:
    provider = Provider(queue=mails(1))
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        relay = dataclasses.replace(relay, source="127.0.0.2")
        result = await odmr.attempt(relay, relay.etrn)
    # Two sessions (the second ATRN, after mail came, gets 453), both from that address.
    assert result.messages.relayed == 1 and provider.peers == ["127.0.0.2"] * 2


@pytest.mark.parametrize("office_utf8", [True, False])
async def test_smtputf8_mail_passes_when_the_office_takes_it(tmp_path: Path,
                                                           office_utf8: bool) -> None:
    message = Message("jörg@fernweh.test", ["zoë@example.test"], utf8=True)
    provider, office = Provider(queue=[message]), Office(utf8=office_utf8)
    async with serving(provider, office) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        result = await odmr.attempt(relay, relay.etrn)
    if office_utf8:
        assert result.messages.relayed == 1 and not provider.queue
        assert (office.received[0].mail_from, office.received[0].rcpt_tos) == (
            "jörg@fernweh.test", ["zoë@example.test"])
        assert office.received[0].smtp_utf8
    else:  # the provider returns it to the sender: nothing vanishes
        assert result.messages.refused == 1 and provider.bounced == [message]
        assert "C: 553 5.6.7 the office MTA does not take SMTPUTF8 mail" in provider.log


async def test_cram_md5_without_tls_and_nothing_in_clear(tmp_path: Path) -> None:
    provider = Provider(queue=mails(1))
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, plaintext=False)
        result = await odmr.attempt(relay, relay.etrn)
    assert result.messages.relayed == 1
    assert [ln for ln in provider.log if ln.startswith("C: AUTH")] == ["C: AUTH CRAM-MD5"] * 2

    provider = Provider(queue=mails(1), mechanisms="PLAIN LOGIN")
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, plaintext=False)
        result = await odmr.attempt(relay, relay.etrn)
    assert result.stop is not None and result.stop.error == "AuthNotOffered"
    assert result.stop.outcome is Outcome.REFUSED_RELAY  # a setup problem: not retried
    assert not [ln for ln in provider.log if ln.startswith(("C: AUTH", "C: ATRN"))]


@pytest.mark.parametrize(("reply", "outcome", "arg_outcome"), [
    ("453 You have no mail", Outcome.ACCEPTED, ArgOutcome.ACCEPTED),
    ("450 ATRN request refused", Outcome.REFUSED_RELAY, ArgOutcome.REFUSED),
    ("502 ATRN command used when not advertised", Outcome.REFUSED_RELAY, ArgOutcome.REFUSED),
    ("530 ATRN is not permitted without authentication", Outcome.REFUSED_RELAY,
     ArgOutcome.REFUSED),
])
async def test_atrn_replies(tmp_path: Path, reply: str, outcome: Outcome,
                            arg_outcome: ArgOutcome) -> None:
    provider = Provider(queue=mails(2), atrn_replies=[reply])
    async with serving(provider, Office()) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        status = RelayStatus("isp")
        round_result = await run_round(relay, retry, None, status, sleep=no_sleep)
    assert status.args["example.test"].outcome is arg_outcome
    assert status.args["example.test"].code == int(reply[:3])
    assert round_result.attempts == 1 and len(provider.queue) == 2
    assert (round_result.ok, outcome is Outcome.ACCEPTED) == (outcome is Outcome.ACCEPTED,) * 2


async def test_wrong_password_is_permanent_and_tried_once(tmp_path: Path) -> None:
    provider = Provider(queue=mails(1))
    async with serving(provider, Office()) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        relay.auth.password_file.__dict__["value"] = "wrong"  # type: ignore[union-attr]
        status = RelayStatus("isp")
        result = await run_round(relay, retry, None, status, sleep=no_sleep)
    assert result.refused == ("example.test",) and result.attempts == 1
    assert status.args["example.test"].code == 535
    assert len([ln for ln in provider.log if ln.startswith("C: AUTH")]) == 1


async def test_451_is_retried_then_delivered(tmp_path: Path) -> None:
    provider = Provider(queue=mails(3), atrn_replies=["451 try later"])
    async with serving(provider, Office()) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        status = RelayStatus("isp")
        result = await run_round(relay, retry, None, status, sleep=no_sleep)
    assert result.ok and result.attempts == 2 and status.messages.relayed == 3
    assert not provider.queue


async def test_office_451_to_one_recipient_the_provider_keeps_it_totals_add_up(
        tmp_path: Path) -> None:
    queue = mails(5)
    office = Office(rcpt_replies={queue[2].rcpts[0]: ["451 4.3.0 mailbox busy"]})
    provider = Provider(queue=list(queue))  # like Exim: a 451 ends the ATRN session
    async with serving(provider, office) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        status = RelayStatus("isp")
        with capture_logs() as events:
            result = await run_round(relay, retry, None, status, sleep=no_sleep)
    # The session after the 451 brings the rest (this provider has no retry time): one
    # attempt, asking again until 453.
    assert result.ok and result.attempts == 1
    assert not provider.queue and len(office.received) == 5
    assert sorted(e.mail_from for e in office.received) == sorted(m.sender for m in queue)
    assert (status.messages.relayed, status.messages.deferred) == (5, 1)
    # The deferral (a 451 to RCPT: no header seen) is settled by the later relay of that
    # recipient: the round knows nothing is left behind.
    rcpt_key = f"{queue[2].sender}|{queue[2].rcpts[0]}"
    assert status.messages.deferred_ids == {rcpt_key}
    assert rcpt_key in status.messages.relayed_ids and not status.messages.left_behind()
    deferred = [e for e in events if e["event"] == "odmr_message" and e["outcome"] == "deferred"]
    assert [(d["code"], d["sender"]) for d in deferred] == [(451, queue[2].sender)]
    assert [e for e in events if e["event"] == "etrn_retry"] == []
    assert [e["relayed"] for e in events if e["event"] == "odmr_again"] == [2, 3]
    assert provider.after_quit.startswith(b"221") and b"QUIT" not in provider.after_quit


async def test_office_refusal_goes_back_as_5xx_and_counts_as_refused(tmp_path: Path) -> None:
    queue = mails(3)
    office = Office(rcpt_replies={queue[1].rcpts[0]: ["550 5.1.1 no such user"]})
    provider = Provider(queue=list(queue))
    async with serving(provider, office) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        result = await run_round(relay, retry, None, sleep=no_sleep)
    assert result.accepted == ("example.test",) and not result.ok
    assert (result.messages.relayed, result.messages.refused) == (2, 1)
    assert provider.bounced == [queue[1]] and not provider.queue


async def test_stall_after_turnaround_times_out_and_keeps_the_queue(tmp_path: Path) -> None:
    provider = Provider(queue=mails(2), after_turnaround="stall")
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, timeout="0.5s")
        result = await asyncio.wait_for(odmr.attempt(relay, relay.etrn), 20)
    verdict = result.replies["example.test"]
    assert (verdict.outcome, verdict.error) == (Outcome.TRANSIENT, "TurnaroundTimeout")
    assert len(provider.queue) == 2 and result.messages.relayed == 0


async def test_a_trickling_provider_cannot_hold_the_round_for_ever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turnaround, "MAX_TURNAROUND", 1.0)
    provider = Provider(queue=mails(1), after_turnaround="trickle")
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, timeout="0.5s")
        result = await asyncio.wait_for(odmr.attempt(relay, relay.etrn), 20)
    assert result.replies["example.test"].error == "TurnaroundTimeout"
    assert len(provider.queue) == 1


async def test_drop_after_turnaround_keeps_what_was_accepted(tmp_path: Path) -> None:
    # Each turnaround drops after one message: what was accepted stays delivered, and since
    # mail came, the domain is asked again until the provider has nothing more.
    provider = Provider(queue=mails(4), after_turnaround="drop_after_first")
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        with capture_logs() as events:
            first = await odmr.attempt(relay, relay.etrn)
    done = [(e["relayed"], e["ended"]) for e in events if e["event"] == "odmr_done"]
    assert done == [(1, "dropped")] * 3 + [(1, "quit")], done
    assert first.messages.relayed == 4 and not provider.queue
    assert first.replies["example.test"].outcome is Outcome.ACCEPTED


async def test_a_4xx_to_asking_again_keeps_the_domain_open(tmp_path: Path) -> None:
    # Mail came, then the next ATRN gets 451: more may be waiting,
    # so the domain is not accepted on the strength of the first turnaround.
    provider = Provider(queue=mails(2), atrn_replies=["250", "451 try later"])
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port)
        first = await odmr.attempt(relay, relay.etrn)
    assert first.messages.relayed == 2
    verdict = first.replies["example.test"]
    assert (verdict.outcome, verdict.code) == (Outcome.TRANSIENT, 451), verdict


async def test_office_down_means_451_and_nothing_lost(tmp_path: Path) -> None:
    provider = Provider(queue=mails(3))
    async with serving(provider, Office()) as (port, _):
        relay, _ = relay_for(tmp_path, port, 0, office="127.0.0.1:1")
        result = await odmr.attempt(relay, relay.etrn)
    assert result.replies["example.test"].outcome is Outcome.TRANSIENT
    assert len(provider.queue) == 3 and not provider.delivered
    assert result.messages.deferred == 1  # Exim-like: the first 451 ends the session


async def test_lmtp_one_recipient_per_transaction(tmp_path: Path) -> None:
    provider = Provider(queue=mails(2, rcpts=2), stop_on_451=False, quit_with_fin=False)
    office = Office()
    async with serving(provider, office, lmtp=True) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port,
                                 office=f"lmtp:127.0.0.1:{office_port}")
        status = RelayStatus("isp")
        result = await run_round(relay, retry, None, status, sleep=no_sleep)
    assert result.ok and not provider.queue
    assert sorted(r for e in office.received for r in e.rcpt_tos) == sorted(
        r for m in mails(2, rcpts=2) for r in m.rcpts)


async def test_messages_count_live_and_survive_a_cancel(tmp_path: Path) -> None:
    provider, office = Provider(queue=mails(3), after_turnaround="stall_after_first"), Office()
    async with serving(provider, office) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port, timeout="30s")
        status = RelayStatus("isp")
        task = asyncio.create_task(run_round(relay, retry, None, status, sleep=no_sleep))
        # etrnd counts a message before it says 250 to the provider
        await asyncio.wait_for(provider.confirmed.wait(), 10)
        assert status.running and status.messages.relayed == 1  # while the round runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert (status.running, status.messages.relayed) == (False, 1)
    assert len(provider.queue) == 2


async def test_cancel_during_turnaround_closes_and_keeps_the_queue(tmp_path: Path) -> None:
    provider = Provider(queue=mails(2), after_turnaround="stall")
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, timeout="30s")
        task = asyncio.create_task(odmr.attempt(relay, relay.etrn))
        await asyncio.wait_for(provider.greeted.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert len(provider.queue) == 2


async def run_send(config: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etrnd", "send", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None and "Traceback" not in err.decode()
    return proc.returncode, out.decode(), err.decode()


async def test_send_exit_codes_and_counts(tmp_path: Path) -> None:
    config = tmp_path / "etrnd.yaml"
    provider = Provider(queue=mails(3))
    async with serving(provider, Office()) as (port, office_port):
        config.write_text(config_text(tmp_path, port, f"127.0.0.1:{office_port}"))
        rc, out, err = await run_send(config)
        assert (rc, out.strip()) == (0, "relay isp: 3 relayed, 0 refused, 0 deferred; "
                                        "accepted: example.test; refused: -; failed: -; "
                                        "attempts: 1"), err
        events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert [e["relayed"] for e in events if e["event"] == "odmr_done"] == [3]

        provider.atrn_replies = ["535 Incorrect authentication data"]
        rc, out, _ = await run_send(config)
        assert rc == 3 and "relay refused for example.test: 535 Incorrect authentication " \
            "data" in out, out

        provider.atrn_replies, provider.mechanisms = [], "PLAIN LOGIN"  # no CRAM-MD5
        config.write_text(config_text(tmp_path, port, f"127.0.0.1:{office_port}",
                                      plaintext=False, give_up="1h"))
        rc, out, err = await run_send(config)
        assert rc == 3 and "relay refused for example.test: no AUTH mechanism usable" in out, out
        events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert [(e["level"], e["error"]) for e in events
                if e["event"] == "odmr_auth_failed"] == [("error", "AuthNotOffered")]
        assert not [e for e in events if e["event"] == "etrn_retry"]
        provider.mechanisms = "PLAIN LOGIN CRAM-MD5"

        provider.queue, provider.after_turnaround = mails(1), "stall"
        config.write_text(config_text(tmp_path, port, f"127.0.0.1:{office_port}",
                                      timeout="0.3s", give_up="0.5s"))
        rc, out, _ = await run_send(config)
        assert rc == 4 and "failed: example.test" in out and len(provider.queue) == 1


async def test_status_shows_the_rounds_messages(tmp_path: Path) -> None:
    provider = Provider(queue=mails(3))
    async with serving(provider, Office()) as (port, office_port):
        relay, retry = relay_for(tmp_path, port, office_port)
        st = RelayStatus("isp")
        await run_round(relay, retry, None, st, sleep=no_sleep)
    entry = status_doc.relay_status(relay, st, running=False)
    assert (entry["protocol"], entry["messages"]) == (
        "odmr", {"relayed": 3, "refused": 0, "deferred": 0})
    assert entry["args"][0]["outcome"] == "accepted" and entry["args"][0]["code"] == 250
    text = status_doc.render({"relays": [entry]})
    assert "  messages this round: 3 relayed, 0 refused, 0 deferred" in text
    assert status_doc.summary(True, [relay], {"isp": st}, ()) == (
        "link up; isp: 1/1 accepted, 3 relayed")


async def test_debug_transcript_covers_all_three_legs(tmp_path: Path) -> None:
    config = tmp_path / "etrnd.yaml"
    provider = Provider(queue=mails(1), mechanisms="PLAIN")
    async with serving(provider, Office()) as (port, office_port):
        config.write_text(config_text(tmp_path, port, f"127.0.0.1:{office_port}"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "etrnd", "send", "-v", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert PASSWORD not in err.decode()
    lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    said = [(e["event"], e.get("leg"), e["line"]) for e in lines
            if e["event"] in ("smtp_send", "smtp_recv")]
    assert ("smtp_send", None, "AUTH PLAIN <redacted>") in said
    assert ("smtp_send", None, "ATRN example.test") in said
    assert ("smtp_recv", None, "EHLO provider.test") in said  # the provider, reversed
    assert ("smtp_recv", None, "<message body>") in said
    assert ("smtp_send", "local", "DATA") in said and ("smtp_send", "local", "QUIT") in said
    assert ("smtp_recv", None, "QUIT") in said


async def test_domains_beyond_one_atrn_line_take_further_sessions(tmp_path: Path) -> None:
    domains = tuple(f"{'d' * 55}{i}.example.test" for i in range(20))
    first, last = domains[0], domains[-1]
    provider = Provider(queue=mails(2, first) + mails(3, last))
    async with serving(provider, Office()) as (port, office_port):
        relay, _ = relay_for(tmp_path, port, office_port, domains=domains)
        result = await odmr.attempt(relay, relay.etrn)
    atrns = [ln for ln in provider.log if ln.startswith("C: ATRN ")]
    batches = [f"C: ATRN {','.join(b)}" for b in odmr.atrn_batches(domains)]
    # each batch once; the two that brought mail (first, last) once more, until 453
    assert len(batches) >= 3 and atrns == [batches[0], *batches, batches[-1]], atrns
    assert all(len(ln) - 3 + 2 <= 512 for ln in atrns)
    assert result.stop is None and set(result.replies) == set(domains)
    assert result.messages.relayed == 5 and not provider.queue


class _HoldingOffice(Office):
    """An office MTA that sits on the first RCPT until the test lets go."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.holding.set()
        await self.release.wait()
        return await super().handle_RCPT(server, session, envelope, address, options)


async def test_cancel_while_the_office_holds_a_reply_leaves_no_stray_error(
        tmp_path: Path) -> None:
    """A stop or link-down mid-RCPT: the receiving side's reply then meets a closed
    connection; that is how the turnaround ends, not an error for asyncio to report."""
    import gc

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        provider, office = Provider(queue=mails(2), after_turnaround="deliver"), _HoldingOffice()
        async with serving(provider, office) as (port, office_port):
            relay, _ = relay_for(tmp_path, port, office_port, timeout="30s")
            task = asyncio.create_task(odmr.attempt(relay, relay.etrn))
            await asyncio.wait_for(office.holding.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            office.release.set()
            for _ in range(20):  # let the receiving side's handler run to its end
                await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []
    assert len(provider.queue) == 2
