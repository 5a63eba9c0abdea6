"""Control socket: one JSON request line in, one JSON reply line out; `trigger`/`status` clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from etrnd.config.model import Control, resolve_path
from etrnd.outputs.logs import get_logger

MAX_REQUEST = 4096  # a request is a few dozen bytes; anything longer is abuse
REQUEST_TIMEOUT = 2.0
MAX_CLIENTS = 16
COMMANDS = ("status", "trigger")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
log = get_logger()


class ControlError(Exception):
    """The socket cannot be set up or reached; the message is one line for the user."""


def _claim_path(path: Path) -> None:
    """Remove a stale socket left by a crash, but never a live daemon's or a non-socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ControlError(f"another etrnd is already listening on {path}")


def bind_socket(path: Path) -> socket.socket:
    """Bind with mode 0660 from the first instant (umask), so no window exposes it."""
    try:
        _claim_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        raise ControlError(
            f"cannot create control socket {path}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    return sock


class ControlServer:
    """Serves requests sequentially per client; a bad client only ever hurts itself."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients = 0

    async def start(self) -> None:
        sock = bind_socket(self.path)
        self._inode = self.path.stat().st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        # Only remove the socket if it is still ours (a successor may have replaced it).
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            reply = await self._answer(reader)
            if reply is None:
                return  # connected and left (another etrnd checking the socket is in use)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            self._clients -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return _refuse("request too long")
        except TimeoutError:
            return _refuse("request timed out")
        if not line:
            return None  # no request at all: nothing to answer, nothing wrong
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return _refuse("request is not JSON")
        if not isinstance(request, dict) or request.get("cmd") not in COMMANDS:
            return _refuse(f"unknown command; expected one of {', '.join(COMMANDS)}")
        try:
            return await self._handler(request)
        except Exception as exc:  # a handler bug must not take the daemon down
            log.error("control_error", error=type(exc).__name__, detail=str(exc)[:200])
            return _refuse("internal error")


def _refuse(reason: str) -> dict[str, Any]:
    log.warning("control_bad_request", reason=reason)
    return {"ok": False, "error": reason}


# --- clients ---------------------------------------------------------------------------


def socket_path_for(config_path: str | None) -> Path:
    """Only control.socket is needed, so a client works without reading relay secrets."""
    # Imported here: the daemon, which imports this module, never needs them.
    import yaml
    from pydantic import ValidationError

    from etrnd.config import schema

    try:
        data = yaml.safe_load(resolve_path(config_path).read_text(encoding="utf-8"))
        section = data.get("control", {}) if isinstance(data, dict) else {}
        return schema.Control.model_validate(section or {}).socket
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError, AttributeError):
        return Control().socket


def request(path: Path, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no etrnd daemon is listening on {path}") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path} (is this user in its group?)") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon on {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon on {path} sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon on {path} sent an unreadable reply")
    return reply


def _call(config_path: str | None, payload: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return request(socket_path_for(config_path), payload)
    except ControlError as exc:
        print(f"etrnd: {exc}", file=sys.stderr)
        return None


def trigger_command(config_path: str | None, relay: str | None) -> int:
    reply = _call(config_path, {"cmd": "trigger", "relay": relay})
    if reply is None:
        return 1
    if not reply.get("ok"):
        print(f"etrnd: the daemon refused: {reply.get('error', 'no reason given')}",
              file=sys.stderr)
        return 1
    results = reply.get("results")
    if isinstance(results, list):
        for item in results:
            if isinstance(item, dict):
                print(f"{item.get('relay')}: {item.get('what')}")
        if not results:
            print("no relay is configured")
    else:  # an older daemon: names only
        print(f"round requested for {', '.join(reply.get('relays', [])) or 'no relay'}")
    return 0


def check_command(config_path: str | None) -> int:
    """`etrnd check`: one Nagios line from the daemon's `health`; 3 UNKNOWN without a daemon."""
    from etrnd.outputs.health import NAMES, UNKNOWN, nagios_line

    try:
        reply = request(socket_path_for(config_path), {"cmd": "status"})
    except ControlError as exc:
        print(f"ETRND UNKNOWN - {exc}")
        return UNKNOWN
    health = reply.get("health")
    if not reply.get("ok") or not isinstance(health, dict) or health.get("code") not in NAMES:
        print("ETRND UNKNOWN - the daemon's reply has no health (an older etrnd?)")
        return UNKNOWN
    print(nagios_line(health))
    sys.stdout.flush()
    code: int = health["code"]
    return code


def status_command(config_path: str | None, as_json: bool) -> int:
    reply = _call(config_path, {"cmd": "status"})
    if reply is None:
        return 1
    if as_json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        from etrnd.outputs.status import render

        print(render(reply))
    return 0
