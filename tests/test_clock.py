"""The fake clock that every time-dependent test stands on."""

from __future__ import annotations

import asyncio
import time

from exporter.clock import AUTO_ADVANCE_PAUSE, BUSY_HOLD_S, FakeClock, sleep_or_wake, wait_within


async def test_sleepers_wake_in_deadline_order_only_when_time_passes() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(f"{name}@{clock.monotonic():g}")

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 5), ("a", 2), ("c", 9))]
    await asyncio.sleep(0)
    assert clock.sleepers == 3
    await clock.advance(4)
    assert woke == ["a@2"]
    assert clock.monotonic() == 4
    await clock.advance(10)
    assert woke == ["a@2", "b@5", "c@9"]
    assert clock.monotonic() == 14
    await asyncio.gather(*tasks)


async def test_chained_sleeps_each_see_their_own_deadline() -> None:
    clock = FakeClock()
    seen: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await clock.sleep(1)
            seen.append(clock.monotonic())

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await clock.advance(3)
    await task
    assert seen == [1, 2, 3]


async def test_auto_advance_jumps_time_instead_of_waiting() -> None:
    clock = FakeClock(auto_advance=True)
    wall = clock.time()
    await clock.sleep(600)
    assert clock.monotonic() == 600
    assert clock.time() == wall + 600
    await clock.sleep(0)
    assert clock.monotonic() == 600


async def test_auto_advance_holds_still_while_work_is_on_the_wire() -> None:
    # Under load a request can take longer than the driver's pause: time must not leap past
    # a deadline (a poll's, a lease's) while the answer is still on its way.
    clock = FakeClock(auto_advance=True)
    sleeper = asyncio.create_task(clock.sleep(30))
    with clock.busy(), clock.busy():
        # The driver gets many turns, each longer than its pause, to move time: it must not.
        for _ in range(20):
            await asyncio.sleep(AUTO_ADVANCE_PAUSE * 2)
        assert clock.monotonic() == 0
        assert not sleeper.done()
    await sleeper
    assert clock.monotonic() == 30


async def test_time_moves_only_so_far_by_itself_within_a_limit() -> None:
    # A test acting in real time on a job that must stay running (cancelling it, say) limits
    # the clock: otherwise the job's polls race virtual time to its deadline meanwhile.
    clock = FakeClock(auto_advance=True)
    far = asyncio.create_task(clock.sleep(3600))
    with clock.within(60):
        await clock.sleep(10)  # short waits still pass by themselves
        assert clock.monotonic() == 10
        for _ in range(50):  # many turns of the driver, each longer than its pause
            await asyncio.sleep(AUTO_ADVANCE_PAUSE * 2)
        assert clock.monotonic() == 10
        assert not far.done()
        await clock.advance(100)  # a test may still move it on purpose
        assert clock.monotonic() == 110
        # Time carried past the limit (as by a long step under way when the block began)
        # moves the limit on: a short wait still passes instead of hanging.
        await clock.sleep(5)
        assert clock.monotonic() == 115
        assert not far.done()
    await far
    assert clock.monotonic() == 3600


async def test_work_hung_on_purpose_holds_the_clock_only_briefly() -> None:
    # A test that hangs a request (a fault delaying an answer for minutes) still needs its
    # deadlines and shutdown grace to come, in virtual time.
    clock = FakeClock(auto_advance=True)
    with clock.busy():
        began = time.monotonic()
        await clock.sleep(30)
        assert time.monotonic() - began >= BUSY_HOLD_S
    assert clock.monotonic() == 30


async def test_wait_within_ends_with_the_work_and_keeps_its_result() -> None:
    clock = FakeClock()

    async def work() -> str:
        await clock.sleep(2)
        return "done"

    task = asyncio.ensure_future(work())
    waiting = asyncio.create_task(wait_within(clock, 5, task))
    await clock.advance(2)
    assert await waiting is True
    assert task.result() == "done"
    assert clock.monotonic() == 2
    assert clock.sleepers == 0  # the timer went with it


async def test_wait_within_cancels_the_work_when_time_runs_out() -> None:
    clock = FakeClock()
    stopped = asyncio.Event()

    async def work() -> None:
        try:
            await clock.sleep(100)
        finally:
            stopped.set()

    task = asyncio.ensure_future(work())
    waiting = asyncio.create_task(wait_within(clock, 5, task))
    await clock.advance(4.9)
    assert not waiting.done()
    await clock.advance(0.1)
    assert await waiting is False
    assert task.cancelled()
    assert stopped.is_set()  # cancelled and waited for, not left behind


async def test_wait_within_leaves_the_futures_of_asyncio_wait_alone() -> None:
    clock = FakeClock()
    pending = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_within(clock, 3, asyncio.wait({pending})))
    await clock.advance(3)
    assert await waiting is False
    assert not pending.done()  # only the wait for it was given up
    pending.cancel()


async def test_sleep_or_wake_wakes_early_and_a_cancelled_caller_leaves_no_sleeper() -> None:
    clock = FakeClock()
    wake = asyncio.Event()
    sleeping = asyncio.create_task(sleep_or_wake(clock, 60, wake))
    await clock.advance(10)
    wake.set()
    await sleeping
    assert clock.monotonic() == 10
    assert clock.sleepers == 0
    wake.clear()
    sleeping = asyncio.create_task(sleep_or_wake(clock, 60, wake))
    await clock.advance(1)
    sleeping.cancel()
    await asyncio.gather(sleeping, return_exceptions=True)
    assert sleeping.cancelled()
    assert clock.sleepers == 0
