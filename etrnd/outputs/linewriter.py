"""Log lines written by a thread: a pipe on stderr that is read slowly never blocks the loop."""

from __future__ import annotations

import asyncio
import atexit
import collections
import threading
import time
from collections.abc import Callable
from typing import TextIO

from etrnd.loop.offloop import block_loop_signals

# About 5 MB of JSON lines: far more than any burst; beyond that lines are dropped, counted.
MAX_QUEUED = 20_000
EXIT_FLUSH = 0.3  # s: lines still queued at exit get this long (SIGTERM must exit in 1 s)
# Lines logged on the event loop wake the thread this much later: a link-up logs link_up,
# round_start and etrn_session before its ETRN, and a thread woken at each would take the
# GIL from the loop on that path (~0.5 ms in all); a few ms later they go out together.
WAKE_DELAY = 0.005


class LineWriter:
    """A file-like (write/flush) for structlog's PrintLogger.

    The caller (the event loop) only appends to a bounded in-memory queue; a daemon thread
    does the blocking writes. When the queue is full, lines are dropped and counted, and the
    thread writes `notice(count)` (a `log_events_dropped` line) once it catches up.
    """

    def __init__(self, stream: TextIO, notice: Callable[[int], str],
                 limit: int = MAX_QUEUED) -> None:
        self.stream = stream
        self.notice = notice
        self._limit = limit
        self._queue: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._waking: asyncio.AbstractEventLoop | None = None  # the loop a wake-up is due on
        self._partial = ""  # the start of a line whose end has not been written yet
        self.dropped = 0  # lines not yet reported by a notice
        self.dropped_total = 0
        threading.Thread(target=self._run, name="etrnd-log-writer", daemon=True).start()
        atexit.register(self.close, EXIT_FLUSH)

    def write(self, text: str) -> int:
        with self._cond:
            # Only whole lines are queued (print() writes the line, then "\n"): a drop notice
            # must never land in the middle of one.
            self._partial += text
            end = self._partial.rfind("\n") + 1
            if end == 0:
                return len(text)
            lines, self._partial = self._partial[:end], self._partial[end:]
            if len(self._queue) >= self._limit:
                self.dropped += 1
                self.dropped_total += 1
                return len(text)
            self._queue.append(lines)
            self._wake_soon()
        return len(text)

    def _wake_soon(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._waking is None and loop is not None:
            self._waking = loop
            loop.call_later(WAKE_DELAY, self._wake)
        elif loop is None or self._waking is not loop:
            # No loop here (start-up, a worker thread), or the loop that was to wake the
            # thread is gone or another: at once.
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._waking = None
            self._cond.notify()

    def flush(self) -> None:
        return None  # the thread flushes after each batch

    def _run(self) -> None:
        block_loop_signals()
        while True:
            with self._cond:
                while not self._queue and not self.dropped:
                    self._cond.wait()
                batch = "".join(self._queue)
                self._queue.clear()
                dropped, self.dropped = self.dropped, 0
                self._busy = True
            try:
                if dropped:
                    self.stream.write(self.notice(dropped) + "\n")
                self.stream.write(batch)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing else can be done with a log line
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the queue to be written; True when it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()  # lines whose wake-up the loop did not live to run
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
