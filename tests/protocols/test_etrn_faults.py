"""`etrnd send` and the ETRN client against scripted SMTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from etrnd.config.model import Relay, Retry
from etrnd.protocols import etrn
from etrnd.protocols.replies import Outcome
from etrnd.service.rounds import ArgOutcome, RelayStatus, run_all, run_round
from tests.support.fakesmtp import DROP, HANG, OK, PARTIAL, FakeSmtp, serve

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Tr0ub4dor-&3-never-log-me"


@dataclass
class Run:
    rc: int
    out: str
    err: str
    events: list[dict[str, Any]]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def write_config(tmp_path: Path, port: int, *, tls: str = "none",
                 etrn_args: tuple[str, ...] = ("@example.test",), hosts: str = "127.0.0.1",
                 timeout: str = "2s", give_up: str = "3s", extra: str = "") -> Path:
    host_key = f"hosts: [{hosts}]" if "," in hosts else f"host: {hosts}"
    path = tmp_path / "etrnd.yaml"
    path.write_text(
        "relays:\n"
        f"  - name: isp\n    {host_key}\n    port: {port}\n    tls: {tls}\n"
        f"    helo: office.test\n    timeout: {timeout}\n    etrn: {json.dumps(etrn_args)}\n"
        f"{extra}"
        f"retry: {{first_delay: 50ms, max_delay: 100ms, factor: 2, jitter: 0.1, "
        f"give_up_after: {give_up}}}\n"
        "log: {level: debug, format: json}\n"
    )
    return path


async def send(config: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    """Run `python -m etrnd send` while this test's event loop keeps serving SMTP."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etrnd", "send", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    events = []
    for line in err.decode().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    result = Run(proc.returncode, out.decode(), err.decode(), events)
    assert "Traceback" not in result.err
    return result


async def test_transient_replies_are_retried_until_accepted(tmp_path: Path) -> None:
    fake = FakeSmtp(etrn_replies=["458 Already processing example.test", "451 local error",
                                  "421 service closing", OK])
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port))
    assert run.rc == 0, run.err
    assert [c.line for c in fake.lines("ETRN")] == ["ETRN @example.test"] * 4
    assert fake.sessions == 4
    assert [e["attempt"] for e in run.named("etrn_retry")] == [1, 2, 3]
    assert run.named("round_done")[0]["accepted"] == ["@example.test"]


@pytest.mark.parametrize(
    ("reply", "etrns_sent"),
    [
        # Not retried this round, but the relay's other arguments are still sent: a real
        # Postfix answers 459 per domain (one it does not flush).
        ("459 <example.test>: service unavailable", 2),
        ("500 Syntax: ETRN domain", 1),  # ETRN not supported: ends it for the relay
        ("502 5.5.2 command not implemented", 1),
        ("501 Error: invalid parameter syntax", 2),  # only this argument is dropped
        ("554 5.7.1 <example.test>: Etrn command rejected: Access denied", 2),
    ],
)
async def test_permanent_replies_are_not_retried(tmp_path: Path, reply: str,
                                                 etrns_sent: int) -> None:
    fake = FakeSmtp(etrn_replies=[reply, OK])
    async with serve(fake):
        config = write_config(tmp_path, fake.port, etrn_args=("@example.test", "@other.test"))
        run = await send(config)
    assert run.rc == 3, run.err
    assert len(fake.lines("ETRN")) == etrns_sent
    assert run.named("etrn_retry") == []
    refused = run.named("etrn_refused")
    assert len(refused) == 1 and refused[0]["code"] == int(reply[:3])
    assert refused[0]["level"] == "error"
    done = run.named("round_done")[0]
    assert done["refused"][0] == "@example.test" and done["failed"] == []


@pytest.mark.parametrize(
    ("greetings", "replies", "error"),
    [
        (["HELLO this is not SMTP"], [], "SMTPResponseException"),
        (["554 go away"], [], "SMTPConnectResponseError"),
        ([HANG], [], "SMTPConnectTimeoutError"),
        ([], [PARTIAL], "SMTPServerDisconnected"),
        ([], [DROP], "SMTPServerDisconnected"),
        ([], [HANG], "SMTPReadTimeoutError"),
    ],
    ids=["garbage-greeting", "refusing-greeting", "silent-greeting", "dropped-mid-reply",
         "dropped", "never-answers"],
)
async def test_broken_servers_are_retried(tmp_path: Path, greetings: list[str],
                                          replies: list[str], error: str) -> None:
    fake = FakeSmtp(greetings=list(greetings), etrn_replies=list(replies))
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port, timeout="300ms"))
    assert run.rc == 0, run.err
    failed = run.named("etrn_session_failed")
    assert [e["error"] for e in failed] == [error]
    assert len(run.named("etrn_retry")) == 1
    assert fake.sessions == 2


