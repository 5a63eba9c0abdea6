"""Pure debounce with an injected clock: down-hold, settle after link-up, min_interval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class Debouncer:
    """Feed it link transitions; ask when the next round is due and take it when it is.

    A link-up closer than min_interval to the last round is deferred, not dropped: the
    link changed, so the ISP may hold mail it could not deliver, and one round is owed.
    """

    def __init__(self, settle: float, min_interval: float) -> None:
        self.settle = settle
        self.min_interval = min_interval
        self._up_since: float | None = None  # a link-up still owed a round
        self._last_round: float | None = None

    @property
    def pending(self) -> bool:
        return self._up_since is not None

    @property
    def last_round(self) -> float | None:
        return self._last_round

    def link(self, up: bool, now: float) -> None:
        """Record a transition; a down cancels the round the last up was waiting for."""
        if not up:
            self._up_since = None
        elif self._up_since is None:
            self._up_since = now

    def due(self) -> float | None:
        """When the owed round may start (clock time), or None if none is owed."""
        if self._up_since is None:
            return None
        at = self._up_since + self.settle
        if self._last_round is not None:
            at = max(at, self._last_round + self.min_interval)
        return at

    def owed(self) -> tuple[float, str] | None:
        """(clock time, what holds it back) of the owed round: "settle" or "min_interval"."""
        due = self.due()
        if due is None or self._up_since is None:
            return None
        return due, "settle" if due == self._up_since + self.settle else "min_interval"

    def take_early(self, now: float) -> bool:
        """A trigger takes the owed round before it is due (True if one was owed).

        The round the trigger starts is that round: it counts as started at `now`, so the
        settle timer starts no second one, and min_interval runs from here.
        """
        if self._up_since is None:
            return False
        self._last_round = now
        self._up_since = None
        return True

    def take_round(self, now: float) -> bool:
        """True (and the round counts as started) if a round is owed and due at `now`."""
        due = self.due()
        if due is None or now < due:
            return False
        self._last_round = now
        self._up_since = None
        return True


@dataclass(frozen=True)
class Change:
    """What the held link state did: `up`, `down` (decided), or `blip` (a down undone).

    `since` is when the kernel's state really changed (clock time): for a `down` decided
    after the hold, the start of the outage; `held` is how long the down was held (s).
    """

    kind: Literal["up", "down", "blip"]
    since: float
    held: float = 0.0


class DownHold:
    """A down undone within `hold` seconds is a blip, not a down (ifplugd's down delay).

    Feed it every raw verdict (`observe`); ask `deadline()` when a held down must be
    decided and call `expire(now)` then. An up is decided at once: holding costs no
    up-detection latency. `observe(False, now, at_once=True)` decides a down without the
    hold (an expired RA route: its lifetime was the hold).
    """

    def __init__(self, hold: float, up: bool = False) -> None:
        self.hold = hold
        self.up = up  # the decided state
        self._down_since: float | None = None  # a down being held

    @property
    def holding(self) -> float | None:
        """When the held down began (clock time), or None."""
        return self._down_since

    def reset(self, up: bool) -> None:
        """Take `up` as decided, with nothing held (the state at start)."""
        self.up = up
        self._down_since = None

    def observe(self, up: bool, now: float, *, at_once: bool = False) -> Change | None:
        """The raw state now; returns the decided change, if any."""
        if up:
            if self.up:
                since, self._down_since = self._down_since, None
                return None if since is None else Change("blip", since, now - since)
            self.up = True
            return Change("up", now)
        if not self.up:
            return None
        since = self._down_since if self._down_since is not None else now
        if at_once or self.hold <= 0:
            self.up, self._down_since = False, None
            return Change("down", since, now - since)
        self._down_since = since
        return None

    def deadline(self) -> float | None:
        """When the held down becomes a down (clock time), or None if nothing is held."""
        return None if self._down_since is None else self._down_since + self.hold

    def expire(self, now: float) -> Change | None:
        """At or after the deadline: the held down is a down, dated from its start."""
        due = self.deadline()
        if due is None or now < due or self._down_since is None:
            return None
        since, self._down_since = self._down_since, None
        self.up = False
        return Change("down", since, now - since)
