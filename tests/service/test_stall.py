"""Stall detector, off-loop calls, journal and log-line writers that never block the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from etrnd.config.schema import parse_yaml
from etrnd.loop import offloop
from etrnd.loop.stall import Stall, StallDetector
from etrnd.outputs.journal import JournalSender
from etrnd.outputs.linewriter import LineWriter
from etrnd.outputs.sdnotify import Notifier
from etrnd.service.daemon import Daemon


def _blocking_callback() -> None:
    time.sleep(0.4)  # what a blocking sendto() does to the loop


def test_a_blocked_step_is_reported_with_where_it_was() -> None:
    stalls: list[Stall] = []
    detector = StallDetector(0.2, stalls.append)
    loop = detector.new_event_loop()

    async def main() -> None:
        await asyncio.sleep(0.3)  # idle waiting is not a stall
        asyncio.get_running_loop().call_soon(_blocking_callback)
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    # Exactly this one on an idle machine; a loaded one may add a descheduled step or two.
    ours = [s for s in stalls if "_blocking_callback" in s.where]
    assert len(ours) == 1 and ours[0].duration >= 0.35, stalls
    assert detector.longest >= 0.35


def test_step_times_with_an_injected_clock() -> None:
    now = [0.0]
    stalls: list[Stall] = []
    detector = StallDetector(0.25, stalls.append, clock=lambda: now[0], sample=False)
    for busy in (0.01, 0.3, 0.2):
        detector.running()
        now[0] += busy
        detector.waiting()
        now[0] += 5  # idle time between steps never counts
    assert [round(s.duration, 2) for s in stalls] == [0.3]
    assert detector.stalls == 1 and round(detector.longest, 2) == 0.3


async def test_a_hung_call_neither_delays_the_next_nor_the_exit() -> None:
    pool = offloop.ThreadPerCall()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    hung = loop.run_in_executor(pool, release.wait)
    started = time.monotonic()
    assert await loop.run_in_executor(pool, lambda: 42) == 42
    assert time.monotonic() - started < 2
    pool.shutdown(wait=True)  # returns at once
    loop.set_default_executor(pool)
    with pytest.raises(TimeoutError):
        await offloop.bounded(0.1, release.wait)
    release.set()
    await hung


def test_journal_reader_that_stops_drops_and_counts(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    sender = JournalSender(path)
    started = time.monotonic()
    for i in range(3000):
        sender.send({"event": "x", "level": "info", "i": str(i)}, f"x i={i}")
    assert time.monotonic() - started < 5
    assert sender.dropped > 0
    lost = sender.dropped
    server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:  # the reader catches up
            server.recv(65536)
    sender.send({"event": "after", "level": "info"}, "after")
    server.settimeout(5)
    notice, after = server.recv(65536).decode(), server.recv(65536).decode()
    assert "EVENT=log_events_dropped\n" in notice and f"COUNT={lost}\n" in notice
    assert "PRIORITY=4\n" in notice
    assert "EVENT=after\n" in after
    assert sender.dropped == 0 and sender.dropped_total == lost
    server.close()


def test_log_lines_to_a_pipe_nobody_reads_never_block() -> None:
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    writer = LineWriter(out, lambda n: f"log_events_dropped count={n}", limit=100)
    started = time.monotonic()
    for i in range(20_000):  # ~1 MB: far beyond the 64 KiB a pipe holds
        print(f"line {i} " + "x" * 40, file=writer, flush=True)
    assert time.monotonic() - started < 5
    assert writer.dropped_total > 0
    data = b""
    with os.fdopen(read_fd, "rb") as pipe:
        os.set_blocking(read_fd, False)
        deadline = time.monotonic() + 10
        while b"log_events_dropped" not in data and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                data += pipe.read() or b""
            time.sleep(0.01)
    assert b"log_events_dropped count=" in data
    lines = data.decode().splitlines()[:-1]  # the last one may be cut by our read
    bad = [line for line in lines if not line.startswith(("line ", "log_events_dropped"))]
    assert not bad, bad[:5]
    assert writer.close(5)
    out.close()


class _HealthyWatcher:
    """Stands in for the netlink reader: the watchdog asks it one question."""

    up = False
    why = ""

    def healthy(self) -> bool:
        return True


async def test_no_watchdog_ping_vouches_for_a_stalled_period(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.setblocking(False)
    config = parse_yaml("relays: [{host: 127.0.0.1, tls: none, helo: gw.example.test, "
                        "etrn: ['@example.test']}]\n")
    now = [0.0]
    detector = StallDetector(0.25, clock=lambda: now[0], sample=False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # ping every 0.1 s
    daemon = Daemon(tmp_path / "etrnd.yaml", config, notifier, detector)
    daemon._watcher = _HealthyWatcher()  # type: ignore[assignment]

    async def next_ping() -> float:
        """When the next WATCHDOG=1 arrived (polled; a late poll only makes it later)."""
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(BlockingIOError):
                    if server.recv(64) == b"WATCHDOG=1":
                        return time.monotonic()
                await asyncio.sleep(0.005)

    task = asyncio.create_task(daemon._watchdog())
    await next_ping()
    await next_ping()
    detector.running()  # a 0.3 s step, as the loop would have measured it
    now[0] += 0.3
    detector.waiting()
    stalled = time.monotonic()
    with contextlib.suppress(BlockingIOError):
        while True:
            server.recv(64)  # pings sent before the stall was known
    # The tick right after the stall stays silent: the next ping is a full interval later.
    assert await next_ping() - stalled >= 0.095
    task.cancel()
    server.close()
