"""Retrying: the policy as data, and the one loop that applies it.

`Backoff` is pure: no clock, no sleeping; given how many attempts failed, how long it has been
trying and the caller's random generator, it says how long to wait or to give up. `retry()` is
the loop every retrying caller uses (AEP requests, IMS tokens, local writes, Redis, lane
PATCHes): it asks the policy, honours a server's Retry-After and a deadline, and sleeps on the
caller's clock.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from exporter.clock import Clock

T = TypeVar("T")

_MAX_EXPONENT = 60  # 2**60 base delays is beyond any cap; avoids float overflow


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, capped per delay, in attempts and in total time.

    `jitter` is the random share of each delay: 1.0 ("full jitter") draws from [0, ceiling],
    0.5 from [ceiling / 2, ceiling].
    """

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_elapsed_s: float = 300.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s <= 0 or self.max_delay_s <= 0 or self.max_elapsed_s <= 0:
            raise ValueError("delays and the total-time cap must be positive")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")

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

        The delay is drawn uniformly from [(1 - jitter) * ceiling, ceiling] (so that clients
        that failed together do not retry together). A server's `retry_after` is a floor, even above
        `max_delay_s`; but no delay may carry the total time spent past `max_elapsed_s`.
        """
        if attempt >= self.max_attempts:
            return None
        ceiling = self.ceiling(attempt)
        delay = rng.uniform((1.0 - self.jitter) * ceiling, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after, 0.0)
        if elapsed + delay > self.max_elapsed_s:
            return None
        return delay


@dataclass(frozen=True, slots=True)
class Retrying:
    """One failed attempt that will be tried again, for a caller's logs and metrics."""

    attempt: int  # 1 = the first attempt failed
    delay: float  # seconds until the next attempt
    error: Exception
    elapsed: float  # seconds since the first attempt began


def _retry_after(exc: Exception) -> float | None:
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


def is_retryable(exc: Exception) -> bool:
    """What our errors say of themselves (`ExporterError.retryable`)."""
    return bool(getattr(exc, "retryable", False))


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    policy: Backoff,
    clock: Clock,
    rng: random.Random,
    retryable: Callable[[Exception], bool] = is_retryable,
    on_retry: Callable[[Retrying], None] | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """`await call()`, again after each failure that `retryable` accepts, as `policy` says.

    A failure that is not retryable, or after which the policy gives up, is raised as it came.
    An error's `retry_after` (a server's Retry-After) is the least wait before the next
    attempt. `deadline` (on `clock.monotonic()`) bounds the whole: no wait runs past it, and a
    failure at or after it is final. `on_retry` hears of each wait before it starts; `sleep`
    replaces `clock.sleep` for a caller that must wake for more than time.
    """
    began = clock.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc):
                raise
            now = clock.monotonic()
            delay = policy.next_delay(
                attempt, rng, retry_after=_retry_after(exc), elapsed=now - began
            )
            if deadline is not None and delay is not None:
                delay = None if now >= deadline else min(delay, deadline - now)
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(Retrying(attempt, delay, exc, now - began))
        await (sleep or clock.sleep)(delay)
