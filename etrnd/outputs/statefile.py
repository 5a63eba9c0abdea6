"""The state file: each relay's history across restarts, in StateDirectory=, small and atomic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from etrnd.loop import offloop
from etrnd.outputs.logs import get_logger
from etrnd.service.history import RelayHistory

NAME = "state.json"
FORMAT = 1
# A few relays with a few arguments each take a few KiB; anything far larger is not ours.
MAX_BYTES = 256 * 1024
# A failing relay retries every few seconds: one write per this many seconds at most.
MIN_INTERVAL = 5.0
WRITE_TIMEOUT = 5.0  # a hung disk fails the save, never the loop


def default_path() -> Path | None:
    """$STATE_DIRECTORY/state.json: systemd's StateDirectory= sets it (the first directory when
    there are several), the image sets it to /var/lib/etrnd. None: no state is kept."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(directory) / NAME if directory else None


def load(path: Path | None, relays: set[str]) -> tuple[dict[str, RelayHistory], str | None]:
    """The histories of the configured `relays`, and a warning when the file could not be used
    (missing is fine on a first start; unreadable, too big or not ours is a warning)."""
    if path is None:
        return {}, None
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot read {path}: {exc.strerror or exc}"
    if len(raw) > MAX_BYTES:
        return {}, f"{path} is larger than {MAX_BYTES} bytes; ignored"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return {}, f"{path} is not valid JSON ({exc}); ignored"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("relays"), dict):
        return {}, f"{path} is not an etrnd state file of format {FORMAT}; ignored"
    found: dict[str, RelayHistory] = {}
    for name, entry in data["relays"].items():
        if name in relays and isinstance(entry, dict):
            history = RelayHistory()
            history.load(entry)
            found[name] = history
    return found, None


def dump(histories: Mapping[str, RelayHistory], wanted: Mapping[str, tuple[str, ...]],
         now: float) -> bytes:
    """The file's bytes: only configured relays and arguments, so it cannot grow unbounded."""
    relays = {}
    for name, args in wanted.items():
        history = histories.get(name)
        if history is None:
            continue
        entry = history.as_dict()
        entry["args"] = {a: h for a, h in entry["args"].items() if a in args}
        relays[name] = entry
    return json.dumps({"format": FORMAT, "saved": now, "relays": relays},
                      sort_keys=True).encode() + b"\n"


def write(path: Path, data: bytes) -> None:
    """Atomic replace: a temporary file in the same directory, fsync, rename. Blocking."""
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateFile:
    """Saves the histories off the loop, coalesced to one write per MIN_INTERVAL; a failure is
    logged once (state_file_failed) and the daemon carries on without persistence."""

    def __init__(self, path: Path | None,
                 snapshot: Callable[[], tuple[Mapping[str, RelayHistory],
                                              Mapping[str, tuple[str, ...]]]]) -> None:
        self.path = path
        self._snapshot = snapshot
        self.error: str | None = None
        self.saved: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._last = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"path": None if self.path is None else str(self.path), "error": self.error,
                "saved": self.saved}

    def changed(self) -> None:
        """Something worth keeping changed: save soon (at most one write in flight)."""
        if self.path is None:
            return
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._writer())

    async def _writer(self) -> None:
        while self._dirty:
            wait = self._last + MIN_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty = False
            self._last = time.monotonic()
            await self.save(WRITE_TIMEOUT)

    async def save(self, limit: float) -> None:
        """Write now (bounded by `limit` seconds); errors are recorded, never raised."""
        if self.path is None:
            return
        histories, wanted = self._snapshot()
        now = time.time()
        data = dump(histories, wanted, now)
        try:
            await offloop.bounded(limit, write, self.path, data)
        except (OSError, TimeoutError) as exc:
            reason = (f"took over {limit:g}s" if isinstance(exc, TimeoutError)
                      else exc.strerror or str(exc))
            if self.error is None:
                get_logger().warning("state_file_failed", path=str(self.path), reason=reason)
            self.error = f"cannot write {self.path}: {reason}"
            return
        self.error, self.saved = None, now

    async def close(self, limit: float) -> None:
        """At stop: the last changes, within `limit` seconds."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._dirty or self._task is not None:
            self._dirty = False
            await self.save(limit)
