"""A hostile or broken relay never kills, hangs or bloats etrnd, and the reply table still holds."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.adversary import (
    BEHAVIOURS,
    Adversary,
    Behaviour,
    auth_bad_base64,
    endless_multiline,
    garbage_greeting,
    greet_421,
    megaline,
    ok,
    reset_after_ehlo,
    silent,
    slow_greeting,
    slowloris,
    starttls_broken,
)
from tests.support.adversary import serve as serve_adversary
from tests.support.fakesmtp import FakeSmtp
from tests.support.fakesmtp import serve as serve_fake

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Adversary-must-not-see-in-logs"
# Peak RSS of `etrnd send` may exceed a well-behaved run's by this much, whatever the server
# does. Unbounded buffering of a 1 MB line or an endless reply would blow far past it.
RSS_SLACK_KB = 12 * 1024
# The round itself (first to last log line) may exceed its budget by this much on a loaded
# machine; what these checks catch (a session waiting out a 5 s greeting, a 20 s step
# timeout, a hang) is far beyond it.
ROUND_SLACK = 1.5


@dataclass
class Run:
    rc: int
    err: str
    elapsed: float
    maxrss_kb: int
    events: list[dict[str, Any]] = field(default_factory=list)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def _run_child(cmd: list[str], deadline: float) -> Run:
    """Run and reap with wait4(), which gives this child's own peak RSS (ru_maxrss, KiB)."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        killer = threading.Timer(deadline, proc.kill)  # a hang fails the test, not the run
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - started
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert proc.returncode != -signal.SIGKILL, f"etrnd send hung past {deadline}s:\n{text}"
    return Run(proc.returncode, text, elapsed, usage.ru_maxrss, events)


def config(tmp_path: Path, port: int, *, timeout: float = 1.0, give_up: float = 3.0,
           tls: str = "none", extra: str = "", name: str = "etrnd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "relays:\n"
        f"  - name: adv\n    host: 127.0.0.1\n    port: {port}\n    tls: {tls}\n"
        f"    helo: office.test\n    timeout: {timeout}\n    etrn: ['@example.test']\n{extra}"
        f"retry: {{first_delay: 50ms, max_delay: 100ms, jitter: 0, give_up_after: {give_up}}}\n"
        "log: {level: debug, format: json}\n")
    return path


async def send(path: Path, deadline: float = 30) -> Run:
    """`etrnd send` in a thread, so this loop keeps playing the adversary meanwhile."""
    cmd = [sys.executable, "-m", "etrnd", "send", "-c", str(path)]
    run = await asyncio.to_thread(_run_child, cmd, deadline)
    assert "Traceback" not in run.err, run.err
    return run


@pytest.fixture(scope="module")
def baseline_rss() -> int:
    """Peak RSS of `etrnd send` against a well-behaved server, the yardstick for the rest."""

    async def measure() -> int:
        adv = Adversary(then=ok)
        async with serve_adversary(adv):
            with tempfile.TemporaryDirectory() as tmp:
                run = await send(config(Path(tmp), adv.port))
        assert run.rc == 0, run.err
        return run.maxrss_kb

    return asyncio.run(measure())


def assert_sane(run: Run, baseline_rss: int, max_elapsed: float) -> None:
    assert run.maxrss_kb < baseline_rss + RSS_SLACK_KB, (
        f"peak RSS {run.maxrss_kb} KiB vs {baseline_rss} KiB for a well-behaved server")
    # Timed from the product's own log, not the process: interpreter start-up under load is
    # not what these tests are about.
    stamps = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
              for e in run.events if "timestamp" in e]
    worked = max(stamps) - min(stamps)
    assert worked < max_elapsed + ROUND_SLACK, f"the round took {worked:.2f}s"


# --- transient failures: logged with their class, retried, and the retry succeeds ------------

TRANSIENT: list[tuple[str, Behaviour, str]] = [
    ("greeting-never-sent", silent, "SMTPConnectTimeoutError"),
    ("slow-greeting-past-timeout", slow_greeting(5.0), "SMTPConnectTimeoutError"),
    ("421-at-greeting", greet_421, "SMTPConnectResponseError"),
    ("garbage-non-utf8-greeting", garbage_greeting, "SMTPResponseException"),
    ("1mb-reply-line", megaline, "SMTPResponseException"),
    ("endless-multiline-reply", endless_multiline, "SMTPResponseException"),
    ("reset-after-ehlo", reset_after_ehlo, "SMTPServerDisconnected"),
    ("slowloris-reply", slowloris(0.05), "SMTPReadTimeoutError"),
]