async def test_gives_up_at_the_deadline(tmp_path: Path) -> None:
    fake = FakeSmtp(etrn_replies=["451 try later"] * 100)
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port, give_up="400ms"))
    assert run.rc == 4, run.err
    gave_up = run.named("etrn_gave_up")
    assert len(gave_up) == 1 and gave_up[0]["level"] == "error"
    assert 0.4 <= gave_up[0]["elapsed_s"] < 1.5
    assert len(fake.lines("ETRN")) == gave_up[0]["attempts"] >= 3


async def test_failover_to_the_next_host(tmp_path: Path) -> None:
    fake = FakeSmtp()
    async with serve(fake):
        # nothing listens on 127.0.0.3: refused at once, then the second host answers
        run = await send(write_config(tmp_path, fake.port, hosts="127.0.0.3, 127.0.0.1"))
    assert run.rc == 0, run.err
    assert [e["host"] for e in run.named("etrn_session_failed")] == ["127.0.0.3"]
    assert run.named("etrn_retry") == []  # failover is part of the same attempt
    assert run.named("etrn_reply")[0]["host"] == "127.0.0.1"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The environment that makes the client trust the test CA (and only it)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return {"SSL_CERT_FILE": str(path)}


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


async def test_starttls_verified(tmp_path: Path, ca: trustme.CA,
                                 ca_file: dict[str, str]) -> None:
    fake = FakeSmtp(tls=server_context(ca, "127.0.0.1"))
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port, tls="starttls"), env=ca_file)
    assert run.rc == 0, run.err
    assert [c.tls for c in fake.lines("ETRN")] == [True]
    assert [c.tls for c in fake.lines("EHLO")] == [False, True]  # EHLO again after STARTTLS
    assert run.named("etrn_session")[0]["tls"] == "starttls"


@pytest.mark.parametrize("tls", ["starttls", "opportunistic"])
async def test_wrong_certificate_name_fails_and_sends_nothing(
        tmp_path: Path, ca: trustme.CA, ca_file: dict[str, str], tls: str) -> None:
    fake = FakeSmtp(tls=server_context(ca, "mail.elsewhere.test"))
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port, tls=tls, give_up="200ms"),
                         env=ca_file)
    assert run.rc == 4, run.err
    assert fake.lines("ETRN") == []
    assert {e["error"] for e in run.named("etrn_session_failed")} == {"SSLCertVerificationError"}


async def test_verify_false_accepts_any_certificate_and_warns(
        tmp_path: Path, ca: trustme.CA) -> None:
    fake = FakeSmtp(tls=server_context(ca, "mail.elsewhere.test"))
    async with serve(fake):
        config = write_config(tmp_path, fake.port, tls="starttls", extra="    verify: false\n")
        run = await send(config)
    assert run.rc == 0, run.err
    assert [c.tls for c in fake.lines("ETRN")] == [True]
    assert len(run.named("tls_not_verified")) == 1


async def test_implicit_tls(tmp_path: Path, ca: trustme.CA, ca_file: dict[str, str]) -> None:
    fake = FakeSmtp()
    async with serve(fake, implicit_tls=server_context(ca, "127.0.0.1")):
        run = await send(write_config(tmp_path, fake.port, tls="implicit"), env=ca_file)
    assert run.rc == 0, run.err
    assert len(fake.lines("ETRN")) == 1
    assert run.named("etrn_session")[0]["tls"] == "implicit"


async def test_starttls_required_but_not_offered_sends_nothing(tmp_path: Path) -> None:
    fake = FakeSmtp()
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port, tls="starttls", give_up="200ms"))
    assert run.rc == 4, run.err
    assert {c.line.split()[0] for c in fake.commands} <= {"EHLO", "QUIT"}
    assert {e["error"] for e in run.named("etrn_session_failed")} == {"StartTLSNotOffered"}


def auth_block(tmp_path: Path, password: str) -> str:
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    return f"    auth: {{username: office, password_file: {secret}}}\n"


def assert_no_secret(run: Run) -> None:
    output = run.out + run.err
    plain = base64.b64encode(f"\0office\0{PASSWORD}".encode()).decode()
    for leak in (PASSWORD, plain, base64.b64encode(PASSWORD.encode()).decode()):
        assert leak not in output


