"""The state the daemon's parts share: set in Daemon.__init__, typed here for each part."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from etrnd.config.model import Config
    from etrnd.link import egress
    from etrnd.link.watcher import LinkWatcher
    from etrnd.loop.stall import StallDetector
    from etrnd.outputs import statefile
    from etrnd.outputs.sdnotify import Notifier
    from etrnd.service.control import ControlServer
    from etrnd.service.mtagate import Gate
    from etrnd.service.rounds import RelayStatus


class DaemonCore:
    """Attributes and cross-part methods of the daemon (service/daemon.py puts the parts
    together: rounds in dispatch.py, reload in reloading.py, status in reporting.py)."""

    path: Path
    config: Config
    config_loaded: float
    reload_failed: tuple[float, list[str]] | None
    link_transitions: dict[str, int]
    repeat_next: float | None
    notifier: Notifier
    stalls: StallDetector
    started: float
    rounds_started: int
    last_round: float | None
    state: statefile.StateFile
    _tasks: dict[str, asyncio.Task[None]]
    _closing: set[asyncio.Task[None]]
    _wake: dict[str, asyncio.Event]
    _status: dict[str, RelayStatus]
    _watcher: LinkWatcher | None
    _control: ControlServer | None
    _repeat: asyncio.Task[None] | None
    _served_early: set[str]
    _finishing: set[str]
    _reloading: asyncio.Task[None] | None
    _reload_again: bool
    _publish_timer: asyncio.TimerHandle | None
    _gate: Gate | None
    _router: egress.Router

    if TYPE_CHECKING:  # each defined by one part, called by the others
        def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]: ...
        def _publish(self) -> None: ...
        def summary(self) -> str: ...
        async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]: ...
        def _last_successes(self) -> dict[str, float | None]: ...
        def _metric_links(self) -> list[tuple[str, bool, tuple[str, ...]]]: ...
        def start_rounds(self, only: str | None, reason: str, skip: Collection[str] = (),
                         among: Collection[str] | None = None) -> list[str]: ...
        def cancel_rounds(self, reason: str, only: set[str] | None = None) -> None: ...
        def trigger(self, relay: str | None, reason: str) -> dict[str, str]: ...
        def _restart_repeat(self) -> None: ...
        def _set_gate(self, config: Config) -> None: ...
