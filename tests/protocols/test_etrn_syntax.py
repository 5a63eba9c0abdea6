"""ETRN argument syntax: check-config's verdict agrees with what a real Postfix answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from etrnd.config.values import check_etrn_argument
from tests.support.nettools import netns
from tests.support.postfix import postfix

ROOT = Path(__file__).resolve().parents[2]
LONG = ".".join(["a" * 63] * 4)  # 255 characters

# (argument, a real server takes it as syntax). Postfix 3.7 answers 250 or 459 (not a flush
# domain) to a well-formed argument and "501 Error: invalid parameter syntax" to the others.
TABLE: list[tuple[str, bool]] = [
    ("example.com", True), ("@example.com", True), ("#office-queue", True), ("x", True),
    ("_dmarc.example.com", True), ("exa_mple.com", True), ("ex--ample.com", True),
    ("xn--bcher-kva.example", True), ("0x.com", True), ("#1queue", True), ("@a", True),
    ("a" * 63 + ".com", True), (LONG, True), ("@" + LONG, True),
    ("example.com.", False), ("@example.com.", False), ("#q.", False),
    ("example..com", False), (".example.com", False), ("@.example.com", False),
    ("-example.com", False), ("example-.com", False), ("a.-b", False), ("@-x.com", False),
    ("a" * 64 + ".com", False), (LONG + "a", False),
    ("123.45", False), ("192.0.2.1", False), ("12345", False), ("@@example.com", False),
]


def accepted(arg: str) -> bool:
    try:
        check_etrn_argument(arg)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("arg", "ok"), TABLE)
def test_check_config_verdict(arg: str, ok: bool) -> None:
    assert accepted(arg) is ok


def test_check_config_refuses_trailing_dot_with_key_path(tmp_path: Path) -> None:
    path = tmp_path / "etrnd.yaml"
    path.write_text("relays:\n  - host: h.example\n    etrn: ['@ok.example', 'example.com.']\n")
    res = subprocess.run([sys.executable, "-m", "etrnd", "check-config", "-c", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert res.returncode == 2
    assert "relays[h.example].etrn.1: 'example.com.': trailing dot" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.root
def test_postfix_answers_as_check_config_says(tmp_path: Path) -> None:
    client = (
        "import json, smtplib, sys\n"
        "s = smtplib.SMTP('127.0.0.2', 25, local_hostname='office.example', timeout=30)\n"
        "s.ehlo()\n"
        "print(json.dumps({a: s.docmd('ETRN', a)[0] for a in json.loads(sys.argv[1])}))\n"
    )
    with netns("esy") as ns:
        ns.ip("addr", "add", "127.0.0.2/8", "dev", "lo")
        with postfix(ns, tmp_path / "isp", address="127.0.0.2", relay_domains=("example.com",),
                     settings={"smtpd_soft_error_limit": "1000",
                               "smtpd_hard_error_limit": "1000",
                               "smtpd_error_sleep_time": "0"}):
            args = [arg for arg, _ in TABLE]
            out = ns.run(sys.executable, "-c", client, json.dumps(args))
    codes: dict[str, int] = json.loads(out.stdout)
    answers = {arg: codes[arg] != 501 for arg in args}
    assert set(codes.values()) <= {250, 459, 501}, codes
    assert answers == {arg: accepted(arg) for arg in args}
    assert answers == dict(TABLE)
