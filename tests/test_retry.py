"""The one retry loop (`exporter.retry.retry`) and its policy, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from exporter.clock import FakeClock
from exporter.errors import AuthError, ServerError, ThrottledError
from exporter.retry import Backoff, Retrying, retry


class Flaky:
    """Fails with `errors` in turn, then answers "ok"; records when each call came."""

    def __init__(self, clock: FakeClock, *errors: Exception) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(self.clock.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_retries_retryable_errors_until_the_call_works() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, ServerError("a"), ServerError("b"))
    heard: list[Retrying] = []
    got = await retry(
        call,
        policy=Backoff(max_attempts=5, base_delay_s=1.0),
        clock=clock,
        rng=random.Random(1),
        on_retry=heard.append,
    )
    assert got == "ok"
    assert len(call.calls) == 3
    assert [r.attempt for r in heard] == [1, 2]
    # Each wait the hook was told of is the time that passed before the next call.
    waits = [b - a for a, b in zip(call.calls, call.calls[1:], strict=False)]
    assert waits == pytest.approx([r.delay for r in heard])
    assert all(0 <= r.delay <= 2.0 for r in heard)  # full jitter under the ceilings 1, 2


async def test_a_non_retryable_error_is_raised_at_once() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, AuthError("no"))
    with pytest.raises(AuthError):
        await retry(call, policy=Backoff(), clock=clock, rng=random.Random(1))
    assert call.calls == [0.0]


async def test_the_retryable_predicate_decides_not_the_error() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, OSError("disk full"), OSError("still"))
    got = await retry(
        call,
        policy=Backoff(),
        clock=clock,
        rng=random.Random(1),
        retryable=lambda exc: isinstance(exc, OSError),
    )
    assert got == "ok"
    assert len(call.calls) == 3


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, *(ServerError(f"e{i}") for i in range(10)))
    with pytest.raises(ServerError, match="e2"):
        await retry(call, policy=Backoff(max_attempts=3), clock=clock, rng=random.Random(1))
    assert len(call.calls) == 3


async def test_gives_up_when_the_next_wait_would_pass_max_elapsed() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, *(ServerError("down") for _ in range(100)))
    policy = Backoff(
        max_attempts=100, base_delay_s=4.0, max_delay_s=4.0, max_elapsed_s=10.0, jitter=0.0
    )
    with pytest.raises(ServerError):
        await retry(call, policy=policy, clock=clock, rng=random.Random(1))
    # Every wait is 4 s: after the failure at 8 s another would end at 12 s, past 10 s.
    assert call.calls == [0.0, 4.0, 8.0]


async def test_retry_after_is_the_least_wait_even_above_the_cap() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, ThrottledError("slow down", status=429, retry_after=42.0))
    heard: list[Retrying] = []
    policy = Backoff(max_attempts=3, base_delay_s=0.1, max_delay_s=1.0)
    await retry(call, policy=policy, clock=clock, rng=random.Random(1), on_retry=heard.append)
    assert call.calls == [0.0, 42.0]
    assert heard[0].delay == 42.0


async def test_deadline_cuts_the_last_wait_and_ends_the_retries() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, *(ServerError("down") for _ in range(100)))
    policy = Backoff(
        max_attempts=1000, base_delay_s=3.0, max_delay_s=3.0, max_elapsed_s=1e9, jitter=0.0
    )
    with pytest.raises(ServerError):
        await retry(call, policy=policy, clock=clock, rng=random.Random(3), deadline=10.0)
    # Waits of 3 s: 0, 3, 6, 9, then the last cut to 1 s: tried at the deadline, never after.
    assert call.calls == pytest.approx([0.0, 3.0, 6.0, 9.0, 10.0])


async def test_a_custom_sleep_is_used_for_every_wait() -> None:
    clock = FakeClock(auto_advance=True)
    call = Flaky(clock, ServerError("a"), ServerError("b"))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    await retry(call, policy=Backoff(), clock=clock, rng=random.Random(1), sleep=sleep)
    assert len(slept) == 2
    assert clock.monotonic() == 0.0  # the clock itself was never slept on


async def test_cancellation_during_a_wait_is_not_retried() -> None:
    clock = FakeClock()
    call = Flaky(clock, *(ServerError("down") for _ in range(10)))
    task = asyncio.create_task(retry(call, policy=Backoff(), clock=clock, rng=random.Random(1)))
    await clock.advance(0)
    assert clock.sleepers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(call.calls) == 1


def test_same_seed_same_delays_and_equal_jitter_keeps_half() -> None:
    full = Backoff(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0)
    a = [full.next_delay(n, random.Random(7)) for n in range(1, 6)]
    b = [full.next_delay(n, random.Random(7)) for n in range(1, 6)]
    assert a == b
    half = Backoff(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0, jitter=0.5)
    rng = random.Random(7)
    for n in range(1, 200):
        delay = half.next_delay(n % 6 + 1, rng)
        ceiling = half.ceiling(n % 6 + 1)
        assert delay is not None
        assert ceiling / 2 <= delay <= ceiling
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)