@pytest.mark.parametrize(("password", "rc"), [(PASSWORD, 0), ("wrong", 3)])
async def test_auth_over_starttls(tmp_path: Path, ca: trustme.CA, ca_file: dict[str, str],
                                  password: str, rc: int) -> None:
    fake = FakeSmtp(tls=server_context(ca, "127.0.0.1"), auth=("office", PASSWORD))
    async with serve(fake):
        config = write_config(tmp_path, fake.port, tls="starttls",
                              extra=auth_block(tmp_path, password))
        run = await send(config, env=ca_file)
    assert run.rc == rc, run.err
    auths = fake.lines("AUTH")
    assert len(auths) == 1 and auths[0].tls  # one try only: a bad password is not repeated
    assert len(fake.lines("ETRN")) == (1 if rc == 0 else 0)
    if rc:
        assert run.named("etrn_auth_failed")[0]["code"] == 535
        assert run.named("etrn_retry") == []
    assert_no_secret(run)


async def test_auth_never_sent_in_clear(tmp_path: Path) -> None:
    fake = FakeSmtp(auth=("office", PASSWORD))  # offers AUTH, but no STARTTLS
    async with serve(fake):
        config = write_config(tmp_path, fake.port, tls="opportunistic", give_up="200ms",
                              extra=auth_block(tmp_path, PASSWORD))
        run = await send(config)
    assert run.rc == 4, run.err
    assert fake.lines("AUTH") == [] and fake.lines("ETRN") == []
    assert {e["error"] for e in run.named("etrn_session_failed")} == {"AuthWithoutTLS"}
    assert_no_secret(run)


@pytest.mark.parametrize("tls", ["none", "starttls"])
async def test_no_auth_offered_is_permanent_for_the_relay(
        tmp_path: Path, ca: trustme.CA, ca_file: dict[str, str], tls: str) -> None:
    # A server that offers no AUTH at all (as protected as the config asks): a setup
    # mismatch, refused at once (exit 3), not retried until give_up_after.
    fake = FakeSmtp(tls=server_context(ca, "127.0.0.1") if tls == "starttls" else None)
    async with serve(fake):
        block = auth_block(tmp_path, PASSWORD)
        if tls == "none":
            block = block.replace("}", ", allow_plaintext: true}")
        config = write_config(tmp_path, fake.port, tls=tls, give_up="1h", extra=block)
        run = await send(config, env=ca_file)
    assert run.rc == 3, run.err
    assert fake.lines("AUTH") == [] and fake.lines("ETRN") == []
    assert len(fake.lines("EHLO")) == (2 if tls == "starttls" else 1)  # one session only
    [failed] = run.named("etrn_auth_failed")
    assert (failed["level"], failed["error"]) == ("error", "AuthNotOffered")
    assert run.named("etrn_retry") == []
    # The relay's setup, not the domain, is what refused: the line says so.
    assert "; refused: -; failed: -; relay refused for @example.test: auth: is configured " \
        "but the server offers no usable AUTH mechanism" in run.out, run.out
    assert_no_secret(run)


async def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, 25)
    run = await send(config, "--relay", "nope")
    assert run.rc == 2 and run.err.strip().splitlines() == [
        "etrnd: no relay named 'nope' (configured: isp)"]
    run = await send(config, "@ok.test", "bad\rarg")
    assert run.rc == 2 and len(run.err.strip().splitlines()) == 1
    assert run.err.startswith("etrnd: argument 'bad\\rarg': ")


async def test_explicit_arguments_override_config(tmp_path: Path) -> None:
    fake = FakeSmtp(etrn_replies=["253 OK, 14 pending messages for node x.test started"])
    async with serve(fake):
        run = await send(write_config(tmp_path, fake.port), "--relay", "isp", "#q1", "@x.test")
    assert run.rc == 0, run.err
    assert [c.line for c in fake.lines("ETRN")] == ["ETRN #q1", "ETRN @x.test"]
    assert run.named("etrn_reply")[0]["pending"] == 14


# In-process: the API the daemon uses.

def relay(port: int, **kw: Any) -> Relay:
    return Relay(**{"name": "isp", "host": "127.0.0.1", "port": port, "tls": "none",
                    "helo": "office.test", "timeout": 2.0, "etrn": ("@a.test",), **kw})


async def test_many_arguments_use_several_sessions() -> None:
    fake = FakeSmtp(extensions=[])  # hides ETRN from EHLO but accepts it
    args = [f"@d{i}.test" for i in range(12)]
    async with serve(fake):
        result = await etrn.attempt(relay(fake.port), args)
    assert result.stop is None
    assert [v.outcome for v in result.replies.values()] == [Outcome.ACCEPTED] * 12
    per_session = [sum(c.session == s for c in fake.lines("ETRN")) for s in (1, 2, 3)]
    assert per_session == [5, 5, 2]


