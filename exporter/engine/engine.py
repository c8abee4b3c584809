"""The export engine: one job from "export dataset D to X as F" to its outcome.

    received ─► flow_ready ─► triggering ─► running ─► succeeded | failed | timed_out
                                                      └► delivery_mismatch (verify, opt-in)
        └─► querying ─┘  (a job with a query: engine/query.py)

`flow_ready`: the dataset is a member of its lane's flow (lanes/). `triggering`: the mark
that tells the job's run from older ones is journaled before the ad hoc call goes out (or, for
a scheduled job, before waiting for the schedule's run). `running`: the run id is journaled
before polling. Each step tells `on_state` before the action it enables.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from exporter.aep.api import AepApi, RunInfo
from exporter.aep.queries import QueryApi
from exporter.clock import Clock
from exporter.delivery.deliver import Deliverer, LandingZoneApi
from exporter.destinations import Destination, unknown_destination
from exporter.engine.config import EngineConfig
from exporter.engine.lanes import LaneFlow, LaneManager
from exporter.engine.poller import RunPoller, RunTimedOut, StatusUnreadable
from exporter.engine.query import QueryDone, QueryFailed, QueryStep, has_queries
from exporter.engine.trigger import Fence, Triggerer
from exporter.errors import AepError, AuthError, ConfigError, NotAMember, TransportError
from exporter.jobs import Job, JobState, Outcome, RunError
from exporter.metrics import Metrics

log = structlog.get_logger("exporter.engine")
SLOT_GRACE_S = 1800.0  # after a slot, look for its run with backoff this long


@dataclass(frozen=True, slots=True)
class Progress:
    """What `on_state` hears: the new state and what is known at that point."""

    state: JobState
    flow_id: str | None = None
    run_id: str | None = None
    intent_ms: int | None = None
    detail: str = ""
    ready_at: float | None = None
    """With `flow_ready`: when AEP's "not ready" window for the dataset closes (epoch
    seconds), as the trigger reckons it; the `export` command counts it down."""


OnState = Callable[[Progress], Awaitable[None]]


async def _ignore(_: Progress) -> None:
    return None


class Engine:
    """Runs jobs concurrently against one AEP org and sandbox. Start it, run jobs, stop it."""

    def __init__(
        self,
        api: AepApi,
        destinations: Mapping[str, Destination],
        config: EngineConfig,
        *,
        org_id: str,
        sandbox: str,
        clock: Clock,
        identity_key: bytes = b"",
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        queries: QueryApi | None = None,
    ) -> None:
        """`identity_key` keys the hash that tells destinations apart by their credentials
        (the AEP client secret: the same for every daemon of the org, unknown to AEP's
        readers). `rng` draws every jitter of the engine's pieces (lanes, trigger, poller):
        the caller's, so a seeded one makes them repeatable; one is made only if none is
        given. `queries` runs the Data Distiller query of jobs that have one (default: `api`
        itself, when it has Query Service's verbs)."""
        self.api = api
        self.config = config
        self.clock = clock
        self.rng = rng = rng or random.Random()
        self.lanes = LaneManager(
            api,
            destinations,
            config,
            org_id=org_id,
            sandbox=sandbox,
            clock=clock,
            identity_key=identity_key,
            rng=rng,
        )
        if metrics is not None:  # the flow budget, counted as lanes make flows
            self.lanes.metrics = metrics
            metrics.destination_flows_limit.set(config.max_flows)
        self.triggerer = Triggerer(api, config, clock, rng, metrics=metrics)
        self.poller = RunPoller(api, config, clock, rng, metrics=metrics)
        query_api = queries if queries is not None else has_queries(api)
        self.queries = QueryStep(query_api, config, clock, rng) if query_api is not None else None
        self._poller_task: asyncio.Task[None] | None = None
        self._renewal_task: asyncio.Task[None] | None = None
        self._destinations = destinations
        self.delivery = Deliverer(
            clock,
            rng,
            dlz_credentials=api.landing_zone_credentials
            if isinstance(api, LandingZoneApi)
            else None,
        )

    async def __aenter__(self) -> Engine:
        """For one-shot use: no renewal task (the daemon calls `start()`)."""
        self.start(renew=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self, *, renew: bool = True) -> None:
        if self._poller_task is None:
            self._poller_task = asyncio.create_task(self.poller.run(), name="run-poller")
        if renew and self._renewal_task is None:
            self._renewal_task = asyncio.create_task(self._renewals(), name="lane-renewal")

    def use_destinations(self, destinations: Mapping[str, Destination]) -> None:
        """Jobs that start from now on see these destinations (a reload); jobs under way
        still find the ones they started with."""
        self._destinations = destinations
        self.lanes.add_destinations(destinations)

    @property
    def poller_task(self) -> asyncio.Task[None] | None:
        return self._poller_task

    async def stop(self) -> None:
        tasks = [t for t in (self._poller_task, self._renewal_task) if t is not None]
        self._poller_task = self._renewal_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.triggerer.aclose()
        await self.lanes.aclose()
        await self.delivery.aclose()

    async def _renewals(self) -> None:
        """Keep every lane's schedule from running out (AEP stops a flow silently at its
        `endTime`), and delete source connections a cut-short change left behind."""
        while True:
            try:
                await self.lanes.renew()
                await self.lanes.delete_orphans()
            except AepError as exc:
                log.warning("lane_renewal_failed", error=str(exc))
            await self._nap(self.config.renew_every_s)

    async def _nap(self, seconds: float) -> None:
        """Sleep in steps no longer than the poller's: a test clock that jumps to the next
        sleeper never leaps over the jobs' deadlines because of a six-hour timer."""
        until = self.clock.monotonic() + seconds
        while (left := until - self.clock.monotonic()) > 0:
            await self.clock.sleep(min(left, self.config.poll_max_s))

    async def run(
        self,
        job: Job,
        on_state: OnState = _ignore,
        *,
        resume: Progress | None = None,
        wait: bool = True,
        fence: Fence | None = None,
        first_started: float | None = None,
    ) -> Outcome:
        """Take `job` to a terminal outcome. With `resume`, continue from a journaled state:
        `triggering` first adopts a run of the dataset created after the journaled mark,
        `running` polls. With `wait=False`, return as soon as the run is known. `fence` is
        asked right before each ad hoc call that would start the job's run; what it raises
        (it must not send), `run` raises. `first_started` (epoch seconds) is a resumed job's
        first start: its timeout counts from then, not from the resume (a daemon restarting
        again and again would otherwise keep a job forever), with at least `poll_max_s` left
        so that a run that ended meanwhile is read and reported, not timed out unread."""
        started = self.clock.monotonic()
        budget = job.timeout
        if first_started is not None:
            spent = max(0.0, self.clock.time() - first_started)
            budget = max(job.timeout - spent, min(job.timeout, self.config.poll_max_s))
        deadline = started + budget
        bound = structlog.contextvars.bound_contextvars(
            job_id=job.job_id,
            flow_id=resume.flow_id if resume else None,
            run_id=resume.run_id if resume else None,
        )
        with bound:
            return await self._run(job, on_state, resume, started, deadline, wait, fence)

    async def _run(
        self,
        job: Job,
        on_state: OnState,
        resume: Progress | None,
        started: float,
        deadline: float,
        wait: bool,
        fence: Fence | None,
    ) -> Outcome:
        if job.destination not in self._destinations:
            message = unknown_destination(job.destination, self._destinations)
            await on_state(Progress(JobState.REJECTED, detail=message))
            return self._outcome(job, JobState.REJECTED, started, message=message)
        done: QueryDone | None = None
        if job.has_query:
            try:
                done = await self._query(job, on_state, resume, deadline)
            except QueryFailed as exc:
                await on_state(Progress(exc.state, detail=exc.message))
                return self._outcome(
                    job,
                    exc.state,
                    started,
                    message=exc.message,
                    query_id=exc.query_id,
                    errors=tuple(RunError(code=c, message=m) for c, m in exc.errors),
                )
            job = job.model_copy(update={"dataset_id": done.dataset_id, "id": job.job_id})
        outcome = await self._export(job, on_state, resume, started, deadline, wait, fence)
        if done is None:
            return outcome
        return outcome.model_copy(
            update={
                "query_id": done.query_id,
                "query_rows": done.rows,
                "query_duration_s": done.duration_s,
                "dataset_id": done.dataset_id,
            }
        )

    async def _query(
        self, job: Job, on_state: OnState, resume: Progress | None, deadline: float
    ) -> QueryDone:
        if self.queries is None:
            raise QueryFailed(
                JobState.REJECTED, "this exporter has no Query Service client for the job's query"
            )

        async def on_querying(mark_ms: int) -> None:
            await on_state(Progress(JobState.QUERYING, intent_ms=mark_ms))

        return await self.queries.run(
            job,
            on_querying,
            resume_state=resume.state if resume else None,
            resume_mark_ms=resume.intent_ms if resume else None,
            deadline=deadline,
        )

    async def _export(
        self,
        job: Job,
        on_state: OnState,
        resume: Progress | None,
        started: float,
        deadline: float,
        wait: bool,
        fence: Fence | None,
    ) -> Outcome:
        destination = self._destinations[job.destination]
        flow_id = resume.flow_id if resume else None
        run_id = resume.run_id if resume and resume.state == JobState.RUNNING else None
        flow: LaneFlow | None = None
        try:
            if run_id is None:
                for attempt in (1, 2):
                    flow, joined_ms = await self.lanes.member(job)
                    flow_id = flow.id
                    structlog.contextvars.bind_contextvars(flow_id=flow_id)
                    try:
                        with self.lanes.holding(flow):
                            run_id = await self._start(
                                job, flow, joined_ms, on_state, resume, deadline, fence
                            )
                        break
                    except NotAMember:
                        if attempt == 2:
                            raise
                        self.lanes.forget_member(flow, job.dataset_id)
                        resume = None
                assert run_id is not None
                structlog.contextvars.bind_contextvars(run_id=run_id)
                await on_state(Progress(JobState.RUNNING, flow_id=flow_id, run_id=run_id))
            if not wait:
                return self._outcome(
                    job,
                    JobState.RUNNING,
                    started,
                    flow_id=flow_id,
                    run_id=run_id,
                    message="triggered; not waiting",
                )
            if flow is not None:
                with self.lanes.holding(flow):
                    run = await self.poller.wait(run_id, deadline=deadline)
            else:
                run = await self.poller.wait(run_id, deadline=deadline)
        except RunTimedOut as exc:
            return self._outcome(
                job, JobState.TIMED_OUT, started, message=str(exc), flow_id=flow_id, run_id=run_id
            )
        except StatusUnreadable as exc:
            return self._outcome(
                job, JobState.FAILED, started, message=str(exc), flow_id=flow_id, run_id=run_id
            )
        except ConfigError as exc:
            return self._outcome(job, JobState.REJECTED, started, message=str(exc), flow_id=flow_id)
        except AepError as exc:
            return self._outcome(
                job,
                JobState.FAILED,
                started,
                message=str(exc),
                flow_id=flow_id,
                run_id=run_id,
                errors=(RunError(code=error_code(exc), message=exc.message),),
                cause=cause_of(exc),
            )
        outcome = self._from_run(job, run, started)
        if run.succeeded and job.after == "disable" and flow is not None:
            await self._after_run(flow)
        if run.succeeded:
            outcome = await self.delivery.deliver(
                destination, job, run, outcome, schedule=flow.schedule if flow else None
            )
            outcome = outcome.model_copy(
                update={"duration_s": round(self.clock.monotonic() - started, 3)}
            )
        return outcome

    async def _start(
        self,
        job: Job,
        flow: LaneFlow,
        joined_ms: int,
        on_state: OnState,
        resume: Progress | None,
        deadline: float,
        fence: Fence | None = None,
    ) -> str:
        """The run that exports the job's dataset: adopted, triggered or scheduled."""
        window = self.config.not_ready_wait_s
        ready_at = min(joined_ms / 1000 + window, self.clock.time() + window)
        await on_state(Progress(JobState.FLOW_READY, flow_id=flow.id, ready_at=ready_at))
        if (
            resume is not None
            and resume.state == JobState.TRIGGERING
            and resume.flow_id is not None
            and resume.intent_ms is not None
        ):
            # The flow the call went to, even if the lane now resolves to another (a lane two
            # daemons made at once is merged into the older flow).
            adopted = await self.triggerer.adopt(resume.flow_id, job.dataset_id, resume.intent_ms)
            if adopted is not None:
                return adopted
            if not job.trigger_now and resume.flow_id == flow.id:
                return await self._scheduled(job, flow, resume.intent_ms, deadline)

        async def before_send(mark_ms: int) -> None:
            await on_state(Progress(JobState.TRIGGERING, flow_id=flow.id, intent_ms=mark_ms))

        if not job.trigger_now:
            mark = await self.triggerer.mark(flow.id)
            await before_send(mark)
            return await self._scheduled(job, flow, mark, deadline)
        return await self.triggerer.trigger(
            flow.info(),
            job.dataset_id,
            joined_ms=joined_ms,
            deadline=deadline,
            before_send=before_send,
            fence=fence,
        )

    async def _scheduled(self, job: Job, flow: LaneFlow, mark_ms: int, deadline: float) -> str:
        """A scheduled job reports the first run of its dataset that the lane's schedule
        starts after the mark (its first, full export): looked for just after each slot."""
        delay = self.config.poll_min_s
        while True:
            adopted = await self.triggerer.adopt(flow.id, job.dataset_id, mark_ms)
            if adopted is not None:
                return adopted
            now = self.clock.time()
            slot, previous = _slots(flow.schedule, now)
            if previous is not None and now - previous < SLOT_GRACE_S:
                pause, delay = delay, min(delay * 2, self.config.poll_max_s)  # AEP is late
            elif slot is not None:
                pause, delay = slot - now + self.config.poll_min_s, self.config.poll_min_s
            else:
                raise RunTimedOut(f"the lane's schedule has no slot left after {int(now)}")
            left = deadline - self.clock.monotonic()
            if pause >= left:
                await self.clock.sleep(max(0.0, left))
                raise RunTimedOut(
                    f"the lane's schedule started no run of dataset {job.dataset_id} before "
                    "the job's deadline"
                )
            await self._nap(pause)

    async def _after_run(self, flow: LaneFlow) -> None:
        """`after_run=disable` on a lane: the flow is disabled once nothing else uses it (no
        job here, none waiting to join, no run in progress in AEP); other jobs' lanes are
        never disabled under them, and the next job enables it again."""
        try:
            await self.lanes.park_if_idle(flow)
        except AepError as exc:
            log.warning("flow_disable_failed", flow_id=flow.id, error=str(exc))

    def _from_run(self, job: Job, run: RunInfo, started: float) -> Outcome:
        errors = tuple(RunError(code=c, message=m) for c, m in run.errors)
        state = JobState.SUCCEEDED if run.succeeded else JobState.FAILED
        message = (
            "succeeded with warnings"
            if run.succeeded and errors
            else ""
            if run.succeeded
            else "the run failed in AEP"
        )
        return self._outcome(
            job,
            state,
            started,
            flow_id=run.flow_id,
            run_id=run.id,
            files=run.output_files,
            records=run.output_records,
            bytes=run.output_bytes,
            partial=run.succeeded and bool(errors),
            errors=errors,
            message=message,
        )

    def _outcome(self, job: Job, state: JobState, started: float, **fields: Any) -> Outcome:
        duration = round(self.clock.monotonic() - started, 3)
        return Outcome(job_id=job.job_id, state=state, duration_s=duration, **fields)


def error_code(exc: AepError) -> str:
    """AEP's code, else the HTTP status, else the kind of failure (never empty)."""
    return exc.code or str(exc.status or "") or type(exc).__name__


def cause_of(exc: AepError) -> Literal["aep", "auth", "unreachable"]:
    """What an error says about why a job failed, for the `export` command's exit code."""
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, TransportError):
        return "unreachable"
    return "aep"


def _slots(schedule: Mapping[str, Any], now: float) -> tuple[float | None, float | None]:
    """The next slot of a daily or hourly schedule after `now` and the last one at or before
    it (epoch seconds; None where there is none)."""
    unit = str(schedule.get("timeUnit", "")).lower()
    try:
        interval = int(schedule.get("interval", 0))
        start = int(schedule.get("startTime", 0))
        end = int(schedule.get("endTime", 2**62))
    except (TypeError, ValueError):
        return None, None
    step = interval * (3600 if unit == "hour" else 86400 if unit == "day" else 0)
    if step <= 0:
        return None, None
    if now < start:
        return (float(start) if start < end else None), None
    last = start + int((now - start) // step) * step
    nxt = last + step
    return (float(nxt) if nxt < end else None), (float(last) if last < end else None)
