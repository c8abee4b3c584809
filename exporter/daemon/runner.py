"""The jobs in flight: admitted, journaled state by state, settled with their source.

`JobRunner` is the daemon's `Admissions`: one task per job (`job:<id>`) from admission to
its settled outcome. A job's task may end cancelled (a stop) but never with an error: that
is a bug that lost a job, reported through `on_died` so the daemon stops.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, TypeVar

import structlog

from exporter.clock import Clock
from exporter.daemon.admission import Admission, Admitted, Counts, Fencing, Origin
from exporter.daemon.journal import JobRecord, Journal
from exporter.daemon.storage import Faults, persist
from exporter.engine.engine import Engine, Progress
from exporter.errors import ConfigError
from exporter.jobs import TERMINAL, Job, JobState, Outcome
from exporter.metrics import Metrics
from exporter.settings import Settings

T = TypeVar("T")
log = structlog.get_logger("exporter.daemon")
# Jobs a schedule fired (`exporter.sources.schedules.SOURCE`, not imported: it loads
# APScheduler); their origin's name is the schedule's.
SCHEDULE_SOURCE = "schedule"

STOP_WAIT_S = 10.0  # how long cancel() and abandon() wait for the job's task to end


class JobRunner:
    """Admits jobs and runs each on the engine (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        clock: Clock,
        metrics: Metrics,
        faults: Faults,
        rng: random.Random,
        stopping: asyncio.Event,
        ready: asyncio.Event,
        on_died: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.metrics = metrics
        self.faults = faults
        self.rng = rng
        self.ready = ready
        self._journal: Journal | None = None
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.counts = Counts()
        self.filed = asyncio.Condition()
        self.on_finished: list[Callable[[Outcome], None]] = []
        """Called after each outcome is journaled and settled (metrics, notifications)."""
        self._stopping = stopping
        self._on_died = on_died
        self._room = asyncio.Event()  # set whenever a job leaves
        self._wakes: list[asyncio.Event] = []
        self._cancelled: dict[str, str] = {}
        self._first_started: dict[str, float] = {}  # resumed jobs: their journal's `created`
        self.settling: set[asyncio.Future[None]] = set()
        """Outcomes being written: a stop lets them finish (within its grace)."""

    @property
    def journal(self) -> Journal:
        assert self._journal is not None, "the journal opens before any service starts"
        return self._journal

    @journal.setter
    def journal(self, journal: Journal) -> None:
        self._journal = journal

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def running(self) -> Collection[str]:
        return self.jobs.keys()

    @property
    def room(self) -> int:
        """How many more jobs may start now (`max_in_flight` minus those in flight)."""
        return self.settings.daemon.max_in_flight - len(self.jobs)

    async def wait_room(self) -> None:
        """Until at least one more job may start."""
        while self.room <= 0:
            self._room.clear()
            await self._room.wait()

    def on_room(self, wake: asyncio.Event) -> None:
        self._wakes.append(wake)

    async def wait_ended(self, job_ids: Iterable[str]) -> None:
        tasks = [self.jobs[j] for j in job_ids if j in self.jobs]
        if tasks:
            await asyncio.wait(tasks)

    async def persist(
        self,
        write: Callable[[], Awaitable[T]],
        operation: str,
        *,
        only_transient: bool = False,
        **context: object,
    ) -> T:
        """A local write (journal, result file, spool), retried with backoff while it fails."""
        return await persist(
            write,
            operation=operation,
            clock=self.clock,
            faults=self.faults,
            rng=self.rng,
            only_transient=only_transient,
            **context,
        )

    # -- admission, shared by every source -------------------------------------------------

    async def submit(self, job: Job, spec: dict[str, Any], origin: Origin) -> Admitted:
        """Journal a new job and start it; a known job id is not started again."""
        added = await self.journal.add(
            job.job_id, source=origin.source, name=origin.name, spec=spec
        )
        if not added:
            return Admitted(Admission.DUPLICATE, await self.journal.get(job.job_id))
        if not self.stopping:  # a stop began meanwhile: journaled, the next start resumes it
            self._start(job, origin, None)
        return Admitted(Admission.STARTED)

    def resume(self, record: JobRecord, origin: Origin) -> None:
        """Start an unfinished journaled job again from where it was."""
        if record.job_id in self.jobs:
            return
        job = Job.model_validate(record.spec)
        progress = Progress(
            record.state, flow_id=record.flow_id, run_id=record.run_id, intent_ms=record.intent_ms
        )
        log.info(
            "job_resumed",
            job_id=record.job_id,
            source=record.source,
            state=record.state.value,
            flow_id=record.flow_id,
            run_id=record.run_id,
        )
        self._first_started[record.job_id] = record.created
        self._start(job, origin, progress)

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Stop a job in flight: it ends `cancelled` with `reason`. False if not in flight."""
        task = self.jobs.get(job_id)
        if task is None or task.done():
            return False
        self._cancelled[job_id] = reason
        if self.engine.queries is not None:  # a cancelled job's query is cancelled in AEP too
            await self.engine.queries.cancel(job_id)
        task.cancel()
        # Its outcome is being written (shielded); callers that need it wait on `filed`.
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        return True

    async def abandon(self, job_id: str) -> None:
        """Stop working on a job without an outcome: another process took it over."""
        task = self.jobs.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_WAIT_S)

    async def reject(self, origin: Origin, reason: str) -> Outcome:
        """Journal and settle a job that will not run: bad input, a duplicate id."""
        outcome = Outcome(job_id=f"rejected:{origin.name}", state=JobState.REJECTED, message=reason)
        log.warning("job_rejected", source=origin.source, name=origin.name, reason=reason)
        self.counts.rejected += 1
        self.metrics.job_finished(origin.source, JobState.REJECTED)
        journal = self.journal
        key = f"{outcome.job_id}:{uuid.uuid4().hex[:8]}"
        await self.persist(
            lambda: journal.add(
                key,
                source=origin.source,
                name=origin.name,
                spec={},
                state=JobState.REJECTED,
                outcome=outcome,
            ),
            "journal",
            name=origin.name,
        )
        await self.settle(origin, outcome)
        return outcome

    async def settle(self, origin: Origin, outcome: Outcome) -> None:
        """Tell `origin` a journaled outcome (retried while the disk is full)."""
        await self.persist(lambda: origin.settle(outcome), "result", job_id=outcome.job_id)
        self.counts.filed += 1
        for hook in self.on_finished:
            hook(outcome)
        async with self.filed:
            self.filed.notify_all()

    # -- jobs ------------------------------------------------------------------------------

    def _count_export(self, origin: Origin, outcome: Outcome, job: Job) -> None:
        """The export's bytes, records and files; its schedule's and lane's last success."""
        try:
            lane: str | None = self.engine.lanes.key(job).fingerprint
        except ConfigError:  # its destination was removed by a reload meanwhile
            lane = None
        self.metrics.exported(
            outcome,
            destination=job.destination,
            at=self.clock.time(),
            schedule=origin.name if origin.source == SCHEDULE_SOURCE else None,
            lane=lane,
        )

    def _start(self, job: Job, origin: Origin, resume: Progress | None) -> None:
        task = asyncio.create_task(self._work(job, origin, resume), name=f"job:{job.job_id}")
        self.jobs[job.job_id] = task
        self.metrics.job_moved(job.job_id, resume.state if resume else JobState.RECEIVED)
        task.add_done_callback(lambda _: self._done(job.job_id))
        task.add_done_callback(self._watch_job)

    def _watch_job(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("task_died", task=task.get_name(), error=repr(error), exc_info=error)
        self._on_died(task.get_name())

    def _done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.metrics.job_left(job_id)
        self._cancelled.pop(job_id, None)
        self._first_started.pop(job_id, None)
        for wake in self._wakes:
            wake.set()
        self._room.set()

    async def _work(self, job: Job, origin: Origin, resume: Progress | None) -> None:
        journal = self.journal

        async def on_state(progress: Progress) -> None:
            if progress.state in TERMINAL:
                return
            await self.persist(
                lambda: journal.advance(
                    job.job_id,
                    progress.state,
                    flow_id=progress.flow_id,
                    run_id=progress.run_id,
                    intent_ms=progress.intent_ms,
                    detail=progress.detail,
                ),
                "journal",
                job_id=job.job_id,
            )
            self.metrics.job_moved(job.job_id, progress.state)
            await origin.checkpoint(job.job_id, progress)

        try:
            fence = origin.fence if isinstance(origin, Fencing) else None
            outcome = await self.engine.run(
                job,
                on_state,
                resume=resume,
                fence=fence,
                first_started=self._first_started.get(job.job_id),
            )
        except asyncio.CancelledError:
            reason = self._cancelled.get(job.job_id)
            if reason is None:
                raise  # the daemon is stopping: the journal says where the job was
            record = await journal.get(job.job_id)
            outcome = Outcome(
                job_id=job.job_id,
                state=JobState.CANCELLED,
                message=reason,
                flow_id=record.flow_id if record else None,
                run_id=record.run_id if record else None,
            )
        except Exception as exc:  # a bug must end the job visibly, not leave it hanging
            log.exception("job_crashed", job_id=job.job_id)
            outcome = Outcome(
                job_id=job.job_id, state=JobState.FAILED, message=f"internal error: {exc!r}"
            )
        first = self._first_started.pop(job.job_id, None)
        if first is not None:  # a resumed job's duration counts from its first start
            duration = round(max(0.0, self.clock.time() - first), 3)
            outcome = outcome.model_copy(update={"duration_s": duration})
        # The outcome is written whole even if a stop arrives meanwhile.
        settling = asyncio.ensure_future(self._complete(origin, outcome, job))
        self.settling.add(settling)
        settling.add_done_callback(self.settling.discard)
        await asyncio.shield(settling)

    async def _complete(self, origin: Origin, outcome: Outcome, job: Job) -> None:
        journal = self.journal
        await self.persist(lambda: journal.finish(outcome), "journal", job_id=outcome.job_id)
        await self.settle(origin, outcome)
        self.counts.finished += 1
        self.metrics.job_finished(origin.source, outcome.state)
        self._count_export(origin, outcome, job)
        log.info(
            "job_finished",
            job_id=outcome.job_id,
            source=origin.source,
            state=outcome.state.value,
            flow_id=outcome.flow_id,
            run_id=outcome.run_id,
            files=outcome.files,
            records=outcome.records,
            bytes=outcome.bytes,
            duration_s=outcome.duration_s,
            partial=outcome.partial,
            message=outcome.message,
            errors=[e.model_dump() for e in outcome.errors],
            landing_uri=outcome.landing_uri,
            delivery=outcome.delivery.verdict if outcome.delivery else None,
            **_query_fields(outcome),
        )


def _query_fields(outcome: Outcome) -> dict[str, object]:
    """A query job's part of the canonical line (absent for other jobs: their line is as
    before)."""
    if outcome.query_id is None and outcome.dataset_id is None:
        return {}
    return {
        "query_id": outcome.query_id,
        "query_rows": outcome.query_rows,
        "query_duration_s": outcome.query_duration_s,
        "dataset_id": outcome.dataset_id,
    }
