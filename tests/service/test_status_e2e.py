"""`etrnd status` and `etrnd check` while real relays fail: each cause named, kept over restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonproc import ROOT, Daemon, running, wait_for
from tests.support.nettools import Netns, linked
from tests.support.postfix import ISP_ADDR, isp_and_office

pytestmark = pytest.mark.root
PORT = 2525
BLACK_HOLE = "203.0.113.7"  # routed to the peer, which drops it without a word
DOCS = ROOT / "docs" / "status.md"


@dataclass
class Wan:
    office: Netns  # etrnd runs here; scripted relays listen on its loopback
    peer: Netns
    wan: str
    peer_if: str


@pytest.fixture
def wan() -> Iterator[Wan]:
    with linked("es", "198.51.100.1", "198.51.100.2") as pair:
        w = Wan(pair.office, pair.isp, pair.office_if, pair.isp_if)
        w.peer.ip("link", "set", w.peer_if, "up")
        w.office.ip("link", "set", w.wan, "up")
        yield w


def write_config(path: Path, wan: str, relay: str, *, retry: str = "first_delay: 1s, "
                 "max_delay: 1s, jitter: 0, give_up_after: 0", extra: str = "") -> Path:
    """One relay `isp` (its YAML mapping's keys after `name`), watching `wan` for carrier."""
    path.write_text(
        f"watch: {{interfaces: [{wan}], up_when: carrier, settle: 0s, min_interval: 0s}}\n"
        f"relays:\n  - {{name: isp, helo: office.example.test, etrn: ['@example.org'], "
        f"{relay}}}\n"
        f"retry: {{{retry}}}\n"
        f"control: {{socket: {path.parent / 'control.sock'}}}\n"
        f"log: {{level: debug, format: json}}\n{extra}")
    return path


def status_text(daemon: Daemon, state: str | None = None, also: str = "") -> str:
    """`etrnd status`'s output, once the relay is in `state` (e.g. waiting: in backoff) and
    the output holds `also`."""
    def text() -> str | None:
        res = daemon.cli("status")
        assert res.returncode == 0, res.stderr
        return res.stdout if (state is None or f"relay isp: {state}," in res.stdout) and (
            also in res.stdout) else None
    found: str = wait_for(text, 20, f"the relay {state}")
    return found


def failing(daemon: Daemon, tries: int = 1) -> dict[str, Any]:
    """The relay's entry once it has failed `tries` times."""
    def check() -> dict[str, Any] | None:
        (relay,) = daemon.status()["relays"]
        return relay if relay["failures"] >= tries else None
    result: dict[str, Any] = wait_for(check, 30, f"{tries} failed tries in the status")
    return result


# --- docs/status.md: its examples are the contract for each line ---------------------------


def doc_examples() -> dict[str, list[str]]:
    """Each ```text block after a `<!-- example: NAME -->` marker in docs/status.md."""
    text = DOCS.read_text()
    found = {}
    for match in re.finditer(r"<!-- example: (\S+) -->\s*```text\n(.*?)```", text, re.S):
        found[match.group(1)] = match.group(2).rstrip("\n").splitlines()
    return found


def shape(line: str, iface: str = "ppp0") -> str:
    """A line with what differs between runs (times, durations, addresses, numbers) masked."""
    line = line.replace(iface, "<IF>")
    line = re.sub(r"\b1 (failed )?try\b", r"2 \1tries", line)
    line = re.sub(r"\b1 transition\b", "2 transitions", line)
    line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "<TIME>", line)
    line = re.sub(r"\b\d\d:\d\d:\d\d\b", "<TIME>", line)
    line = re.sub(r"\b\d+ (d|h|min|s)( \d+ (h|min|s))?\b", "<DUR>", line)
    line = re.sub(r"\d+\.\d+\.\d+\.\d+", "<IP>", line)
    line = re.sub(r"/\S+/etrnd\.yaml", "<CONFIG>", line)
    line = re.sub(r"\b\d+(\.\d+)*\b", "<N>", line)
    return line


def assert_like_docs(name: str, text: str, iface: str) -> None:
    example = doc_examples()[name]
    lines = text.rstrip("\n").splitlines()
    assert [shape(x, iface) for x in lines] == [shape(x) for x in example], (
        f"`etrnd status` differs from docs/status.md's example {name!r}:\n{text}")