@pytest.mark.parametrize(("behaviour", "error"), [(b, e) for _, b, e in TRANSIENT],
                         ids=[i for i, _, _ in TRANSIENT])
async def test_transient_misbehaviour_is_retried(tmp_path: Path, baseline_rss: int,
                                                 behaviour: Behaviour, error: str) -> None:
    adv = Adversary(script=[behaviour], then=ok)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, timeout=1.0))
    assert run.rc == 0, run.err
    failed = run.named("etrn_session_failed")
    assert [e["error"] for e in failed] == [error]
    assert all(e["text"].isprintable() and len(e["text"]) <= 300 for e in failed)
    assert len(run.named("etrn_retry")) == 1
    assert run.named("round_done")[0]["accepted"] == ["@example.test"]
    # One step's timeout (1 s) at most for the bad session, then a quick good one.
    assert_sane(run, baseline_rss, max_elapsed=1.0 + 0.5)


@pytest.mark.parametrize("reply", ["458 Already processing example.test", "451 4.3.0 later",
                                   "421 4.3.2 shutting down"])
async def test_4xx_etrn_replies_are_retried(tmp_path: Path, reply: str) -> None:
    from tests.support.adversary import replying

    adv = Adversary(script=[replying(reply)], then=ok)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port))
    assert run.rc == 0, run.err
    warned = run.named("etrn_reply")[0]
    assert (warned["code"], warned["level"], warned["outcome"]) == (
        int(reply[:3]), "warning", "transient")
    assert len(adv.lines("ETRN")) == 2 and len(run.named("etrn_retry")) == 1


@pytest.mark.parametrize(("reply", "outcome"),
                         [("459 <example.test>: service unavailable", "refused_round"),
                          ("502 5.5.2 ETRN not implemented", "refused_relay")])
async def test_permanent_etrn_replies_exit_3_without_retry(tmp_path: Path, reply: str,
                                                           outcome: str) -> None:
    from tests.support.adversary import replying

    # ETRN is advertised in EHLO, and still refused: the reply counts, not the advertisement.
    adv = Adversary(then=replying(reply))
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port))
    assert run.rc == 3, run.err
    refused = run.named("etrn_refused")
    assert [(e["code"], e["outcome"], e["level"]) for e in refused] == [
        (int(reply[:3]), outcome, "error")]
    assert len(adv.lines("ETRN")) == 1 and run.named("etrn_retry") == []


async def test_always_silent_server_gives_up_on_time(tmp_path: Path, baseline_rss: int) -> None:
    adv = Adversary(then=silent)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, timeout=0.5, give_up=1.2))
    assert run.rc == 4, run.err
    gave_up = run.named("etrn_gave_up")
    assert len(gave_up) == 1
    # The give-up deadline plus at most one step's timeout: never a hang.
    assert gave_up[0]["elapsed_s"] < 1.2 + 0.5 + 0.3
    assert_sane(run, baseline_rss, max_elapsed=1.2 + 0.5 + 0.3)


@pytest.mark.parametrize("behaviour", [endless_multiline, megaline],
                         ids=["endless-multiline", "1mb-line"])
async def test_flooding_server_fails_fast_not_by_timeout(tmp_path: Path, baseline_rss: int,
                                                         behaviour: Behaviour) -> None:
    # A long step timeout: the session must end because the reply is too long, not because
    # the clock ran out, and memory must stay flat while the server keeps pushing.
    adv = Adversary(then=behaviour)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, timeout=20.0, give_up=0.3))
    assert run.rc == 4, run.err
    failed = run.named("etrn_session_failed")
    assert failed and {e["error"] for e in failed} == {"SMTPResponseException"}
    assert all("too long" in e["text"] for e in failed)
    assert_sane(run, baseline_rss, max_elapsed=2.0)


async def test_reply_dripped_byte_by_byte_is_understood(tmp_path: Path) -> None:
    adv = Adversary(then=BEHAVIOURS["drip"])
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, timeout=2.0))
    assert run.rc == 0, run.err
    assert run.named("etrn_session_failed") == []
    reply = run.named("etrn_reply")[0]
    assert (reply["code"], reply["text"]) == (250, "2.0.0 Queuing for node example.test started")


async def test_slow_greeting_within_timeout_is_fine(tmp_path: Path) -> None:
    adv = Adversary(then=slow_greeting(0.4))
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, timeout=2.0))
    assert run.rc == 0, run.err
    assert run.named("etrn_session_failed") == [] and adv.connections == 1


