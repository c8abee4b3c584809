"""One poller for every run in flight: many runs per request, each on its own cadence.

A waiting job registers its run id and a deadline, then awaits a future. The poller
wakes when the earliest run is due, asks AEP for every due run in batches of up to 100
(`GET /runs?property=id==a,b,…`), settles the finished ones and reschedules the rest.
The last batch is topped up with runs at least half-way to their turn, so that jittered
runs share requests instead of going one per request. Cadence grows with a run's age (a
quarter of it, by default) between a floor and a ceiling, with jitter so that runs started
together spread out. A failed poll never re-triggers anything: it is retried on the run's
own schedule, and a job fails only after its run's status has been unreadable for
`status_unreadable_s`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import structlog

from exporter.aep.api import AepApi, RunInfo
from exporter.clock import Clock, sleep_or_wake
from exporter.engine.config import EngineConfig
from exporter.errors import AepError, ExporterError
from exporter.metrics import Metrics

log = structlog.get_logger("exporter.poller")
EARLY_SHARE = 0.5  # a run may be read up to this share of its interval early, to fill a batch
BATCH_HISTORY = 1024  # how many recent batch sizes the stats keep
COMPACT_MIN = 64  # finished waiters left in the heaps before they are swept out


class RunTimedOut(ExporterError):
    """The job's deadline passed before its run ended."""


class StatusUnreadable(ExporterError):
    """The run's status could not be read for longer than allowed."""


@dataclass(eq=False)
class _Waiter:
    run_id: str
    future: asyncio.Future[RunInfo]
    started: float
    deadline: float
    due: float
    last_read: float
    interval: float = 0.0
    polls: int = 0
    last_error: str | None = None
    queued: bool = True
    """Whether the waiter has its entry in the due heap (popped while being polled)."""


@dataclass
class PollerStats:
    requests: int = 0
    failed_requests: int = 0
    runs_read: int = 0
    """Run ids asked for, over every request: `runs_read / requests` is the mean batch."""
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=BATCH_HISTORY))
    """The sizes of the most recent requests, oldest first."""