# --- each failure class -----------------------------------------------------------------------


def scripted(ns: Netns, *replies: str, auth: str | None = None,
             port: int = PORT) -> subprocess.Popen[str]:
    env = {**os.environ, **({"ETRN_SERVER_AUTH": auth} if auth else {})}
    proc = ns.popen(sys.executable, "-m", "tests.support.etrn_server", "127.0.0.1", str(port),
                    *replies, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc  # type: ignore[return-value]


def test_refused_port(wan: Wan, tmp_path: Path) -> None:
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s",
                          extra="health: {warning_after: 1s, critical_after: 2s}\n")
    with running(config, tmp_path / "log", wan.office) as daemon:
        relay = failing(daemon, 2)
        assert relay["last_failure"]["kind"] == "refused"
        assert relay["last_failure"]["text"] == f"connection refused (127.0.0.1:{PORT})"
        assert relay["last_success"] is None and relay["condition"] == "failing"
        text = status_text(daemon, "waiting", also="health: CRITICAL")
        print(text)  # for the report (pytest -s)
    assert text.startswith(f"FAILING: isp: connection refused (127.0.0.1:{PORT}) since ")
    assert_like_docs("refused", text, wan.wan)


def test_black_holed_address(wan: Wan, tmp_path: Path) -> None:
    # The peer forwards to a blackhole route: the SYN vanishes, no ICMP comes back.
    wan.peer.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    wan.peer.ip("route", "add", "blackhole", "203.0.113.0/24")
    wan.office.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.1")
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: {BLACK_HOLE}, tls: none, timeout: 1s")
    with running(config, tmp_path / "log", wan.office) as daemon:
        relay = failing(daemon)
        text = status_text(daemon, "waiting")
    assert relay["last_failure"]["kind"] == "timeout", relay
    assert relay["last_failure"]["text"].startswith(f"time-out: no answer from {BLACK_HOLE}:25")
    assert_like_docs("timeout", text, wan.wan)


