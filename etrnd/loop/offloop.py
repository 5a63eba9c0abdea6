"""Blocking calls off the event loop: a daemon thread each, bounded in time, never queued."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Signals the loop thread handles: a worker must not take them (and an EINTR in the middle of
# getaddrinfo or a trust-store read helps nobody).
_LOOP_SIGNALS = {signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGCHLD}
# Hung calls keep their thread; past this many at once new calls fail at once instead.
MAX_THREADS = 64


def block_loop_signals() -> None:
    """In a helper thread: leave the loop's signals to the loop thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _LOOP_SIGNALS)


class ThreadPerCall(concurrent.futures.ThreadPoolExecutor):
    """The daemon's default executor (asyncio runs getaddrinfo and to_thread in it).

    asyncio's stock pool has cpu+4 threads: a few lookups hung on a dead name server would
    queue every later one (other relays, the next round) behind them, and asyncio.run waits
    for the pool at exit (without limit in 3.11), so SIGTERM would wait on the name server.
    Here each call gets its own daemon thread and shutdown() never waits.
    """

    def __init__(self, limit: int = MAX_THREADS) -> None:
        super().__init__(max_workers=1)
        self._slots = threading.BoundedSemaphore(limit)

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._slots.acquire(blocking=False):
            future.set_exception(OSError(errno.EAGAIN, "too many blocking calls in flight"))
            return future

        def run() -> None:
            block_loop_signals()
            try:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            finally:
                self._slots.release()

        threading.Thread(target=run, name="etrnd-offloop", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Daemon threads: a lookup still hanging at exit must not hold the exit up.
        return None


async def bounded(limit: float, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the loop's executor; TimeoutError after `limit` seconds (the thread
    is abandoned, not stopped: only use it for calls without side effects that matter)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit):
        return await loop.run_in_executor(None, fn, *args)
