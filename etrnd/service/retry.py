"""Retry policy: exponential backoff with jitter, a cap and a give-up deadline, all pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from etrnd.config.model import Retry


@dataclass(frozen=True)
class Backoff:
    first_delay: float
    max_delay: float
    factor: float
    jitter: float
    give_up_after: float  # seconds from the round's start; 0 = never

    @classmethod
    def from_config(cls, retry: Retry) -> Backoff:
        return cls(retry.first_delay, retry.max_delay, retry.factor, retry.jitter,
                   retry.give_up_after)

    def base_delay(self, attempt: int) -> float:
        """Delay after failed attempt number `attempt` (1-based), before jitter."""
        delay = self.first_delay
        # A loop rather than factor**n: no float overflow however long the link stays flaky.
        for _ in range(max(0, attempt - 1)):
            delay *= self.factor
            if delay >= self.max_delay:
                return self.max_delay
        return min(delay, self.max_delay)

    def delay(self, attempt: int, rng: Callable[[], float]) -> float:
        """Base delay ± jitter; `rng` returns a float in [0, 1) like random.random."""
        base = self.base_delay(attempt)
        # Jitter after the cap, so relays that hit the cap together still spread out.
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rng() - 1.0)))

    def next_delay(self, attempt: int, elapsed: float,
                   rng: Callable[[], float]) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now.

        `elapsed` is the time since the round started, on a monotonic clock. A delay that would
        overshoot the deadline is shortened so the last attempt happens at the deadline.
        """
        delay = self.delay(attempt, rng)
        if not self.give_up_after:
            return delay
        left = self.give_up_after - elapsed
        if left <= 0:
            return None
        return min(delay, left)
