"""systemd notify protocol: non-blocking datagrams to $NOTIFY_SOCKET; silent without systemd."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

from etrnd.outputs.logs import get_logger

Message = tuple[str, ...]
# A supervisor that stopped reading must not grow us without bound; state changes are rare
# (start, reload, stop) so this is never reached in practice.
MAX_PENDING = 32
# A full queue is retried on a timer (a datagram socket cannot say when a peer has room):
# soon at first, then at most twice a second while the reader stays away.
RETRY_FIRST = 0.01
RETRY_MAX = 0.5


def kind(message: Message) -> str:
    """'status' and 'watchdog' may be coalesced; 'state' (READY, RELOADING, STOPPING) may not."""
    if all(a.startswith("STATUS=") for a in message):
        return "status"
    if message == ("WATCHDOG=1",):
        return "watchdog"
    return "state"


def enqueue(pending: list[Message], message: Message) -> tuple[list[Message], int]:
    """The queue after adding `message` to messages still waiting for room, and how many
    messages were given up. A newer STATUS replaces older ones (the latest says it all), one
    WATCHDOG is enough, state changes keep their order; past MAX_PENDING the oldest coalescible
    message goes first, then the oldest state change."""
    what = kind(message)
    out = [m for m in pending if what == "state" or kind(m) != what]
    dropped = len(pending) - len(out)
    out.append(message)
    while len(out) > MAX_PENDING:
        victims = [i for i, m in enumerate(out) if kind(m) != "state"] or [0]
        del out[victims[0]]
        dropped += 1
    return out, dropped


class Notifier:
    """READY/STATUS/WATCHDOG/RELOADING/STOPPING; every call is a no-op without systemd.

    Never blocks: a supervisor that is slow to read (the namespace's net.unix.max_dgram_qlen
    is 10 by default) gets the messages when it has room, coalesced as `enqueue` says.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # '@' marks an abstract socket; a relative path is not something systemd hands out.
        if address.startswith("@"):
            self._address: str | None = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            self._address = None
        self._sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""
        self._pending: list[Message] = []
        self._retry: asyncio.TimerHandle | None = None
        self._delay = RETRY_FIRST
        self._stuck = False
        self._empty = asyncio.Event()
        self.coalesced = 0  # messages replaced or given up while the supervisor did not read
        self.lost = 0  # messages the socket refused outright (supervisor gone)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def notify(self, *assignments: str) -> None:
        if self._address is None:
            return
        backlog = bool(self._pending)
        self._pending, dropped = enqueue(self._pending, assignments)
        self.coalesced += dropped
        if not backlog or self._retry is None:  # else the retry timer flushes, in order
            self._flush()

    def _flush(self) -> None:
        self._retry = None
        if self._address is None:
            return
        if self._sock is None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        while self._pending:
            try:
                self._sock.sendto("\n".join(self._pending[0]).encode(), self._address)
            except BlockingIOError:
                self._schedule_retry()
                return
            except OSError:
                # systemd gone or restarting: the service must keep doing its job.
                self.lost += 1
            del self._pending[0]
        self._empty.set()
        if self._stuck:
            self._stuck = False
            get_logger().info("notify_socket_drained", coalesced=self.coalesced)
        self._delay = RETRY_FIRST

    def _schedule_retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (yet): the next notify() tries again
        if not self._stuck:
            self._stuck = True
            get_logger().warning("notify_socket_full", pending=len(self._pending),
                                 policy="STATUS coalesced; READY/RELOADING/STOPPING kept in order")
        self._empty.clear()
        self._retry = loop.call_later(self._delay, self._flush)
        self._delay = min(self._delay * 2, RETRY_MAX)

    async def drain(self, within: float) -> bool:
        """Wait up to `within` s for queued messages to go out; True when none is left."""
        if not self._pending:
            return True
        if self._retry is not None:  # try now and often, not at the backed-off retry time
            self._retry.cancel()
            self._delay = RETRY_FIRST
            self._flush()
        try:
            async with asyncio.timeout(within):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.notify(f"STATUS={status}")

    def reloading(self, monotonic_usec: int) -> None:
        # Type=notify-reload (systemd 253+) wants MONOTONIC_USEC with RELOADING=1.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec, as systemd recommends; None when off or meant for another PID."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 2_000_000
