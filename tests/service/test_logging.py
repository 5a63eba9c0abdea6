"""Log formats: the same event and fields as a console line, JSON, or journal fields."""

from __future__ import annotations

import array
import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from etrnd.outputs import logs


def parse_journal(data: bytes) -> dict[str, str]:
    """Decode the native journal protocol the way journald does (both field forms)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            pos = nl + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            pos = nl + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(2)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if fds:
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)
            data = memfd.read()
    return parse_journal(data)


def test_journal_fields_priority_and_no_secret(journal_socket: socket.socket) -> None:
    chosen = logs.configure("debug", "journal", journal_socket=journal_socket.getsockname())
    assert chosen == "journal"
    log = logs.get_logger()
    log.error("etrn_refused", relay="isp", host="mx1.isp.example", arg="@example.org",
              code=459, text="<example.org>: service unavailable", password="hunter2")
    fields = receive(journal_socket)
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "etrnd"
    assert fields["EVENT"] == "etrn_refused"
    assert fields["RELAY"] == "isp"
    assert fields["ETRN_CODE"] == "459"
    assert fields["ETRN_ARG"] == "@example.org"
    assert fields["MESSAGE"].startswith("etrn_refused relay=isp host=mx1.isp.example")
    assert "hunter2" not in json.dumps(fields)

    log.info("link_up", iface="wan0")
    assert receive(journal_socket)["PRIORITY"] == "6"
    log.warning("etrn_retry", relay="isp", text="line one\nline two")
    fields = receive(journal_socket)
    assert fields["PRIORITY"] == "4"
    assert fields["ETRN_TEXT"] == "line one\nline two"  # newline survives (binary form)
    log.debug("netlink_event", detail="x")
    assert receive(journal_socket)["PRIORITY"] == "7"


def test_journal_oversized_event_goes_through_memfd(journal_socket: socket.socket) -> None:
    logs.configure("info", "journal", journal_socket=journal_socket.getsockname())
    big = "x" * 600_000  # larger than a datagram may be
    logs.get_logger().info("etrn_reply", relay="isp", text=big)
    assert receive(journal_socket)["ETRN_TEXT"] == big


def test_level_filter() -> None:
    out = io.StringIO()
    logs.configure("warning", "json", stream=out)
    log = logs.get_logger()
    log.info("hidden")
    log.warning("shown", relay="isp")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["event"] == "shown"


def test_same_fields_in_console_and_json() -> None:
    event = {"relay": "isp", "arg": "@example.org", "code": 250, "text": "Queuing started"}
    outputs = {}
    for fmt in ("console", "json"):
        out = io.StringIO()
        logs.configure("info", fmt, stream=out)
        logs.get_logger().info("etrn_reply", **event, password="hunter2")
        outputs[fmt] = out.getvalue()
        assert outputs[fmt].count("\n") == 1
        assert "hunter2" not in outputs[fmt]
    record = json.loads(outputs["json"])
    assert {k: record[k] for k in event} == event
    assert record["event"] == "etrn_reply"
    assert record["level"] == "info"
    assert ' etrn_reply relay=isp arg=@example.org code=250 text="Queuing started"' in (
        outputs["console"]
    )


def test_auto_picks_journal_only_when_stream_matches(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.pick_format("auto", stream) == "journal"
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert logs.pick_format("auto", stream) == "json"  # inherited from elsewhere
        monkeypatch.delenv("JOURNAL_STREAM")
        assert logs.pick_format("auto", stream) == "json"
        assert logs.pick_format("console", stream) == "console"
