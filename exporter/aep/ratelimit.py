"""Client-side pacing shared by every AEP call in the process.

Two limits wrap each request: a concurrency cap (a semaphore) and a request rate. The rate
adapts AIMD-style, like TCP's congestion window: a 429 cuts it multiplicatively (at most once
per `cut_window_s`, so a burst of 429s answering one burst of requests is one cut, and never
below the floor); each success raises it additively, about `increase_rps` per second of
successful traffic, back up to the ceiling. A `Retry-After` on a 429 also holds back every new
request until it has passed, not only the one that was refused.

The rate is metered as a token bucket in its GCRA form: one "theoretical arrival time" that
each caller reserves a slot against, so waiters are served in arrival order and the wait is
known up front; all waiting goes through the injected clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from exporter.clock import Clock
from exporter.metrics import Metrics

log = structlog.get_logger("exporter.aep")


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """Counters for metrics: a snapshot, taken by `RateLimiter.stats`."""

    rate_rps: float
    waits: int
    waited_s: float
    throttled: int
    cuts: int
    in_flight: int


class RateLimiter:
    """Adaptive rate limit plus concurrency cap; `async with limiter.slot(): <request>`."""

    def __init__(
        self,
        clock: Clock,
        *,
        rate_rps: float,
        min_rate_rps: float,
        max_concurrency: int,
        burst: float = 1.0,
        decrease: float = 0.5,
        increase_rps: float = 1.0,
        cut_window_s: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        if not 0 < min_rate_rps <= rate_rps:
            raise ValueError("need 0 < min_rate_rps <= rate_rps")
        if not 0 < decrease < 1 or burst < 1 or max_concurrency < 1:
            raise ValueError("need 0 < decrease < 1, burst >= 1 and max_concurrency >= 1")
        self._clock = clock
        self._ceiling = rate_rps
        self._floor = min_rate_rps
        self._rate = rate_rps
        self._burst = burst
        self._decrease = decrease
        self._increase = increase_rps
        self._cut_window = cut_window_s
        self._tat = clock.monotonic()  # when the bucket is next full again
        self._last_cut: float | None = None
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._waits = 0
        self._waited = 0.0
        self._throttled = 0
        self._cuts = 0
        self._in_flight = 0
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_limiter(lambda: self._rate, lambda: self._in_flight)

    @property
    def rate(self) -> float:
        """The current rate, requests per second."""
        return self._rate

    @property
    def stats(self) -> LimiterStats:
        return LimiterStats(
            rate_rps=self._rate,
            waits=self._waits,
            waited_s=self._waited,
            throttled=self._throttled,
            cuts=self._cuts,
            in_flight=self._in_flight,
        )

    def _reserve(self, now: float) -> float:
        interval = 1.0 / self._rate
        tat = max(self._tat, now)
        self._tat = tat + interval
        return max(0.0, tat - now - (self._burst - 1.0) * interval)

    async def acquire(self) -> None:
        """Wait (on the clock) until the rate allows one more request."""
        wait = self._reserve(self._clock.monotonic())
        if wait > 0:
            self._waits += 1
            self._waited += wait
            if self._metrics is not None:
                self._metrics.rate_limited(wait)
            await self._clock.sleep(wait)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a concurrency slot and a rate token for the duration of one request."""
        async with self._semaphore:
            await self.acquire()
            self._in_flight += 1
            try:
                yield
            finally:
                self._in_flight -= 1

    def on_throttled(self, retry_after: float | None = None) -> None:
        """A 429 came back: cut the rate (once per window) and honour `retry_after` for all."""
        now = self._clock.monotonic()
        self._throttled += 1
        if retry_after is not None and retry_after > 0:
            self._tat = max(self._tat, now + retry_after)
        if self._last_cut is not None and now - self._last_cut < self._cut_window:
            return
        old = self._rate
        self._rate = max(self._floor, self._rate * self._decrease)
        self._last_cut = now
        if self._rate < old:
            self._cuts += 1
            if self._metrics is not None:
                self._metrics.rate_cut()
            log.info("aep_rate_cut", rate_rps=round(self._rate, 3), previous_rps=round(old, 3))

    def on_success(self) -> None:
        """A request was answered without throttling: creep the rate back up."""
        if self._rate < self._ceiling:
            self._rate = min(self._ceiling, self._rate + self._increase / self._rate)
