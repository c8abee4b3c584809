"""Retry policy as data: how long to wait before the next attempt, or whether to give up.

Pure: no clock, no sleeping; the caller passes how many attempts failed, how long it has been
trying and its own random generator, and does the waiting itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_MAX_EXPONENT = 60  # 2**60 base delays is beyond any cap; avoids float overflow


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, capped per delay, in attempts and in total time."""

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_elapsed_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s <= 0 or self.max_delay_s <= 0 or self.max_elapsed_s <= 0:
            raise ValueError("delays and the total-time cap must be positive")

    def ceiling(self, attempt: int) -> float:
        """The largest jittered delay after `attempt` failed attempts."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return min(self.max_delay_s, self.base_delay_s * 2.0**exponent)

    def next_delay(
        self,
        attempt: int,
        rng: random.Random,
        *,
        retry_after: float | None = None,
        elapsed: float = 0.0,
    ) -> float | None:
        """Seconds to wait after the `attempt`-th failed attempt (1 = the first), or None to
        give up.

        The delay is drawn uniformly from [0, ceiling] ("full jitter", so that clients that
        failed together do not retry together). A server's `retry_after` is a floor, even above
        `max_delay_s`; but no delay may carry the total time spent past `max_elapsed_s`.
        """
        if attempt >= self.max_attempts:
            return None
        delay = rng.uniform(0.0, self.ceiling(attempt))
        if retry_after is not None:
            delay = max(delay, retry_after, 0.0)
        if elapsed + delay > self.max_elapsed_s:
            return None
        return delay