async def test_crlf_never_reaches_the_wire() -> None:
    fake = FakeSmtp()
    async with serve(fake):
        result = await etrn.attempt(relay(fake.port), ["@a.test\r\nQUIT", "@b.test"])
    assert result.replies["@a.test\r\nQUIT"].outcome is Outcome.REFUSED_ARG
    assert result.replies["@b.test"].outcome is Outcome.ACCEPTED
    assert [c.line for c in fake.lines("ETRN")] == ["ETRN @b.test"]


async def test_cancel_closes_the_session_with_quit() -> None:
    fake = FakeSmtp(etrn_replies=[HANG])
    async with serve(fake):
        task = asyncio.create_task(etrn.attempt(relay(fake.port, timeout=30), ["@a.test"]))
        for _ in range(500):
            if fake.lines("ETRN"):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        for _ in range(300):
            if fake.lines("QUIT"):
                break
            await asyncio.sleep(0.01)
    assert len(fake.lines("QUIT")) == 1


async def test_round_status_and_injected_retry_timing() -> None:
    fake = FakeSmtp(etrn_replies=["458 busy", OK])
    delays: list[float] = []

    async def no_wait(delay: float) -> None:
        delays.append(delay)

    status = RelayStatus("isp")
    async with serve(fake):
        result = await run_round(relay(fake.port), Retry(first_delay=7, jitter=0),
                                 ["@a.test", "@b.test"], status, sleep=no_wait,
                                 wall=lambda: 1000.0)
    # @a.test: 458 then accepted on the retry; @b.test: accepted at once, never resent
    assert delays == [7.0]
    assert [c.line for c in fake.lines("ETRN")] == ["ETRN @a.test", "ETRN @b.test",
                                                    "ETRN @a.test"]
    assert result.accepted == ("@a.test", "@b.test") and result.ok
    a, b = status.args["@a.test"], status.args["@b.test"]
    assert (a.outcome, a.code, a.attempts, a.when) == (ArgOutcome.ACCEPTED, 250, 2, 1000.0)
    assert (b.outcome, b.attempts) == (ArgOutcome.ACCEPTED, 1)
    assert status.attempts == 2 and status.host == "127.0.0.1" and not status.running
    assert json.dumps(status.as_dict())


async def test_cancelling_a_round_stops_retries_at_once() -> None:
    fake = FakeSmtp(etrn_replies=["451 later"] * 10)
    status = RelayStatus("isp")
    async with serve(fake):
        task = asyncio.create_task(run_round(relay(fake.port), Retry(first_delay=60),
                                             None, status))
        for _ in range(500):
            if status.next_try is not None:
                break
            await asyncio.sleep(0.01)
        assert status.next_try is not None and status.args["@a.test"].outcome == "failed"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
    assert len(fake.lines("ETRN")) == 1
    assert status.next_try is None and not status.running


async def test_relays_run_in_parallel_and_one_failure_stays_its_own() -> None:
    async def no_wait(delay: float) -> None:
        return None

    hanging, fine = FakeSmtp(etrn_replies=[HANG]), FakeSmtp()
    async with serve(hanging), serve(fine):
        slow = relay(hanging.port, name="slow", timeout=0.5)
        dead = relay(1, name="dead")  # nothing listens on port 1
        good = relay(fine.port, name="good", etrn=["@g.test"])
        # each clock reading is 2 s later: every relay's deadline passes after one attempt
        results = await run_all([slow, dead, good], Retry(first_delay=1, give_up_after=1),
                                sleep=no_wait, clock=iter(range(0, 1000, 2)).__next__)
    by_name = {r.relay: r for r in results}
    assert by_name["good"].accepted == ("@g.test",) and by_name["good"].ok
    assert by_name["dead"].failed == ("@a.test",)
    assert by_name["slow"].failed == ("@a.test",)


async def test_a_crashing_relay_does_not_take_the_others_down() -> None:
    async def send(r: Relay, args: Any, **kw: Any) -> etrn.AttemptResult:
        if r.label == "bad":
            raise RuntimeError("bug")
        return await etrn.attempt(r, args, **kw)

    fake = FakeSmtp()
    async with serve(fake):
        results = await run_all([relay(fake.port, name="bad"), relay(fake.port, name="good")],
                                Retry(), send=send)
    assert [(r.relay, r.accepted, r.failed) for r in results] == [
        ("bad", (), ("@a.test",)), ("good", ("@a.test",), ())]
