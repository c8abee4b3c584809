"""A job resumed after a restart counts its duration and its timeout from its first start,
not from the resume."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.daemon.core import EXIT_OK
from exporter.sources.spool import RESULT_SUFFIX
from tests.daemon_support import spool_daemon, spool_of
from tests.test_daemon_fake import fake_settings

DEADLINE = 20.0  # real seconds: a bound on a wait for an event, never a sleep
RUN_S = 1_000.0


class SignallingAep(FakeAep):
    """The fake, telling the test when a run has been started."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, ready_after_s=-1e9, run_duration_s=RUN_S)
        self.triggered = asyncio.Event()

    async def trigger_many(
        self, flow_id: str, dataset_ids: Sequence[str], *, send_by: float | None = None
    ) -> dict[str, str]:
        started = await super().trigger_many(flow_id, dataset_ids, send_by=send_by)
        self.triggered.set()
        return started


async def resumed_outcome(
    tmp_path: Path, clock: FakeClock, aep: SignallingAep, **changes: Any
) -> dict[str, Any]:
    """A job dropped, triggered, the daemon stopped for `RUN_S / 2`, then started again: the
    second daemon's result for it."""
    settings = fake_settings(tmp_path)
    first = spool_daemon(settings, clock=clock, api=aep, rng=random.Random(1))
    task = asyncio.create_task(first.run())
    async with asyncio.timeout(DEADLINE):
        await first.ready.wait()
    spool = spool_of(first)
    job = {"id": "resumed", "dataset_id": "d1", "destination": "lake", "path": "ml/x", **changes}
    staged = tmp_path / "spool" / "job.json.tmp"
    staged.write_text(json.dumps(job))
    staged.rename(spool.dirs["incoming"] / "job.json")
    async with asyncio.timeout(DEADLINE):
        await aep.triggered.wait()
    first.stop()  # a restart: the job stays journaled as running
    async with asyncio.timeout(DEADLINE):
        assert await task == EXIT_OK
    await clock.advance(RUN_S / 2)  # the daemon is down for a while

    second = spool_daemon(settings, clock=clock, api=aep, rng=random.Random(2))
    task = asyncio.create_task(second.run())
    async with asyncio.timeout(DEADLINE), second.filed:
        await second.filed.wait_for(lambda: second.counts.filed >= 1)
    second.stop()
    async with asyncio.timeout(DEADLINE):
        assert await task == EXIT_OK
    [filed] = spool.root.glob(f"*/job.json{RESULT_SUFFIX}")  # done/ or failed/
    done = json.loads(filed.read_text())
    assert isinstance(done, dict)
    return done


async def test_a_resumed_job_counts_its_duration_from_its_first_start(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=True)
    aep = SignallingAep(clock)
    dropped = clock.time()
    result = await resumed_outcome(tmp_path, clock, aep)
    assert result["state"] == "succeeded"
    assert len(aep.runs) == 1
    assert result["duration_s"] >= RUN_S  # from the job's start, before its run's; not the resume
    assert result["duration_s"] <= clock.time() - dropped


async def test_a_resumed_job_times_out_by_its_first_start(tmp_path: Path) -> None:
    """The run takes `RUN_S`; the job allows three quarters of it. Counted from the resume
    (at least half of it after the trigger), the run would end in time; counted from the first
    start, it does not."""
    clock = FakeClock(auto_advance=True)
    aep = SignallingAep(clock)
    result = await resumed_outcome(tmp_path, clock, aep, timeout=RUN_S * 0.75)
    assert result["state"] == "timed_out", result
    assert "deadline passed" in result["message"]
    assert len(aep.runs) == 1
    assert result["duration_s"] >= RUN_S * 0.75
