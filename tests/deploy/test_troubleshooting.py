"""The README's troubleshooting table shows what a real failure logs: each failure, provoked."""

from __future__ import annotations

import asyncio
import shlex
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trustme

from tests.support import docs
from tests.support.fakesmtp import FakeSmtp, serve

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "right-password"
CONFIG = """\
watch: {{interfaces: [lo], up_when: carrier}}
relays:
  - name: isp
    host: 127.0.0.1
    port: {port}
    tls: {tls}
    verify: {verify}
    timeout: 2s
    helo: office.test
{auth}    etrn: ["@example.org"]
retry: {{first_delay: 0.2s, give_up_after: 0.5s}}
log: {{format: console}}
"""


async def etrnd(tmp: Path, *args: str, port: int = 25, tls: str = "opportunistic",
                verify: bool = True, password: str | None = None) -> str:
    """`etrnd ARGS -c CONFIG` for a relay on 127.0.0.1:`port`; its stdout and stderr."""
    auth = ""
    if password is not None:
        secret = tmp / "isp.secret"
        secret.write_text(password + "\n")
        auth = f"    auth: {{username: office, password_file: {secret}}}\n"
    config = tmp / "etrnd.yaml"
    config.write_text(CONFIG.format(port=port, tls=tls, verify=str(verify).lower(), auth=auth))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etrnd", *args, "-c", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


def tls_server() -> ssl.SSLContext:
    """A server context whose certificate no trust store on this machine knows."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(ctx)
    return ctx


async def replying(tmp: Path, reply: str) -> str:
    async with serve(FakeSmtp(etrn_replies=[reply] * 5)) as fake:
        return await etrnd(tmp, "send", port=fake.port)


async def wrong_password(tmp: Path) -> str:
    async with serve(FakeSmtp(tls=tls_server(), auth=("office", PASSWORD))) as fake:
        # Not verified, so that the password is what fails here, not the certificate.
        return await etrnd(tmp, "send", port=fake.port, tls="starttls", verify=False,
                           password="wrong")


async def no_tls_for_auth(tmp: Path) -> str:
    async with serve(FakeSmtp(auth=("office", PASSWORD))) as fake:
        return await etrnd(tmp, "send", port=fake.port, password=PASSWORD)


async def untrusted_certificate(tmp: Path) -> str:
    async with serve(FakeSmtp(tls=tls_server())) as fake:
        return await etrnd(tmp, "send", port=fake.port, tls="starttls")


async def refused_connection(tmp: Path) -> str:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        return await etrnd(tmp, "send", port=sock.getsockname()[1])


async def invalid_config(tmp: Path) -> str:
    return await etrnd(tmp, "run", port=0)  # port 0: out of range


# The rows proven live, by their symptom; the first `event key=value` of the middle column
# must be a line of the real output (the other rows are checked by name in test_readme.py).
SCENARIOS: dict[str, Callable[[Path], Awaitable[str]]] = {
    "rounds, but no mail arrives": lambda tmp: replying(tmp, "250 Queuing started"),
    "the domain is refused": lambda tmp: replying(
        tmp, "459 4.7.1 <example.org>: service unavailable"),
    "retried for hours": lambda tmp: replying(tmp, "458 Administrative prohibition"),
    "the server does not do ETRN": lambda tmp: replying(
        tmp, "502 5.5.2 Error: command not recognized"),
    "wrong password": wrong_password,
    "AUTH not even tried": no_tls_for_auth,
    "TLS fails": untrusted_certificate,
    "cannot connect": refused_connection,
    "the service does not start": invalid_config,
}


def rows() -> dict[str, str]:
    _, *body = docs.table(docs.section("README.md", "Troubleshooting"))
    return {symptom: shows for symptom, shows, _ in body}


def first_quote(shows: str) -> str:
    """The first code span of the middle column that quotes the log."""
    for span in shows.split("`")[1::2]:
        if not span.startswith(("link:", "status")):
            return span
    raise AssertionError(f"nothing quoted from the log in {shows!r}")


def shown(quote: str, output: str) -> bool:
    """Whether a line of `output` is `quote`: the event (or text) and every key=value given;
    `...` stands for anything."""
    if quote.endswith("..."):
        return any(line.startswith(quote[:-3]) for line in output.splitlines())
    event, *pairs = shlex.split(quote)
    wanted = dict(p.split("=", 1) for p in pairs if "..." not in p)
    for line in output.splitlines():
        words = shlex.split(line)
        if len(words) > 2 and words[2] == event:
            fields = dict(w.split("=", 1) for w in words[3:] if "=" in w)
            if all(fields.get(k) == v for k, v in wanted.items()):
                return True
    return False


def test_every_proven_symptom_is_in_the_table() -> None:
    assert set(SCENARIOS) <= set(rows()), "a symptom was renamed: rename it here too"


@pytest.mark.parametrize("symptom", list(SCENARIOS))
async def test_the_table_shows_what_etrnd_logs(symptom: str, tmp_path: Path) -> None:
    quote = first_quote(rows()[symptom])
    output = await SCENARIOS[symptom](tmp_path)
    assert shown(quote, output), f"README says `{quote}` for {symptom!r}; etrnd said:\n{output}"
