"""sd_notify: datagrams to $NOTIFY_SOCKET, abstract or path; silence without it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from etrnd.outputs.sdnotify import MAX_PENDING, Notifier, enqueue, kind


def test_path_socket_messages(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled
    assert notifier.watchdog_interval == 2.0
    notifier.ready("watching wan0")
    assert server.recv(4096).decode().split("\n") == [
        "READY=1", "STATUS=watching wan0", f"MAINPID={os.getpid()}"
    ]
    notifier.status("watching wan0")  # unchanged: nothing sent
    notifier.status("link up")
    assert server.recv(4096) == b"STATUS=link up"
    notifier.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert server.recv(4096) == b"STOPPING=1"
    notifier.close()
    server.close()


def test_abstract_socket() -> None:
    name = f"etrnd-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
    assert server.recv(4096) == b"STOPPING=1"
    server.close()


def test_absent_or_foreign_watchdog_is_off(tmp_path: Path) -> None:
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.ready("x")  # must not raise
    assert quiet.watchdog_interval is None
    other_pid = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other_pid.watchdog_interval is None
    # A socket that has gone away must never raise into the daemon.
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x")


def test_policy_coalesces_status_and_keeps_state_changes_in_order() -> None:
    pending: list[tuple[str, ...]] = []
    dropped = 0
    for message in [("STATUS=a",), ("READY=1", "STATUS=b"), ("STATUS=c",), ("WATCHDOG=1",),
                    ("RELOADING=1",), ("STATUS=d",), ("WATCHDOG=1",), ("STOPPING=1",)]:
        pending, n = enqueue(pending, message)
        dropped += n
    assert pending == [("READY=1", "STATUS=b"), ("RELOADING=1",), ("STATUS=d",),
                       ("WATCHDOG=1",), ("STOPPING=1",)]
    assert dropped == 3  # STATUS=a, STATUS=c, one WATCHDOG
    for i in range(MAX_PENDING + 5):
        pending, _ = enqueue(pending, ("RELOADING=1", f"MONOTONIC_USEC={i}"))
    assert len(pending) == MAX_PENDING and kind(pending[-1]) == "state"
    assert all(kind(m) == "state" for m in pending)  # coalescible ones went first


async def test_a_reader_that_stops_never_blocks_and_gets_the_state_changes_in_order(
        tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    sent = 0
    while notifier.pending == 0:  # fill the peer's queue (max_dgram_qlen) with STATUS lines
        sent += 1
        notifier.status(f"status {sent}")
        assert sent < 100_000
    notifier.ready("ready now")
    notifier.status("latest")
    notifier.stopping()
    assert time.monotonic() - started < 5  # nothing waited on the reader
    assert notifier.pending == 3  # READY, the latest STATUS, STOPPING; older STATUS coalesced
    assert not await notifier.drain(0.1)

    received: list[bytes] = []

    def read() -> None:
        server.settimeout(5)
        while not received or received[-1] != b"STOPPING=1":
            received.append(server.recv(4096))

    reader = asyncio.get_running_loop().run_in_executor(None, read)
    assert await notifier.drain(10)
    await reader
    tail = [r.decode().split("\n")[0] for r in received[-3:]]
    assert tail == ["READY=1", "STATUS=latest", "STOPPING=1"]
    notifier.close()
    server.close()


def test_abstract_socket_that_is_not_read_never_blocks() -> None:
    name = f"etrnd-test-full-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    for i in range(3000):  # more than any max_dgram_qlen default
        notifier.status(f"s{i}")
    notifier.stopping()
    assert notifier.pending >= 1
    notifier.close()
    server.close()
