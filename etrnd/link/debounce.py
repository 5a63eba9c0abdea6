"""Pure debounce with an injected clock: settle after link-up, min_interval between rounds."""

from __future__ import annotations


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
