"""`etrnd send`'s summary, one line per relay, names the reason of every argument not accepted,
and blames the relay, not its arguments, for what the relay did: AUTH, 502, connect."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.authsmtp import AuthServer, serve
from tests.support.odmrlab import odmr_lab
from tests.support.postfix import isp_and_office

ROOT = Path(__file__).resolve().parents[2]
RETRY = "retry: {first_delay: 50ms, max_delay: 100ms, give_up_after: 1s}\n"


def config(tmp_path: Path, port: int, etrn: str, extra: str = "") -> Path:
    path = tmp_path / "etrnd.yaml"
    path.write_text("relays:\n"
                    f"  - name: isp\n    host: 127.0.0.1\n    port: {port}\n    helo: office.test\n"
                    f"    timeout: 5s\n    etrn: {etrn}\n{extra}{RETRY}"
                    "log: {level: info, format: json}\n")
    return path


async def send(path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`etrnd send` while this test's loop serves SMTP: (exit status, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etrnd", "send", "-c", str(path), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None and b"Traceback" not in err, err.decode()
    return proc.returncode, out.decode()


async def test_wrong_password_is_the_relays_not_the_domains(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    secret = tmp_path / "secret"
    secret.write_text("not-the-password\n")
    async with serve(AuthServer("office", "the-password", "PLAIN", context)) as isp:
        path = config(tmp_path, isp.port, '["@example.org", "@example.net"]',
                      f"    tls: starttls\n    auth: {{username: office, "
                      f"password_file: {secret}}}\n")
        rc, out = await send(path, {"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
    assert (rc, out) == (3, "relay isp: accepted: -; refused: -; failed: -; relay refused for "
                            "@example.org, @example.net: AUTH refused: 535 5.7.8 Authentication "
                            "credentials invalid (check username and password); attempts: 1\n")
    assert isp.logins == [False] and isp.etrn == []  # one try, and no domain was ever asked


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so no one else takes it), not
    listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_connection_refused_is_the_relays(tmp_path: Path, closed_port: int) -> None:
    rc, out = await send(config(tmp_path, closed_port, '["@example.test", "#office-queue"]',
                                "    tls: none\n"))
    assert rc == 4
    line = re.fullmatch(
        r"relay isp: accepted: -; refused: -; failed: -; relay failed for @example\.test, "
        rf"#office-queue: connection refused \(127\.0\.0\.1:{closed_port}\); attempts: (\d+)\n",
        out)
    assert line is not None and int(line[1]) >= 2, out  # retried until give_up_after


@pytest.mark.root
def test_postfix_459_names_the_domain_and_its_reason(tmp_path: Path) -> None:
    with isp_and_office(tmp_path) as env:
        res = env.etrnd("send", "-c", str(env.write_config(
            tmp_path / "etrnd.yaml", etrn=("@example.test", "@not-ours.test"))))
    assert (res.returncode, res.stdout) == (
        3, "relay isp: accepted: @example.test; refused: @not-ours.test (459 "
           "<not-ours.test>: service unavailable); failed: -; attempts: 1\n"), res.stderr


@pytest.mark.root
def test_postfix_without_etrn_500_is_the_relays_and_blames_no_argument(tmp_path: Path) -> None:
    # Postfix rewrites ETRN into a verb it does not know, so it answers as a server without
    # ETRN does (Postfix 3.7: 500, the same class as 502). The second argument is never sent.
    # "$$" is a "$" in main.cf, not a macro.
    hide = {"smtpd_command_filter": "regexp:{ {/^ETRN (.*)/ XETRN $$1} }"}
    with isp_and_office(tmp_path, settings=hide) as env:
        res = env.etrnd("send", "-c", str(env.write_config(
            tmp_path / "etrnd.yaml", etrn=("@example.test", "@other.test"))))
    assert (res.returncode, res.stdout) == (
        3, "relay isp: accepted: -; refused: -; failed: -; relay refused for @example.test, "
           "@other.test: 500 5.5.2 Error: command not recognized; attempts: 1\n"), res.stderr
    sent = [json.loads(line)["line"] for line in res.stderr.splitlines()
            if '"event": "smtp_send"' in line]
    assert [line for line in sent if "ETRN" in line] == ["ETRN @example.test"], sent


@pytest.mark.root
def test_exim_502_for_odmr_on_port_25_is_the_relays(tmp_path: Path) -> None:
    # The mistake check-config warns about: ATRN on the provider's port 25. Real Exim answers
    # 502 (after a good AUTH): the relay's answer, for both domains, not a refusal of either.
    with odmr_lab(tmp_path, wan_up=True) as lab:
        path = lab.config(port=25)
        check = lab.etrnd("check-config", "-c", str(path))
        res = lab.etrnd("send", "-c", str(path))
    assert check.returncode == 0 and (
        "relays[isp].port: 25 with protocol: odmr: providers take ATRN on port 366 (RFC 2645) "
        "and answer it on 25 with 502; leave port out or set 366") in check.stderr, check.stderr
    assert (res.returncode, res.stdout) == (
        3, "relay isp: 0 relayed, 0 refused, 0 deferred; accepted: -; refused: -; failed: -; "
           "relay refused for example.test, example.net: 502 ATRN command used when not "
           "advertised; attempts: 1\n"), res.stderr[-3000:]