def test_wrong_ca(wan: Wan, tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(tmp_path / "key"), "-out", str(tmp_path / "cert"),
                    "-subj", "/CN=relay.example.test"], check=True, capture_output=True)
    server = wan.office.popen("openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{PORT}",
                              "-cert", str(tmp_path / "cert"), "-key", str(tmp_path / "key"),
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for(lambda: wan.office.run("ss", "-Hltn", f"sport = {PORT}").stdout.strip(), 10,
             "openssl s_server to listen")
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: implicit, timeout: 2s")
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            relay = failing(daemon)
            text = status_text(daemon, "waiting")
    finally:
        server.kill()
    assert relay["last_failure"]["kind"] == "tls", relay
    assert relay["last_failure"]["text"] == (
        f"TLS certificate not accepted: self-signed certificate (127.0.0.1:{PORT})")
    assert_like_docs("tls", text, wan.wan)


def test_wrong_password(wan: Wan, tmp_path: Path) -> None:
    secret = tmp_path / "isp.secret"
    secret.write_text("not-the-password\n")
    server = scripted(wan.office, "250", auth="office:right")
    config = write_config(
        tmp_path / "etrnd.yaml", wan.wan,
        f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s, "
        f"auth: {{username: office, password_file: {secret}, allow_plaintext: true}}")
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            relay = failing(daemon)
            wait_for(lambda: daemon.status()["relays"][0]["state"] == "refused", 10,
                     "the round to end refused")
            text = status_text(daemon, "refused")
    finally:
        server.terminate()
    assert relay["last_failure"]["kind"] == "auth"
    assert relay["last_failure"]["text"] == (
        "AUTH refused: 535 5.7.8 Error: authentication failed: authentication failure "
        "(check username and password)")
    assert_like_docs("auth", text, wan.wan)


def test_459_from_postfix_is_refused_not_idle(tmp_path: Path) -> None:
    with isp_and_office(tmp_path, "example.org", office_link_up=True) as env:
        config = write_config(tmp_path / "etrnd.yaml", env.office_if,
                              f"host: {ISP_ADDR}, tls: none, timeout: 5s")
        config.write_text(config.read_text().replace("['@example.org']",
                                                     "['@example.org', '@example.net']"))
        with running(config, tmp_path / "log", env.office) as daemon:
            wait_for(lambda: daemon.status()["relays"][0]["state"] == "refused", 20,
                     "the round to end refused")
            (relay,) = daemon.status()["relays"]
            text = status_text(daemon, "refused")
    assert relay["last_success"]["text"] == "250 Queuing started"
    assert relay["last_failure"]["text"] == "459 <example.net>: service unavailable"
    assert text.startswith("FAILING: isp: 459 <example.net>: service unavailable since ")
    assert_like_docs("459", text, env.office_if)


def test_458_three_times_is_probably_a_refusal(wan: Wan, tmp_path: Path) -> None:
    server = scripted(wan.office, "458:Administrative prohibition")
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s")
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            flagged = daemon.wait_event("etrn_probable_refusal", timeout=20)
            relay = failing(daemon, 3)
            text = status_text(daemon, "waiting")
            assert len(daemon.events("etrn_probable_refusal")) == 1  # once per streak
    finally:
        server.terminate()
    assert flagged["reply"] == "458 Administrative prohibition" and flagged["times"] == 3
    assert "auth" in flagged["check"].lower() and "domains" in flagged["check"]
    assert "probably a refusal" in relay["probable_refusal"]
    assert_like_docs("458", text, wan.wan)


def test_busy_458_is_not_a_refusal(wan: Wan, tmp_path: Path) -> None:
    server = scripted(wan.office, "458")  # "458 Already processing": Exim is busy
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s")
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            relay = failing(daemon, 4)
            assert daemon.events("etrn_probable_refusal") == []
    finally:
        server.terminate()
    assert relay["probable_refusal"] is None


# --- history across a restart, the health check -------------------------------------------


def test_last_success_survives_failures_and_a_restart(wan: Wan, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = {**os.environ, "STATE_DIRECTORY": str(state)}
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s")
    server = scripted(wan.office, "250")
    with running(config, tmp_path / "log1", wan.office, env) as daemon:
        wait_for(lambda: daemon.status()["relays"][0]["last_success"], 10, "an accepted round")
        accepted = daemon.status()["relays"][0]["last_success"]
        server.terminate()
        server.wait(5)
        assert daemon.cli("trigger").stdout == "isp: round started\n"
        relay = failing(daemon, 2)
        # A later failure does not overwrite the success.
        assert relay["last_success"] == accepted
        wait_for(lambda: (state / "state.json").exists(), 10, "the state file")
    saved = json.loads((state / "state.json").read_text())
    assert saved["relays"]["isp"]["last_success"]["text"] == "250 Queuing started"

    with running(config, tmp_path / "log2", wan.office, env) as daemon:
        relay = failing(daemon, 3)  # the failures go on counting after the restart
        assert relay["last_success"] == accepted
        text = status_text(daemon)
        assert f"last success: {accepted['when'][11:19]}" in text or "last success: 20" in text
    assert daemon.proc.returncode == 0


def test_a_corrupt_state_file_is_a_warning(wan: Wan, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text('{"format": 1, "relays": {"isp": ')
    env = {**os.environ, "STATE_DIRECTORY": str(state)}
    server = scripted(wan.office, "250")
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s")
    try:
        with running(config, tmp_path / "log", wan.office, env) as daemon:
            warned = daemon.wait_event("state_file_unusable")
            assert "not valid JSON" in warned["reason"]
            wait_for(lambda: daemon.status()["relays"][0]["last_success"], 10, "a round")
            wait_for(lambda: json.loads((state / "state.json").read_text() or "0") != 0
                     if (state / "state.json").stat().st_size > 40 else False, 15,
                     "the state file rewritten")
    finally:
        server.terminate()


def check(daemon: Daemon) -> tuple[int, str]:
    res = daemon.cli("check")
    return res.returncode, res.stdout


def test_check_exit_codes(wan: Wan, tmp_path: Path) -> None:
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s",
                          extra="health: {warning_after: 1s, critical_after: 6s}\n")
    res = subprocess.run([sys.executable, "-m", "etrnd", "check", "-c", str(config)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 3 and res.stdout.startswith("ETRND UNKNOWN - no etrnd daemon")
    with running(config, tmp_path / "log", wan.office) as daemon:
        _, line = wait_for(lambda: (c := check(daemon))[0] == 1 and c, 10, "WARNING")
        assert line.startswith("ETRND WARNING - isp: no accepted round for "), line
        assert f"connection refused (127.0.0.1:{PORT})" in line
        assert re.search(r"\| isp_unaccepted=[\d.]+s;1;6;0 link_up=1;;;0;1$", line), line
        _, line = wait_for(lambda: (c := check(daemon))[0] == 2 and c, 20, "CRITICAL")
        print(line)  # for the report (pytest -s)
        server = scripted(wan.office, "250")
        try:
            assert daemon.cli("trigger").returncode == 0
            _, line = wait_for(lambda: (c := check(daemon))[0] == 0 and c, 10, "OK again")
            assert line.startswith("ETRND OK - link up, 1 relay fine |"), line
            wan.office.ip("link", "set", wan.wan, "down")
            wait_for(lambda: not daemon.status()["link"]["up"], 10, "link down")
            assert check(daemon)[0] == 0  # a link that is down is not etrnd's failure
            assert daemon.status()["link"]["transitions"] == 1
            assert "link: DOWN for " in status_text(daemon)
        finally:
            server.terminate()


# --- trigger and reload say what happened -----------------------------------------------------

BACKUP = f"  - {{name: backup, host: 127.0.0.1, port: {PORT + 1}, tls: none, timeout: 2s, " \
    "helo: office.example.test, etrn: ['@example.org']}\n"


def test_trigger_says_per_relay_what_happened(wan: Wan, tmp_path: Path) -> None:
    server = scripted(wan.office, "250")
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s",
                          retry="first_delay: 1h, max_delay: 1h, give_up_after: 0",
                          extra="repeat: 2h\n")
    config.write_text(config.read_text().replace("retry:", BACKUP + "retry:"))
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            wait_for(lambda: [r["state"] for r in daemon.status()["relays"]] == [
                "idle", "waiting"], 10, "isp accepted, backup in backoff")
            res = daemon.cli("trigger", "--relay", "backup")
            assert (res.returncode, res.stdout) == (
                0, "backup: retrying now (was in backoff)\n"), res
            wait_for(lambda: daemon.status()["relays"][1]["attempts"] == 2, 10, "the retry")
            res = daemon.cli("trigger")
            assert res.stdout == ("isp: round started\n"
                                  "backup: retrying now (was in backoff)\n"), res
            assert re.search(r"; repeat every 2 h, next in 1 h 5\d min \(\d\d:\d\d:\d\d\)\n",
                             status_text(daemon))
    finally:
        server.terminate()


def test_reload_adds_a_relay_with_its_round_and_a_failed_reload_shows(wan: Wan,
                                                                      tmp_path: Path) -> None:
    first, second = scripted(wan.office, "250"), scripted(wan.office, "250", port=PORT + 1)
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          f"host: 127.0.0.1, port: {PORT}, tls: none, timeout: 2s")
    good = config.read_text()
    try:
        with running(config, tmp_path / "log", wan.office) as daemon:
            wait_for(lambda: daemon.status()["relays"][0]["last_success"], 10, "isp's round")
            config.write_text(good.replace("retry:", BACKUP + "retry:"))
            daemon.signal(signal.SIGHUP)
            reloaded = daemon.wait_event("config_reloaded")
            assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
                ["backup"], [], [])
            # The link is up: the new relay gets its round now, not at the next link-up.
            wait_for(lambda: (second.stdout is not None
                              and second.stdout.readline().startswith("ETRN @example.org")),
                     10, "the added relay's ETRN")
            config.write_text(good.replace("tls: none", "tls: sometimes"))
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config_reload_failed")
            status = daemon.status()
            text = status_text(daemon)
            code, line = check(daemon)
    finally:
        first.terminate()
        second.terminate()
    assert status["verdict"]["state"] == "DEGRADED"
    assert re.match(r"DEGRADED: config reload failed at \d\d:\d\d:\d\d: relays\[isp\]\.tls: .*; "
                    r"running the config of \d\d:\d\d:\d\d\n", text), text
    assert status["reload"]["problems"][0].startswith("relays[isp].tls: ")
    assert code == 1 and line.startswith("ETRND WARNING - config reload failed at "), line
