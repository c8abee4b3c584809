"""`export`'s spinner: the not-ready window counted down, the run counted up, every second.

Frames are rendered from the job's progress and a fake clock; no real time passes.
"""

from __future__ import annotations

import asyncio

from exporter.clock import FakeClock
from exporter.engine.engine import Progress
from exporter.jobs import JobState
from exporter.oneshot import Countdown, clock_text, tick


def test_clock_text_reads_as_a_countdown() -> None:
    assert [clock_text(s) for s in (0, 9.9, 61, 600, 3600 + 62, -3)] == [
        "0:00",
        "0:09",
        "1:01",
        "10:00",
        "1:01:02",
        "0:00",
    ]


async def test_the_window_counts_down_and_the_run_up() -> None:
    clock = FakeClock()
    countdown = Countdown(clock, clock.monotonic())
    assert countdown.text() == "finding or creating the flow  (0:00 in all)"
    await clock.advance(2)
    countdown.see(Progress(JobState.FLOW_READY, flow_id="f", ready_at=clock.time() + 600))
    assert countdown.text() == "waiting out AEP's 'not ready' window: 10:00 left  (0:02 in all)"
    await clock.advance(0.5)  # rounded up: never "0:00 left" while the window is still open
    assert "window: 10:00 left" in countdown.text()
    await clock.advance(599)
    assert "window: 0:01 left  (10:01 in all)" in countdown.text()
    await clock.advance(0.5)
    countdown.see(Progress(JobState.TRIGGERING, flow_id="f", intent_ms=1))
    assert countdown.text() == "triggering the export  (10:02 in all)"
    countdown.see(Progress(JobState.RUNNING, flow_id="f", run_id="r"))
    await clock.advance(65)
    assert countdown.text() == "run in progress for 1:05  (11:07 in all)"


async def test_a_window_already_over_is_not_counted() -> None:
    clock = FakeClock()
    countdown = Countdown(clock, clock.monotonic())
    countdown.see(Progress(JobState.FLOW_READY, flow_id="f", ready_at=clock.time() - 1))
    assert countdown.text() == "flow ready  (0:00 in all)"


class Frames:
    def __init__(self) -> None:
        self.shown: list[str] = []

    def update(self, status: str) -> None:
        self.shown.append(status)


async def test_the_spinner_is_redrawn_every_second_while_nothing_happens() -> None:
    clock = FakeClock()
    countdown = Countdown(clock, clock.monotonic())
    countdown.see(Progress(JobState.FLOW_READY, flow_id="f", ready_at=clock.time() + 3))
    frames = Frames()
    ticker = asyncio.create_task(tick(countdown, frames, clock))
    for _ in range(3):
        await clock.advance(1)
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)
    assert frames.shown == [
        "waiting out AEP's 'not ready' window: 0:02 left  (0:01 in all)",
        "waiting out AEP's 'not ready' window: 0:01 left  (0:02 in all)",
        "flow ready  (0:03 in all)",
    ]