class RunPoller:
    """Batches status reads of every run in flight; `wait()` is what jobs call."""

    def __init__(
        self,
        api: AepApi,
        config: EngineConfig,
        clock: Clock,
        rng: random.Random,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._clock = clock
        self._rng = rng
        self._metrics = metrics
        self._waiters: dict[str, list[_Waiter]] = {}
        # Two heaps, one entry per waiter in each, keyed no later than the moment it stands
        # for: an entry that comes up early (the waiter was read early, or read at all,
        # since) is pushed back with its real time. So a pass costs the waiters due, not
        # every waiter in flight.
        self._due: list[tuple[float, int, _Waiter]] = []
        self._expiry: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._finished = 0  # waiters done since the heaps were last swept of them
        self._live = 0  # waiters whose `wait()` has not returned
        self._wake = asyncio.Event()
        self.stats = PollerStats()

    @property
    def in_flight(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    @property
    def held(self) -> int:
        """Heap entries the poller holds, finished ones not yet swept out included."""
        return len(self._due) + len(self._expiry)

    async def wait(self, run_id: str, *, deadline: float) -> RunInfo:
        """The run once it has ended. Raises `RunTimedOut` at `deadline` (monotonic) and
        `StatusUnreadable` when AEP would not tell its status for too long."""
        now = self._clock.monotonic()
        waiter = _Waiter(
            run_id,
            asyncio.get_running_loop().create_future(),
            now,
            deadline,
            due=now,
            last_read=now,
        )
        self._waiters.setdefault(run_id, []).append(waiter)
        self._live += 1
        heapq.heappush(self._due, (now, next(self._seq), waiter))
        heapq.heappush(self._expiry, (self._expires(waiter), next(self._seq), waiter))
        self._wake.set()
        try:
            return await waiter.future
        finally:
            waiter.future.cancel()  # a no-op once settled; marks it finished otherwise
            self._live -= 1
            group = self._waiters.get(run_id, [])
            if waiter in group:
                group.remove(waiter)
            if not group:
                self._waiters.pop(run_id, None)
            self._forget_finished()

    def _forget_finished(self) -> None:
        """Sweep finished waiters out of the heaps once they outnumber the live ones.

        A finished waiter's entries are otherwise dropped only when they come up, and its
        expiry entry may be `status_unreadable_s` away: at a steady finish rate the heaps
        (and the run each waiter holds) would grow with everything finished in that window.
        A sweep costs the heaps' size, at most about twice the waiters finished since the
        last one: O(1) per finished waiter."""
        if not self._live:  # nothing in flight: drop everything at once
            self._due.clear()
            self._expiry.clear()
            self._finished = 0
            return
        self._finished += 1
        if self._finished < max(COMPACT_MIN, self._live):
            return
        self._finished = 0
        self._expiry = [e for e in self._expiry if not e[2].future.done()]
        heapq.heapify(self._expiry)
        kept = []
        for entry in self._due:
            if entry[2].future.done():
                entry[2].queued = False
            else:
                kept.append(entry)
        self._due = kept
        heapq.heapify(self._due)

    async def run(self) -> None:
        """The polling loop; runs until cancelled."""
        while True:
            now = self._clock.monotonic()
            self._expire(now)
            due = self._pop_due(now)
            if due:
                try:
                    await self._poll(self._fill(due, now))
                finally:
                    self._requeue(due)
                continue
            await self._sleep_until_next(now)

    def _expires(self, w: _Waiter) -> float:
        return min(w.deadline, w.last_read + self._config.status_unreadable_s)

    def _pop_due(self, now: float) -> list[_Waiter]:
        due: list[_Waiter] = []
        while self._due and self._due[0][0] <= now:
            _, _, w = heapq.heappop(self._due)
            w.queued = False
            if w.future.done():
                continue
            if w.due <= now:
                due.append(w)
            else:  # read early since this entry was made: come back at its real time
                self._push_due(w)
        return due

    def _push_due(self, w: _Waiter) -> None:
        if not w.queued and not w.future.done():
            w.queued = True
            heapq.heappush(self._due, (w.due, next(self._seq), w))

    def _requeue(self, polled: list[_Waiter]) -> None:
        for w in polled:
            self._push_due(w)

    def _fill(self, due: list[_Waiter], now: float) -> list[_Waiter]:
        """Top the last batch up with the runs nearest their next poll, if they are at least
        half-way there: the request goes out anyway, and each run read early is one request
        fewer later. Without this, runs whose due times jitter apart go one per request."""
        ids = {w.run_id for w in due}
        room = -len(ids) % self._config.poll_batch
        if room == 0:
            return due
        horizon = now + self._config.poll_max_s * EARLY_SHARE
        passed: list[tuple[float, int, _Waiter]] = []
        while room and self._due and self._due[0][0] <= horizon:
            entry = heapq.heappop(self._due)
            w = entry[2]
            if w.future.done():
                w.queued = False
                continue
            if w.run_id in ids or w.due - now > w.interval * EARLY_SHARE:
                passed.append(entry)
                continue
            w.queued = False
            ids.add(w.run_id)
            room -= 1
            due.append(w)
        for entry in passed:
            heapq.heappush(self._due, entry)
        return due

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, _, w = heapq.heappop(self._expiry)
            if w.future.done():
                continue
            if now >= w.deadline:
                w.future.set_exception(
                    RunTimedOut(
                        f"run {w.run_id} had not ended when the job's deadline passed "
                        f"({now - w.started:.0f} s after it started waiting)"
                    )
                )
            elif now >= w.last_read + self._config.status_unreadable_s:  # the key's own sum:
                # `now - last_read >= limit` can round the other way and spin forever
                w.future.set_exception(
                    StatusUnreadable(
                        f"the status of run {w.run_id} could not be read for "
                        f"{now - w.last_read:.0f} s: {w.last_error}"
                    )
                )
            else:  # read since this entry was made
                heapq.heappush(self._expiry, (self._expires(w), next(self._seq), w))

    async def _sleep_until_next(self, now: float) -> None:
        self._wake.clear()
        if not self._due and not self._expiry:
            await self._wake.wait()
            return
        until = min(heap[0][0] for heap in (self._due, self._expiry) if heap)
        await sleep_or_wake(self._clock, max(0.0, until - now), self._wake)

    async def _poll(self, due: list[_Waiter]) -> None:
        ids = list(dict.fromkeys(w.run_id for w in due))
        size = self._config.poll_batch
        for start in range(0, len(ids), size):
            batch = ids[start : start + size]
            self.stats.requests += 1
            self.stats.runs_read += len(batch)
            self.stats.batch_sizes.append(len(batch))
            if self._metrics is not None:
                self._metrics.poll_batch(len(batch))
            error = "the run is not visible yet"
            try:
                found = await self._api.get_runs(batch)
            except AepError as exc:
                self.stats.failed_requests += 1
                log.warning("run_poll_failed", runs=len(batch), error=str(exc))
                found = None
                error = str(exc)
            now = self._clock.monotonic()
            for run_id in batch:
                run = None if found is None else found.get(run_id)
                if run is not None and run.terminal and self._metrics is not None:
                    self._metrics.run_ended(run, now_s=self._clock.time())  # once per run
                for w in list(self._waiters.get(run_id, [])):
                    self._settle(w, run, now, error)

    def _settle(self, w: _Waiter, run: RunInfo | None, now: float, error: str) -> None:
        if w.future.done():
            return
        w.polls += 1
        if run is not None:
            w.last_read = now
            if run.terminal:
                w.future.set_result(run)
                return
        else:
            w.last_error = error
        age = max(0.0, now - w.started)
        interval = min(
            self._config.poll_max_s, max(self._config.poll_min_s, age * self._config.poll_growth)
        )
        jitter = self._config.poll_jitter
        w.interval = interval
        w.due = now + interval * self._rng.uniform(1 - jitter, 1 + jitter)
