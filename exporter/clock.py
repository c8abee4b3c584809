"""Time as a seam: everything that reads the clock or sleeps takes a `Clock`.

`SystemClock` is the real one. `FakeClock` moves only when a test advances it, waking the
sleepers whose deadlines have passed in deadline order, so backoff, deadlines and emulated
waits are tested without sleeping for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Protocol

AUTO_ADVANCE_PAUSE = 0.0005  # real seconds
# How long (real seconds) work marked busy() holds an auto-advancing clock: far longer than a
# loaded machine takes to answer on loopback, far shorter than a request a test hangs on purpose
# (whose timeouts and shutdown deadlines must still come in virtual time).
BUSY_HOLD_S = 0.25
SETTLE_TURNS = 30


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock time, epoch seconds."""

    def monotonic(self) -> float:
        """A clock that never goes backwards, for intervals and deadlines."""

    async def sleep(self, seconds: float) -> None:
        """Wait for `seconds` of this clock's time."""

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Work this clock cannot see is under way (a request on the wire): a virtual clock
        holds still until it ends, a real one ignores it."""


async def wait_within(clock: Clock, seconds: float, work: Awaitable[object]) -> bool:
    """Wait for `work`, at most `seconds` of `clock`'s time; whether it ended in time.

    If time runs out first, `work` is cancelled and waited for (to keep futures it waits on
    alive, pass `asyncio.wait(...)` of them). A task passed in keeps its result or error for
    the caller. A cancelled caller cancels both.
    """
    task = asyncio.ensure_future(work)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, timer, return_exceptions=True)
    return not task.cancelled()


async def sleep_or_wake(clock: Clock, seconds: float, wake: asyncio.Event) -> None:
    """Sleep `seconds` of `clock`'s time, or less if `wake` is set meanwhile."""
    await wait_within(clock, seconds, wake.wait())


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def busy(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@dataclass(eq=False)
class _Limit:
    span: float
    until: float


class FakeClock:
    """A clock that stands still until `advance()` is awaited.

    With `auto_advance`, time moves by itself: whenever sleepers are waiting, it jumps to the
    earliest deadline as soon as the event loop has had a moment and no `busy()` work (a
    request on the wire, which may wait on threads or another process) is under way. Code that
    backs off, polls and waits runs at full speed in virtual time; concurrent sleeps overlap
    as they would in real time; a server sharing the clock (the emulator in tests) sees the
    same time pass.
    """

    def __init__(self, start: float = 1_767_225_600.0, *, auto_advance: bool = False) -> None:
        # start: 2026-01-01T00:00:00Z
        self.auto_advance = auto_advance
        self._driver: asyncio.Task[None] | None = None
        self._wall0 = start
        self._now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._holds: dict[int, float] = {}  # busy() work under way: when it began (real)
        self._released = asyncio.Event()
        self._limits: list[_Limit] = []  # within() blocks under way: how far time may go

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to pass."""
        return sum(1 for *_, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        self._released.set()  # a driver held back by within() may be able to go on
        if self.auto_advance and self._driver is None:
            self._driver = asyncio.create_task(self._drive(), name="fake-clock-driver")
        await fut

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        token = next(self._seq)
        self._holds[token] = time.monotonic()
        try:
            yield
        finally:
            del self._holds[token]
            self._released.set()

    @contextlib.contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """Inside this block time moves by itself at most `seconds` ahead (`advance()` still
        moves it at will).

        For a test that acts in real time on work that must stay under way meanwhile: with
        auto-advance, a week-long deadline passes in well under a second of a busy
        machine's time, as a long run's polls race ahead. Short waits (a backoff, a rate
        limit) still pass. Time already carried past the limit (by a step under way when the
        block began, or by `advance()`) moves the limit on with it, so that short waits
        never hang."""
        limit = _Limit(seconds, self._now + seconds)
        self._limits.append(limit)
        try:
            yield
        finally:
            self._limits.remove(limit)
            self._released.set()

    def _limit(self) -> float:
        for limit in self._limits:
            if limit.until < self._now:
                limit.until = self._now + limit.span
        return min(limit.until for limit in self._limits)

    async def _held(self) -> bool:
        """Until no busy() work younger than BUSY_HOLD_S is under way; whether it waited."""
        waited = False
        while self._holds:
            left = max(self._holds.values()) + BUSY_HOLD_S - time.monotonic()
            if left <= 0:
                break
            waited = True
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), left)
        return waited and not self._holds

    async def _drive(self) -> None:
        try:
            while True:
                # Give ready callbacks and in-flight network I/O a moment before time moves;
                # a request on the wire holds it still whatever the machine's load.
                await asyncio.sleep(AUTO_ADVANCE_PAUSE)
                if await self._held():
                    continue  # answers came: what they wake runs before time moves
                while self._sleepers and self._sleepers[0][2].done():
                    heapq.heappop(self._sleepers)
                if not self._sleepers:
                    return
                if self._limits and self._sleepers[0][0] > self._limit():
                    self._released.clear()  # until a nearer sleep or the block's end
                    await self._released.wait()
                    continue
                await self.advance(max(0.0, self._sleepers[0][0] - self._now))
        finally:
            self._driver = None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its deadline and letting it run."""
        await _settle()  # tasks that are ready now start before time moves
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            await _settle()
        self._now = target
        await _settle()


async def _settle() -> None:
    # Loop turns let woken tasks run until they block again (on a new sleep, say) before time
    # moves on; a wake-up that goes through a few tasks and futures needs a dozen or so.
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)
