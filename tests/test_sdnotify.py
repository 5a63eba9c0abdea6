"""sd_notify: datagrams to $NOTIFY_SOCKET, abstract or path; silence without it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from etrnd.sdnotify import Notifier


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
