"""`etrnd run` on a real veth WAN: signals, reload, trigger, status, sd_notify, journal."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.test_logging import parse_journal
from tests.support.daemonproc import STOP_WITHIN, Daemon, ScriptServer, running, wait_for
from tests.support.nettools import Netns, linked

pytestmark = pytest.mark.root
PORT = 2525


@dataclass
class Wan:
    office: Netns  # where etrnd runs, with the relay on its loopback
    peer: Netns  # the far end: taking it down drops the carrier of the office's WAN
    wan: str
    peer_if: str

    def carrier(self, up: bool) -> None:
        self.peer.ip("link", "set", self.peer_if, "up" if up else "down")


@pytest.fixture
def wan() -> Iterator[Wan]:
    with linked("ed", "198.51.100.1", "198.51.100.2") as pair:
        w = Wan(pair.office, pair.isp, pair.office_if, pair.isp_if)
        w.office.ip("link", "set", w.wan, "up")
        yield w


def write_config(path: Path, wan: str, etrn: tuple[str, ...] = ("@example.test",),
                 retry: str = "{first_delay: 1s, max_delay: 1s, jitter: 0, give_up_after: 0}",
                 log_format: str = "json", settle: str = "0s") -> Path:
    path.write_text(
        f"watch: {{interfaces: [{wan}], up_when: carrier, settle: {settle}, "
        "min_interval: 0s, down_hold: 0s}\n"
        "relays:\n"
        f"  - {{name: isp, host: 127.0.0.1, port: {PORT}, tls: none, timeout: 5s,\n"
        f"      helo: office.example.test, etrn: {json.dumps(list(etrn))}}}\n"
        f"retry: {retry}\n"
        f"control: {{socket: {path.parent / 'control.sock'}}}\n"
        f"log: {{level: debug, format: {log_format}}}\n")
    return path


@pytest.fixture
def server_451(wan: Wan) -> Iterator[ScriptServer]:
    server = ScriptServer(wan.office, PORT, "451")
    yield server
    server.close()


def test_sigterm_during_backoff_exits_0_within_a_second(wan: Wan, server_451: ScriptServer,
                                                        tmp_path: Path) -> None:
    wan.carrier(True)
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          retry="{first_delay: 30s, max_delay: 30s, give_up_after: 0}")
    with running(config, tmp_path / "log", wan.office) as daemon:
        daemon.wait_event("etrn_retry")
        code, took = daemon.stop()
    assert code == 0, daemon.text()
    assert took < STOP_WITHIN
    assert daemon.events("daemon_stop")
    assert not (tmp_path / "control.sock").exists()  # the socket is removed on exit


def test_sigterm_mid_session_exits_0_within_a_second(wan: Wan, tmp_path: Path) -> None:
    server = ScriptServer(wan.office, PORT, "hang")
    try:
        wan.carrier(True)
        with running(write_config(tmp_path / "etrnd.yaml", wan.wan), tmp_path / "log",
                     wan.office) as daemon:
            wait_for(server.etrns, 10, "the ETRN that the server will never answer")
            code, took = daemon.stop()
    finally:
        server.close()
    assert code == 0, daemon.text()
    assert took < STOP_WITHIN


def test_reload_keeps_old_config_when_invalid_and_applies_valid(wan: Wan, tmp_path: Path) -> None:
    server = ScriptServer(wan.office, PORT, "250")
    try:
        wan.carrier(True)  # already up at start: the daemon's first round comes from that
        config = write_config(tmp_path / "etrnd.yaml", wan.wan, etrn=("@a.example",))
        with running(config, tmp_path / "log", wan.office) as daemon:
            wait_for(lambda: [e for e in server.etrns() if e[0] == "@a.example"], 10,
                     "the start-up round")
            config.write_text(config.read_text().replace("@a.example", "@a example"))
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_event("config_reload_failed")
            assert failed["problems"] == ["relays[isp].etrn.0: must not contain white space or "
                                          "control characters"]
            daemon.signal(signal.SIGUSR1)  # a round now: still with the old argument
            wait_for(lambda: len(server.etrns()) == 2, 10, "the SIGUSR1 round")
            assert [e[0] for e in server.etrns()] == ["@a.example", "@a.example"]

            write_config(config, wan.wan, etrn=("@b.example",))
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("config_reloaded")
            res = daemon.cli("trigger")
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == "isp: round started"
            wait_for(lambda: len(server.etrns()) == 3, 10, "the triggered round")
            assert server.etrns()[2][0] == "@b.example"
            assert daemon.proc.poll() is None
    finally:
        server.close()


@pytest.mark.parametrize("how", ["trigger", "SIGUSR1"])
def test_trigger_during_settle_takes_the_link_up_round(wan: Wan, tmp_path: Path,
                                                       how: str) -> None:
    server = ScriptServer(wan.office, PORT, "250")
    try:
        # Up at start: a link-up round is owed once the settle ends. 10 s, not less: the
        # status and trigger commands below are Python processes that a loaded CI box takes
        # seconds to start, and the trigger must come inside the window (it did not at 4 s).
        wan.carrier(True)
        config = write_config(tmp_path / "etrnd.yaml", wan.wan, settle="10s")
        with running(config, tmp_path / "log", wan.office) as daemon:
            daemon.wait_event("daemon_ready")
            settled = time.monotonic() + 10
            status = daemon.status()
            assert status["round_due"]["reason"] == "settle", status
            assert 0 < status["round_due"]["in_s"] <= 10
            assert "s (settle)" in daemon.cli("status").stdout
            if how == "trigger":
                assert daemon.cli("trigger").returncode == 0
            else:
                daemon.signal(signal.SIGUSR1)
            wait_for(server.etrns, 10, "the triggered round's ETRN")
            assert daemon.status()["round_due"] is None
            # The settle window ends; an absence needs time: 1.5 s after it with no round.
            time.sleep(max(0.0, settled + 1.5 - time.monotonic()))
            assert len(server.etrns()) == 1, server.etrns()
            starts = daemon.events("round_start")
            assert [e["reason"] for e in starts] == [how]
            assert daemon.events("round_requested")[0]["took_link_up"] is True
    finally:
        server.close()


def test_status_json_and_trigger_cut_backoff_short(wan: Wan, server_451: ScriptServer,
                                                   tmp_path: Path) -> None:
    wan.carrier(True)
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          retry="{first_delay: 1h, max_delay: 1h, give_up_after: 0}")
    with running(config, tmp_path / "log", wan.office) as daemon:
        daemon.wait_event("etrn_retry")
        status = daemon.status()
        assert status["link"]["up"] is True
        assert 0 < status["tasks"] < 20  # watcher, control, rounds: a handful, not a leak
        assert wan.wan in status["link"]["why"]
        (relay,) = status["relays"]
        assert relay["name"] == "isp"
        assert relay["state"] == "waiting"
        assert relay["attempts"] == 1
        assert relay["next_try"] is not None
        (arg,) = relay["args"]
        assert (arg["arg"], arg["code"], arg["text"], arg["outcome"]) == (
            "@example.test", 451, "Try again later", "failed")
        assert arg["when"].endswith("Z")
        human = daemon.cli("status")
        assert "link: UP" in human.stdout
        assert "@example.test: failed 451 Try again later" in human.stdout

        # The next try is an hour away; a trigger makes it now, without a second round.
        assert daemon.cli("trigger").returncode == 0
        wait_for(lambda: len(server_451.etrns()) == 2, 5, "the retry the trigger asked for")
        assert daemon.status()["relays"][0]["attempts"] == 2
        assert len(daemon.events("round_start")) == 1
        bad = daemon.cli("trigger", "--relay", "nope")
        assert bad.returncode == 1
        assert "no relay named 'nope'" in bad.stderr


def test_link_down_stops_attempts_until_next_up(wan: Wan, server_451: ScriptServer,
                                                tmp_path: Path) -> None:
    wan.carrier(True)
    config = write_config(tmp_path / "etrnd.yaml", wan.wan,
                          retry="{first_delay: 200ms, max_delay: 200ms, jitter: 0, "
                                "give_up_after: 0}")
    with running(config, tmp_path / "log", wan.office) as daemon:
        wait_for(lambda: len(server_451.etrns()) >= 3, 10, "a few retries while up")
        wan.carrier(False)
        daemon.wait_event("round_cancelled", where=lambda e: e.get("reason") == "link_down")
        # The event names the interface that went down, and why.
        [down] = daemon.events("link_down")
        assert (down["iface"], down["why"]) == (wan.wan, f"{wan.wan}: no carrier")
        cancelled = time.monotonic()  # the server stamps each ETRN with the same clock
        # An absence can only be observed over time: 8 backoff periods with no attempt.
        # (Counting lines would race with the thread that reads the server's output.)
        time.sleep(1.6)
        late = [e for e in server_451.etrns() if e[2] > cancelled]
        assert not late, late
        seen = len(server_451.etrns())
        wan.carrier(True)
        wait_for(lambda: len(server_451.etrns()) > seen, 5, "attempts after the next up")
        assert len(daemon.events("round_start")) == 2


def test_link_down_at_start_names_the_watched_interface(wan: Wan, tmp_path: Path) -> None:
    wan.carrier(False)
    config = write_config(tmp_path / "etrnd.yaml", wan.wan)
    with running(config, tmp_path / "log", wan.office) as daemon:
        down = daemon.wait_event("link_down")
    assert (down["iface"], down["why"], down["initial"]) == (wan.wan, f"{wan.wan}: no carrier",
                                                             True)


def test_sd_notify_ready_status_watchdog_reload_stopping(wan: Wan, tmp_path: Path) -> None:
    server = ScriptServer(wan.office, PORT, "250")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    received: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                data = notify.recv(4096)
            except TimeoutError:
                continue
            received.append((time.monotonic(), data.decode()))

    def messages(key: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in received if key in m.split("\n")
                or any(line.startswith(key) for line in m.split("\n"))]

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "300000"}
    try:
        wan.carrier(True)
        config = write_config(tmp_path / "etrnd.yaml", wan.wan)
        daemon = Daemon(config, tmp_path / "log", wan.office, env)
        try:
            ready = wait_for(lambda: messages("READY=1"), 10, "READY=1")[0][1].split("\n")
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=link up")
            wait_for(lambda: len(messages("WATCHDOG=1")) >= 6, 5, "six watchdog pings")
            stamps = [t for t, _ in messages("WATCHDOG=1")]
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert max(gaps) < 0.3  # WatchdogSec is 0.3 s: pings come at about half of that
            assert min(gaps) > 0.05  # ...and not in a busy loop
            wait_for(lambda: any("1/1 accepted" in m for _, m in messages("STATUS=")), 10,
                     "STATUS= after the round")
            wan.carrier(False)
            wait_for(lambda: any(m.startswith("STATUS=link down") for _, m in received), 5,
                     "STATUS=link down")
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: messages("RELOADING=1"), 5, "RELOADING=1")
            wait_for(lambda: len(messages("READY=1")) >= 2, 5, "READY=1 after the reload")
            code, _ = daemon.stop()
            assert code == 0
            wait_for(lambda: messages("STOPPING=1"), 2, "STOPPING=1")
        finally:
            daemon.stop()
    finally:
        done.set()
        listener.join(2)
        server.close()
        notify.close()


def test_journal_fields_from_the_running_daemon(wan: Wan, tmp_path: Path) -> None:
    server = ScriptServer(wan.office, PORT, "451", "250")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    journal.settimeout(5)
    log = tmp_path / "stderr"
    log.touch()
    st = log.stat()
    # What systemd does: stderr is the journal stream, so `format: auto` picks the journal.
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
           "ETRND_JOURNAL_SOCKET": str(tmp_path / "journal")}
    try:
        wan.carrier(True)
        config = write_config(tmp_path / "etrnd.yaml", wan.wan, log_format="auto",
                              retry="{first_delay: 100ms, max_delay: 100ms, give_up_after: 0}")
        daemon = Daemon(config, log, wan.office, env)
        fields: list[dict[str, str]] = []
        try:
            while not any(f.get("ETRN_CODE") == "250" for f in fields):
                fields.append(parse_journal(journal.recv(1 << 16)))
        finally:
            daemon.stop()
    finally:
        server.close()
        journal.close()
    by_event = {f["EVENT"]: f for f in fields}
    retry = by_event["etrn_retry"]
    assert (retry["PRIORITY"], retry["RELAY"], retry["SYSLOG_IDENTIFIER"]) == ("4", "isp", "etrnd")
    reply = next(f for f in fields if f.get("ETRN_CODE") == "250")
    assert reply["EVENT"] == "etrn_reply"
    assert reply["PRIORITY"] == "6"
    assert reply["ETRN_ARG"] == "@example.test"
    assert reply["MESSAGE"].startswith("etrn_reply relay=isp ")
    # level: debug puts the dialogue in the journal too, at PRIORITY 7 (journalctl -p debug).
    lines = {(f["EVENT"], f["PRIORITY"], f["RELAY"], f["LINE"], f["TLS"]) for f in fields
             if f["EVENT"] in ("smtp_send", "smtp_recv")}
    assert ("smtp_send", "7", "isp", "ETRN @example.test", "none") in lines
    assert ("smtp_recv", "7", "isp", "250 Queuing started", "none") in lines
    assert log.read_text() == ""  # nothing went to stderr instead
