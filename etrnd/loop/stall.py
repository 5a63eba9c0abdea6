"""Stall detector: notices when one step of the event loop ran longer than a threshold."""

from __future__ import annotations

import asyncio
import selectors
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

THRESHOLD = 0.25  # s; a round, a status request or a netlink read takes well under 10 ms
_ROOT = __name__.rsplit(".", 1)[0] + "/"


@dataclass(frozen=True)
class Stall:
    """One loop step that took `duration` seconds; `where` is the loop thread's stack
    (innermost last) sampled while it was stuck, or "" when no sample was taken."""

    duration: float
    where: str


def describe(frame: FrameType | None, depth: int = 4) -> str:
    """`file:line function` for the innermost frames, shortest useful paths, innermost last."""
    if frame is None:
        return ""
    out = []
    for entry in traceback.extract_stack(frame)[-depth:]:
        path = entry.filename
        cut = path.rfind(_ROOT)
        if cut >= 0:
            path = path[cut:]
        elif "/" in path:
            path = path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1]
        out.append(f"{path}:{entry.lineno} {entry.name}")
    return " > ".join(out)


class StallDetector:
    """Measures each loop step: the time from select() returning to select() being called
    again is what the loop spent running callbacks, i.e. what everything else waited.

    No timer of its own (idle stays idle): the selector calls `waiting()`/`running()`. While
    a step runs, a one-shot SIGALRM armed for `threshold` samples the loop thread's stack,
    which is how a stall inside a blocking system call can still say where it was.
    """

    def __init__(self, threshold: float = THRESHOLD, on_stall: Callable[[Stall], None] | None
                 = None, clock: Callable[[], float] = time.monotonic,
                 sample: bool = True) -> None:
        self.threshold = threshold
        self.on_stall = on_stall
        self._clock = clock
        self._sample = sample
        self._since: float | None = None
        self._where = ""
        self._armed = False
        self.stalls = 0
        self.longest = 0.0  # s, the longest step seen

    # --- called by the selector, around select() -------------------------------------------
    def running(self) -> None:
        self._since = self._clock()
        self._where = ""
        if self._sample:
            signal.setitimer(signal.ITIMER_REAL, self.threshold)
            self._armed = True

    def waiting(self) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False
        if self._since is None:
            return
        duration = self._clock() - self._since
        self._since = None
        self.longest = max(self.longest, duration)
        if duration >= self.threshold:
            self.stalls += 1
            if self.on_stall is not None:
                self.on_stall(Stall(duration, self._where))

    def stop(self) -> None:
        """The loop is closing: no alarm may outlive it (its default action kills)."""
        self._since = None
        if self._sample:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
        self._armed = False

    def on_alarm(self, _signum: int, frame: FrameType | None) -> None:
        """SIGALRM handler: runs in the loop thread, between its bytecodes or in an EINTR."""
        self._armed = False
        if self._since is not None and not self._where:
            self._where = describe(frame)

    # --- wiring ----------------------------------------------------------------------------
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """A SelectorEventLoop whose selector reports to this detector (main thread only,
        when sampling: the alarm is a process-wide signal handled there)."""
        if self._sample:
            signal.signal(signal.SIGALRM, self.on_alarm)
        return asyncio.SelectorEventLoop(_TimedSelector(self))


class _TimedSelector(selectors.EpollSelector):
    def __init__(self, detector: StallDetector) -> None:
        super().__init__()
        self._detector = detector

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._detector.waiting()
        try:
            return super().select(timeout)
        finally:
            self._detector.running()

    def close(self) -> None:
        self._detector.stop()
        super().close()
