"""Retry pacing and adaptive concurrency, as pure logic.

Exponential backoff with full jitter (each delay uniformly random between 0
and the capped exponential) spreads the retries of many daemons instead of
having them hit a recovering endpoint in lock step.  Throttling halves the
number of uploads allowed in flight; every success wins a little of it back
(additive increase, multiplicative decrease, as TCP does).
"""

from __future__ import annotations

from collections.abc import Callable

BASE_DELAY = 0.2  # seconds before the first retry, at most
# No wait between attempts is longer than this: short enough that an
# endpoint coming back is noticed within seconds, long enough (with one
# attempt at a time during an outage) not to hammer it.
MAX_DELAY = 5.0


def full_jitter(
    attempt: int,
    random: Callable[[], float],
    base: float = BASE_DELAY,
    cap: float = MAX_DELAY,
) -> float:
    """Delay before retry number ``attempt`` (1 = first retry)."""
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 30))
    return float(random() * ceiling)


class ConcurrencyLimit:
    """How many uploads may be in flight: shrinks on throttling, regrows on success."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._value = float(maximum)

    @property
    def value(self) -> int:
        return max(1, int(self._value))

    def throttled(self) -> None:
        self._value = max(1.0, self._value / 2)

    def succeeded(self) -> None:
        # +1 after about `value` successes: one step per round of uploads.
        if self._value < self.maximum:
            self._value = min(float(self.maximum), self._value + 1 / self.value)
