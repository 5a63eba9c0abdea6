"""Debug transcripts: every SMTP line each way, AUTH redacted in every format, bodies sized."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from etrnd.outputs import logs
from etrnd.protocols import etrn
from etrnd.protocols.transcript import BODY, MAX_LINE, Transcript, TranscriptSMTP
from tests.protocols.test_etrn_faults import relay, send
from tests.service.test_logging import receive
from tests.support import docs
from tests.support.authsmtp import CHALLENGE, MECHANISMS, AuthServer, serve
from tests.support.fakesmtp import OK, PARTIAL, FakeSmtp
from tests.support.fakesmtp import serve as serve_fake

USER = "office"
PASSWORD = "Tr0ub4dor-&3-never-log-me"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_env(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return {"SSL_CERT_FILE": str(path)}


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def write_config(tmp_path: Path, port: int, fmt: str) -> Path:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    path = tmp_path / "etrnd.yaml"
    path.write_text(
        f"relays:\n  - name: isp\n    host: 127.0.0.1\n    port: {port}\n    tls: starttls\n"
        f"    helo: office.test\n    timeout: 5s\n    etrn: ['@example.test']\n"
        f"    auth: {{username: {USER}, password_file: {secret}}}\n"
        "retry: {first_delay: 50ms, max_delay: 100ms, give_up_after: 5s}\n"
        f"log: {{level: info, format: {fmt}}}\n"  # -v is what turns debug on
    )
    return path


def dialogue(events: list[dict[str, Any]]) -> list[str]:
    return [f"{'>' if e['event'] == 'smtp_send' else '<'} {e['line']}" for e in events
            if e.get("event") in ("smtp_send", "smtp_recv")]


async def test_tls_auth_session_transcript(tmp_path: Path, ca: trustme.CA,
                                          ca_env: dict[str, str]) -> None:
    spec = AuthServer(USER, PASSWORD, "PLAIN", server_tls(ca))
    async with serve(spec):
        config = write_config(tmp_path, spec.port, "json")
        quiet = await send(config, env=ca_env)
        run = await send(config, "-v", env=ca_env)
        console = await send(write_config(tmp_path, spec.port, "console"), "-v", env=ca_env)
    assert quiet.rc == 0 and run.rc == 0 and console.rc == 0, run.err
    assert spec.logins == [True] * 3 and len(spec.etrn) == 3
    assert dialogue(quiet.events) == []  # level info: no transcript
    assert dialogue(run.events) == [
        "< 220 isp.test ESMTP",
        "> EHLO office.test",
        "< 250-isp.test",
        "< 250-SIZE 33554432",
        "< 250-8BITMIME",
        "< 250-STARTTLS",
        "< 250-ETRN",
        "< 250 HELP",
        "> STARTTLS",
        "< 220 Ready to start TLS",
        "> EHLO office.test",
        "< 250-isp.test",
        "< 250-SIZE 33554432",
        "< 250-8BITMIME",
        "< 250-AUTH PLAIN",
        "< 250-ETRN",
        "< 250 HELP",
        "> AUTH PLAIN <redacted>",
        "< 235 2.7.0 Authentication successful",
        "> ETRN @example.test",
        "< 250 Queuing for node @example.test started",
        "> QUIT",
        "< 221 Bye",
    ]
    lines = [e for e in run.events if e["event"] in ("smtp_send", "smtp_recv")]
    assert {e["relay"] for e in lines} == {"isp"} and {e["host"] for e in lines} == {"127.0.0.1"}
    tls = [e["tls"] for e in lines]
    assert tls[:10] == ["none"] * 10 and set(tls[10:]) == {"TLSv1.3"}
    assert_no_password(run.out + run.err + console.err, spec)
    # Not bound to an address: the kernel chooses, said so in every format (not None/null).
    assert [e["source"] for e in run.events if e["event"] == "etrn_egress"] == ["kernel"]
    assert " source=kernel" in console.err and "None" not in console.err
    # docs/logs.md quotes this very run, as the console shows it.
    quoted = docs.read("docs/logs.md").split("$ etrnd send -v\n", 1)[1].split("```", 1)[0]
    # The dialogue exactly; other events (other issues' to shape) by name and order.
    ours, theirs = normalise(quoted), normalise(console.err)
    assert [x for x in ours if " smtp_" in x] == [x for x in theirs if " smtp_" in x]
    assert [x.split()[1] for x in ours] == [x.split()[1] for x in theirs]


def normalise(console: str) -> list[str]:
    """Console lines without what changes from run to run (time, port, elapsed time)."""
    lines = [line.split(" ", 1)[1] for line in console.splitlines() if line[:4].isdigit()]
    return [re.sub(r"(port|elapsed_ms)=[\d.]+", r"\1=N", line) for line in lines]


def password_forms(spec: AuthServer) -> list[str]:
    """Every form the password (or a line carrying it) takes on the wire, and the plain one."""
    b64 = base64.b64encode
    digest = hmac.new(PASSWORD.encode(), CHALLENGE, hashlib.md5).hexdigest()
    forms = [
        PASSWORD, b64(PASSWORD.encode()),
        b64(f"\0{USER}\0{PASSWORD}".encode()), b64(f"{USER}\0{USER}\0{PASSWORD}".encode()),
        b64(USER.encode()),  # the LOGIN username line
        digest, b64(f"{USER} {digest}".encode()),  # the CRAM-MD5 response
        *spec.auth_lines,  # exactly what the client sent in answer to each 334
    ]
    return [f.decode() if isinstance(f, bytes) else f for f in forms]


def assert_no_password(output: str, spec: AuthServer) -> None:
    for form in password_forms(spec):
        assert form not in output, f"{form!r} reached the output"


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(0)
    yield sock
    sock.close()


def drain(sock: socket.socket, into: list[dict[str, str]]) -> None:
    while True:
        try:
            into.append(receive(sock))
        except BlockingIOError:
            return


@pytest.mark.parametrize("fmt", ["console", "json", "journal"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_no_form_of_the_password_reaches_any_output(
        tmp_path: Path, ca: trustme.CA, ca_env: dict[str, str], journal: socket.socket,
        mechanism: str, fmt: str) -> None:
    spec = AuthServer(USER, PASSWORD, mechanism, server_tls(ca))
    env = {**ca_env, "ETRND_JOURNAL_SOCKET": journal.getsockname()}
    entries: list[dict[str, str]] = []
    # Read as they come: a unix datagram queue is short and a full one blocks the sender.
    asyncio.get_running_loop().add_reader(journal.fileno(), drain, journal, entries)
    try:
        async with serve(spec):
            run = await send(write_config(tmp_path, spec.port, fmt), "--debug", env=env)
    finally:
        asyncio.get_running_loop().remove_reader(journal.fileno())
    drain(journal, entries)
    assert run.rc == 0, run.err
    assert spec.logins == [True]
    output = run.out + run.err + json.dumps(entries)
    assert_no_password(output, spec)
    if fmt == "journal":
        assert run.err == ""
        sent = [e["LINE"] for e in entries if e["EVENT"] == "smtp_send"]
        assert {e["PRIORITY"] for e in entries if e["EVENT"].startswith("smtp_")} == {"7"}
    elif fmt == "json":
        sent = [e["line"] for e in run.events if e["event"] == "smtp_send"]
    else:
        sent = re.findall(r" debug +smtp_send .*? line=(\"(?:[^\"\\]|\\.)*\"|\S+)", run.err)
        sent = [json.loads(s) if s.startswith('"') else s for s in sent]
    # The transcript is really there, with the AUTH exchange in it, redacted.
    auth = sent[sent.index(next(s for s in sent if s.startswith("AUTH"))):]
    assert auth[0] == {"PLAIN": "AUTH PLAIN <redacted>", "LOGIN": "AUTH LOGIN <redacted>",
                       "CRAM-MD5": "AUTH CRAM-MD5"}[mechanism]
    steps = {"PLAIN": 0, "LOGIN": 1, "CRAM-MD5": 1}[mechanism]
    assert auth[1 : 1 + steps] == ["<redacted>"] * steps
    assert auth[1 + steps :] == ["ETRN @example.test", "QUIT"]


# In-process: the module's API, as the ODMR legs use it.

def capture() -> io.StringIO:
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    return out


def events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_server_role_body_is_sized_not_logged() -> None:
    out = capture()
    t = Transcript(logs.get_logger().bind(relay="isp", leg="odmr-server"))
    t.received(b"MAIL FROM:<a@isp.test>\r\nRCPT TO:<b@example.test>\r\nDA", "TLSv1.3")
    t.received(b"TA\r\n", "TLSv1.3")
    t.sent(b"354 End data with <CR><LF>.<CR><LF>\r\n", "TLSv1.3")
    body = b"Subject: secret plans\r\n\r\n" + b"x" * 5000 + b"\r\n..dot-stuffed\r\n"
    for i in range(0, len(body), 7):  # in awkward chunks
        t.received(body[i : i + 7], "TLSv1.3")
    t.received(b".\r\nQUIT\r\n", "TLSv1.3")
    got = events(out)
    assert "secret plans" not in out.getvalue() and "xxxx" not in out.getvalue()
    assert [(e["event"], e["line"]) for e in got] == [
        ("smtp_recv", "MAIL FROM:<a@isp.test>"), ("smtp_recv", "RCPT TO:<b@example.test>"),
        ("smtp_recv", "DATA"), ("smtp_send", "354 End data with <CR><LF>.<CR><LF>"),
        ("smtp_recv", BODY), ("smtp_recv", "."), ("smtp_recv", "QUIT")]
    assert got[4]["size"] == len(body)
    assert {e["leg"] for e in got} == {"odmr-server"}


def test_auth_steps_and_echoes_are_redacted_and_server_lines_sanitised() -> None:
    out = capture()
    t = Transcript(logs.get_logger())
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    t.sent(b"AUTH PLAIN\r\n", "TLSv1.3")
    t.received(b"334 \r\n", "TLSv1.3")
    t.sent(blob + b"\r\n", "TLSv1.3")
    t.received(b"535 5.7.8 bad credentials " + blob + b"\r\n", "TLSv1.3")
    t.sent(b"NOOP\r\n", "TLSv1.3")
    t.received(b"250 ok\x1b[2J\x00 " + b"y" * 1000 + b"\r\n", "TLSv1.3")
    lines = [e["line"] for e in events(out)]
    assert lines[:5] == ["AUTH PLAIN", "334", "<redacted>", "535 5.7.8 bad credentials <redacted>",
                         "NOOP"]
    assert lines[5].startswith("250 ok?[2J? yyy") and len(lines[5]) == MAX_LINE
    assert blob.decode() not in out.getvalue()


async def test_client_tap_sizes_the_message_it_relays() -> None:
    """TranscriptSMTP through sendmail() (DATA), as the relay to the local MTA uses it."""
    from aiosmtpd.handlers import Sink
    from aiosmtpd.smtp import SMTP as Server

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Server(Sink(), hostname="mta.test"),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = capture()
    message = b"Subject: hello\r\n\r\nbody text that must not be logged\r\n"
    smtp = TranscriptSMTP(hostname="127.0.0.1", port=port, local_hostname="office.test",
                          transcript_log=logs.get_logger().bind(leg="local"))
    async with smtp:
        await smtp.sendmail("a@isp.test", ["b@example.test"], message)
    server.close()
    await server.wait_closed()
    assert "must not be logged" not in out.getvalue()
    body = [e for e in events(out) if e["line"] == BODY]
    assert len(body) == 1 and body[0]["event"] == "smtp_send"
    assert body[0]["size"] == len(message)
    # And with the log at info, no tap at all.
    logs.configure("info", "json", stream=io.StringIO())
    quiet = TranscriptSMTP(hostname="127.0.0.1", transcript_log=logs.get_logger())
    assert quiet.transcript is None
    assert isinstance(quiet, aiosmtplib.SMTP)


@pytest.mark.parametrize(("greeting", "etrn_reply", "seen"), [
    ("hello, I am not SMTP", OK, "hello, I am not SMTP"),  # garbage instead of a greeting
    ("220 fake.test ESMTP", PARTIAL, "250-Queuing"),  # half a reply, then a drop
    ("220 fake.test ESMTP", "250 ok\x07\x1b[31m ", "250 ok??[31m"),  # control characters
])
async def test_what_the_server_said_is_logged_even_when_it_breaks_the_session(
        greeting: str, etrn_reply: str, seen: str) -> None:
    out = capture()
    fake = FakeSmtp(greetings=[greeting], etrn_replies=[etrn_reply])
    async with serve_fake(fake):
        await etrn.session(relay(fake.port), "127.0.0.1", ["@a.test"], {})
    received = [e["line"] for e in events(out) if e["event"] == "smtp_recv"]
    assert seen in received
