"""Control socket: mode 0660, stale sockets reclaimed, bad clients refused, clients' errors."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from etrnd.service.control import MAX_REQUEST, ControlError, ControlServer, bind_socket, request


async def handler(req: dict[str, Any]) -> dict[str, Any]:
    if req["cmd"] == "trigger":
        return {"ok": True, "relays": [req.get("relay") or "isp"]}
    return {"ok": True, "link": {"up": True, "why": "wan0 up"}, "relays": []}


async def raw(path: Path, data: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    result: dict[str, Any] = json.loads(line)
    return result


async def test_serves_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    reply = await asyncio.to_thread(request, path, {"cmd": "trigger", "relay": "isp"})
    assert reply == {"ok": True, "relays": ["isp"]}
    assert (await raw(path, b"not json\n")) == {"ok": False, "error": "request is not JSON"}
    assert (await raw(path, b'{"cmd": "reboot"}\n'))["ok"] is False
    assert (await raw(path, b"x" * (MAX_REQUEST * 4) + b"\n")) == {
        "ok": False, "error": "request too long"
    }
    # The server is still fine after the abuse.
    assert (await asyncio.to_thread(request, path, {"cmd": "status"}))["ok"] is True
    await server.close()
    assert not path.exists()


async def test_refuses_live_socket_and_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    with pytest.raises(ControlError, match="another etrnd is already listening"):
        bind_socket(path)
    await server.close()
    plain = tmp_path / "file"
    plain.write_text("keep me")
    with pytest.raises(ControlError, match="is not a socket"):
        bind_socket(plain)
    assert plain.read_text() == "keep me"


def test_stale_socket_reclaimed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # left behind by a crash: nobody listens
    sock = bind_socket(path)
    assert stat.S_ISSOCK(path.stat().st_mode)
    sock.close()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["trigger"]])
def test_clients_without_daemon(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "etrnd.yaml"
    config.write_text(f"control: {{socket: {tmp_path / 'none.sock'}}}\n")
    res = subprocess.run([sys.executable, "-m", "etrnd", *command, "-c", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip() == f"etrnd: no etrnd daemon is listening on {tmp_path / 'none.sock'}"


async def test_another_etrnds_probe_is_no_bad_request(tmp_path: Path) -> None:
    """A second etrnd connects to see whether the socket is in use and leaves without a
    request: the running daemon has nothing to answer and nothing to warn about."""
    from structlog.testing import capture_logs

    path = tmp_path / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    with capture_logs() as logged:
        with pytest.raises(ControlError, match="another etrnd is already listening"):
            await asyncio.to_thread(bind_socket, path)
        # A request after the probe: by its answer the probe's connection was served too.
        assert (await asyncio.to_thread(request, path, {"cmd": "status"}))["ok"] is True
        for _ in range(10):
            await asyncio.sleep(0)
    await server.close()
    assert [e for e in logged if e["event"] == "control_bad_request"] == []


async def test_status_into_a_closed_pipe_says_nothing(tmp_path: Path) -> None:
    """`etrnd status | head -2`: the reader leaves early; no BrokenPipeError traceback."""
    path = tmp_path / "control.sock"
    server = ControlServer(path, handler)
    await server.start()
    config = tmp_path / "etrnd.yaml"
    config.write_text("relays: [{host: 127.0.0.1, etrn: ['@example.org']}]\n"
                      f"control: {{socket: {path}}}\n")
    errors = tmp_path / "stderr"
    # `true` exits at once, so the pipe is closed before etrnd writes its answer.
    proc = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m etrnd status --json -c {config} 2>{errors} | true")
    assert await proc.wait() == 0
    await server.close()
    assert "Traceback" not in errors.read_text(), errors.read_text()
