"""ODMR relays in the config: protocol, port, deliver_to, mandatory AUTH, domains for ATRN."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from etrnd.config.model import ConfigError
from etrnd.config.schema import parse_yaml
from etrnd.config.values import DeliverTo, parse_deliver_to


@pytest.fixture
def pw(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.write_text("odmrpass\n")
    return path


def odmr(pw: Path, extra: str = "", etrn: str = "[example.test]", auth: bool = True) -> str:
    auth_line = f"    auth: {{username: u, password_file: {pw}}}\n" if auth else ""
    return ("relays:\n  - host: provider.example\n    protocol: odmr\n"
            f"    etrn: {etrn}\n{auth_line}{extra}")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    return info.value.problems


def test_defaults(pw: Path) -> None:
    relay = parse_yaml(odmr(pw)).relays[0]
    assert (relay.protocol, relay.effective_port, str(relay.effective_deliver_to)) == (
        "odmr", 366, "127.0.0.1:25")
    assert parse_yaml("relays: [{host: h.example, etrn: [a.test]}]").relays[0].protocol == "etrn"


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:2525", DeliverTo(lmtp=False, host="127.0.0.1", port=2525)),
    ("mail.office.example", DeliverTo(lmtp=False, host="mail.office.example", port=25)),
    ("[::1]:25", DeliverTo(lmtp=False, host="::1", port=25)),
    ("lmtp:127.0.0.1:24", DeliverTo(lmtp=True, host="127.0.0.1", port=24)),
    ("lmtp:localhost", DeliverTo(lmtp=True, host="localhost", port=24)),
    ("lmtp:/run/dovecot/lmtp", DeliverTo(lmtp=True, path="/run/dovecot/lmtp")),
])
def test_deliver_to_forms(text: str, want: DeliverTo) -> None:
    assert parse_deliver_to(text) == want
    assert str(parse_deliver_to(str(want))) == str(want)


@pytest.mark.parametrize("bad", ["::1:25", "[nope]:25", "h.example:0", "h.example:99999",
                                 "/run/sock", "h example:25", "h.example:25\r\nRSET", ""])
def test_bad_deliver_to(pw: Path, bad: str) -> None:
    found = problems(odmr(pw, f"    deliver_to: {json.dumps(bad)}\n"))
    assert len(found) == 1 and found[0].startswith("relays[provider.example].deliver_to: "), found


def test_every_problem_with_its_key_path(pw: Path) -> None:
    found = problems(odmr(pw, etrn='["@example.test", "#queue", "ok.test"]', auth=False)
                     + "  - host: etrn.example\n    etrn: [a.test]\n    deliver_to: h:25\n")
    assert found == [
        "relays[provider.example].etrn: '@example.test': ATRN takes domain names; "
        "write 'example.test'; "
        "'#queue': ODMR (ATRN) takes domain names, no queue names; write the domain(s) "
        "the provider holds mail for",
        "relays[etrn.example]: deliver_to only applies with protocol: odmr",
    ]
    assert problems(odmr(pw, etrn='["example.test."]'))[0].startswith(
        "relays[provider.example].etrn.0: ")
    assert problems(odmr(pw, auth=False)) == [
        "relays[provider.example]: protocol: odmr needs auth (RFC 2645: ATRN only after AUTH)"]


def test_cram_md5_allows_tls_none_without_plaintext_consent(pw: Path) -> None:
    # Only CRAM-MD5 will be used then (the session refuses PLAIN/LOGIN in clear).
    relay = parse_yaml(odmr(pw, "    tls: none\n")).relays[0]
    assert relay.tls == "none" and relay.auth is not None and not relay.auth.allow_plaintext
    with pytest.raises(ConfigError):  # ETRN keeps its rule
        parse_yaml(f"relays: [{{host: h.example, etrn: [a.test], tls: none, "
                   f"auth: {{username: u, password_file: {pw}}}}}]")


def test_check_config_and_send_cli(tmp_path: Path, pw: Path) -> None:
    path = tmp_path / "etrnd.yaml"
    path.write_text(odmr(pw, "    name: isp\n    deliver_to: lmtp:/run/lmtp\n"))
    res = subprocess.run([sys.executable, "-m", "etrnd", "check-config", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert ("relay isp: provider.example port 366, tls opportunistic, auth as u; "
            "odmr: atrn example.test, deliver to lmtp:/run/lmtp") in res.stdout
    res = subprocess.run([sys.executable, "-m", "etrnd", "send", "-c", str(path), "@a.test"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "ATRN takes domain names" in res.stderr, res.stderr


@pytest.mark.parametrize(("text", "octets"), [
    ("10000000", 10_000_000), ("25M", 25_000_000), ("50MiB", 50 * 1024 * 1024),
    ("100k", 100_000), ("1G", 10**9), ("64 KiB", 64 * 1024)])
def test_max_message_size(pw: Path, text: str, octets: int) -> None:
    relay = parse_yaml(odmr(pw, f"    max_message_size: {text}\n")).relays[0]
    assert relay.max_message_size == octets
    assert parse_yaml(odmr(pw)).relays[0].max_message_size is None  # the office MTA's SIZE


@pytest.mark.parametrize("bad", ["0", "-5", "10 MBytes", "1.5M", "true", "ten"])
def test_bad_max_message_size(pw: Path, bad: str) -> None:
    found = problems(odmr(pw, f"    max_message_size: {bad}\n"))
    key = "relays[provider.example].max_message_size: "
    assert len(found) == 1 and found[0].startswith(key), found
    found = problems("relays:\n  - host: etrn.example\n    etrn: [a.test]\n"
                     "    max_message_size: 10M\n")
    assert found == ["relays[etrn.example]: max_message_size only applies with protocol: odmr"]