async def test_non_utf8_and_escape_sequences_are_sanitised(tmp_path: Path) -> None:
    adv = Adversary(then=BEHAVIOURS["nasty"])
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port))
    assert run.rc == 0, run.err
    text = run.named("etrn_reply")[0]["text"]
    assert text.isprintable() and "\ufffd" in text and "queued" in text
    assert not any(c in text for c in "\x1b\x07\x9b\u202e")
    # Nothing raw reached the log stream either (json.dumps escapes, but check the bytes).
    assert "\x1b" not in run.err and "\x07" not in run.err


@pytest.mark.parametrize("tls", ["opportunistic", "starttls"])
async def test_starttls_handshake_failure_never_falls_back_to_clear(tmp_path: Path,
                                                                    tls: str) -> None:
    adv = Adversary(then=starttls_broken)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, tls=tls, give_up=0.3))
    assert run.rc == 4, run.err
    assert adv.lines("ETRN") == [] and adv.connections >= 1
    failed = run.named("etrn_session_failed")
    assert failed and all("SSL" in e["error"] or "TLS" in e["error"] or
                          e["error"] == "SMTPServerDisconnected" for e in failed), failed


async def test_auth_with_invalid_base64_challenges(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    auth = (f"    auth: {{username: office, password_file: {secret}, "
            "allow_plaintext: true}\n")
    adv = Adversary(then=auth_bad_base64)
    async with serve_adversary(adv):
        run = await send(config(tmp_path, adv.port, extra=auth, give_up=0.3))
    assert run.rc == 4, run.err
    assert adv.lines("ETRN") == [] and len(adv.lines("AUTH")) >= 1
    assert {e["error"] for e in run.named("etrn_session_failed")} == {"AuthenticationFailed"}
    assert PASSWORD not in run.err


# --- the daemon: one bad relay never starves a good one ---------------------------------------

def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _etrnd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etrnd", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_daemon_keeps_serving_the_good_relay(tmp_path: Path) -> None:
    nasty = itertools.cycle([silent, endless_multiline, megaline, garbage_greeting,
                             reset_after_ehlo, slowloris(0.05), greet_421])
    bad = Adversary(chooser=lambda _: next(nasty))
    good = FakeSmtp()
    sock = tmp_path / "control.sock"
    async with serve_adversary(bad), serve_fake(good):
        path = tmp_path / "etrnd.yaml"
        path.write_text(
            "watch: {interfaces: [lo], up_when: carrier, settle: 0s, min_interval: 0s}\n"
            "relays:\n"
            f"  - {{name: bad, host: 127.0.0.1, port: {bad.port}, tls: none, helo: o.test,"
            "      timeout: 1s, etrn: ['@example.test']}\n"
            f"  - {{name: good, host: 127.0.0.1, port: {good.port}, tls: none, helo: o.test,"
            "      timeout: 1s, etrn: ['@example.test']}\n"
            "retry: {first_delay: 50ms, max_delay: 100ms, give_up_after: 0}\n"
            f"control: {{socket: {sock}}}\nlog: {{level: info, format: json}}\n")
        log = (tmp_path / "daemon.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "etrnd", "run", "-c", str(path), cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        try:
            # lo is up at start: the daemon runs a round on both relays.
            await _until(lambda: len(good.lines("ETRN")) == 1, 10, "the good relay's ETRN")
            await _until(lambda: bad.connections >= 7, 15, "a cycle of bad sessions")
            rss_before = _rss_kb(proc.pid)
            for n in range(2, 5):
                started = time.monotonic()
                rc, out, err = await _etrnd("trigger", "-c", str(path))
                assert rc == 0, err
                await _until(lambda n=n: len(good.lines("ETRN")) == n, 5,  # type: ignore[misc]
                             f"ETRN number {n} at the good relay")
                # Served at once, whatever the bad relay is doing at that moment.
                assert time.monotonic() - started < 3.0
            connections = bad.connections
            await _until(lambda: bad.connections >= connections + 14, 20,
                         "two more cycles of bad sessions")
            rc, out, err = await _etrnd("status", "--json", "-c", str(path))
            assert rc == 0, err
            relays = {r["name"]: r for r in json.loads(out)["relays"]}
            assert relays["bad"]["state"] in ("running", "waiting")
            assert relays["good"]["args"][0]["outcome"] == "accepted"
            # Dozens of hostile sessions later the daemon is no bigger than it was.
            assert _rss_kb(proc.pid) < rss_before + 8 * 1024
            assert proc.returncode is None
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rc_stop = await asyncio.wait_for(proc.wait(), 5)
            log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert rc_stop == 0, text[-3000:]
    assert "Traceback" not in text and '"round_crashed"' not in text
    assert '"daemon_fatal"' not in text
