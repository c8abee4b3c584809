"""APScheduler 3's AsyncIOScheduler on the daemon's `Clock`, handing out the slot times.

APScheduler reads `datetime.now()` and sleeps on the event loop's timer, and calls a job's
function without the run times that fell due. `ClockedScheduler` reads and sleeps on the
injected clock instead (so a fake clock drives it in tests), and `SlotExecutor` (an
executor's documented extension point, `_do_submit_job`) calls the function with them:
`func(*args, slots=(...))`. Misfire and coalescing are left to that function.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_RUNNING, STATE_STOPPED, TIMEOUT_MAX, BaseScheduler

from exporter.clock import Clock

log = structlog.get_logger("exporter.sources.scheduler")


class SlotExecutor(BaseExecutor):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """Calls a schedule's coroutine with the slot times that fell due, as a task."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: set[asyncio.Task[None]] = set()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        task = asyncio.get_running_loop().create_task(
            job.func(*job.args, slots=tuple(run_times)), name=f"schedule:{job.id}"
        )
        self.tasks.add(task)
        task.add_done_callback(partial(self._finished, job.id))

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("schedule_fire_failed", schedule=job_id, error=repr(error), exc_info=error)
        self._run_job_success(job_id, [])  # counts the instance down

    async def drain(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class ClockedScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """AsyncIOScheduler reading `clock` for the time and sleeping on it between wake-ups."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.executor = SlotExecutor()
        self._timer: asyncio.Task[None] | None = None
        super().__init__(timezone=UTC, executors={"default": self.executor})

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)

    def _start_timer(self, wait_seconds: float | None) -> None:
        self._stop_timer()
        if wait_seconds is not None:
            self._timer = asyncio.get_running_loop().create_task(
                self._sleep(wait_seconds), name="scheduler-timer"
            )

    async def _sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        self.wakeup()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _process_jobs(self) -> float | None:
        """BaseScheduler._process_jobs (APScheduler 3.11), with `now` from the clock."""
        if self.state != STATE_RUNNING:  # paused, or stopped with a wake-up still queued
            return None
        now = self.now()
        wake: datetime | None = None
        with self._jobstores_lock:
            for alias, store in self._jobstores.items():
                for job in store.get_due_jobs(now):
                    run_times = job._get_run_times(now)
                    if not run_times:
                        continue
                    try:
                        self._lookup_executor(job.executor).submit_job(job, run_times)
                    except Exception:  # the other schedules, and this one's next slot, go on
                        log.exception("schedule_submit_failed", schedule=job.id)
                    nxt = job.trigger.get_next_fire_time(run_times[-1], now)
                    if nxt is not None:
                        job._modify(next_run_time=nxt)
                        store.update_job(job)
                    else:
                        self.remove_job(job.id, alias)
                due = store.get_next_run_time()
                if due is not None and (wake is None or due < wake):
                    wake = due
        if wake is None:
            return None
        return float(min(max(wake.timestamp() - self.clock.time(), 0.0), TIMEOUT_MAX))

    async def aclose(self) -> None:
        """Stop at once (AsyncIOScheduler.shutdown only asks the loop to, later)."""
        if self.state != STATE_STOPPED:
            BaseScheduler.shutdown(self, wait=False)
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        await self.executor.drain()
