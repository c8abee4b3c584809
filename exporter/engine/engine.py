"""The export engine: one job from "export dataset D to X as F" to its outcome.

    received ─► flow_ready ─► triggering ─► running ─► succeeded | failed | timed_out

Each step tells `on_state` before the action it enables (the daemon journals there):
the trigger intent before the trigger, the run id as soon as it is known, before polling.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.aepclient.api import AepApi, FlowInfo, RunInfo
from exporter.clock import Clock
from exporter.destinations import Destination
from exporter.engine.config import EngineConfig
from exporter.engine.flows import FlowManager, desired_schedule, schedule_matches
from exporter.engine.poller import RunPoller, RunTimedOut, StatusUnreadable
from exporter.engine.trigger import Triggerer
from exporter.errors import AepError, ConfigError, NotFoundError
from exporter.jobs import Job, JobState, Outcome, RunError
from exporter.metrics import Metrics

log = structlog.get_logger("exporter.engine")


@dataclass(frozen=True, slots=True)
class Progress:
    """What `on_state` hears: the new state and what is known at that point."""

    state: JobState
    flow_id: str | None = None
    run_id: str | None = None
    intent_ms: int | None = None
    detail: str = ""


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
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.clock = clock
        rng = rng or random.Random()
        self.flows = FlowManager(
            api, destinations, config, org_id=org_id, sandbox=sandbox, clock=clock
        )
        self.triggerer = Triggerer(api, config, clock, rng, metrics=metrics)
        self.poller = RunPoller(api, config, clock, rng, metrics=metrics)
        self._poller_task: asyncio.Task[None] | None = None
        self._destinations = destinations

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._poller_task is None:
            self._poller_task = asyncio.create_task(self.poller.run(), name="run-poller")

    def use_destinations(self, destinations: Mapping[str, Destination]) -> None:
        """Jobs that start from now on see these destinations (a reload); jobs under way
        still find the ones they started with."""
        self._destinations = destinations
        self.flows.add_destinations(destinations)

    @property
    def poller_task(self) -> asyncio.Task[None] | None:
        return self._poller_task

    async def stop(self) -> None:
        task, self._poller_task = self._poller_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.flows.aclose()

    async def run(
        self,
        job: Job,
        on_state: OnState = _ignore,
        *,
        resume: Progress | None = None,
        wait: bool = True,
    ) -> Outcome:
        """Take `job` to a terminal outcome. With `resume`, continue from a journaled state:
        `triggering` first looks for a run started since the intent, `running` polls. With
        `wait=False`, return as soon as the run is triggered (state `running`)."""
        started = self.clock.monotonic()
        deadline = started + job.timeout
        bound = structlog.contextvars.bound_contextvars(
            job_id=job.job_id,
            flow_id=resume.flow_id if resume else None,
            run_id=resume.run_id if resume else None,
        )
        with bound:
            return await self._run(job, on_state, resume, started, deadline, wait)

    async def _run(
        self,
        job: Job,
        on_state: OnState,
        resume: Progress | None,
        started: float,
        deadline: float,
        wait: bool,
    ) -> Outcome:
        if job.destination not in self._destinations:
            message = (
                f"unknown destination {job.destination!r}; configured: "
                f"{', '.join(sorted(self._destinations)) or 'none'}"
            )
            await on_state(Progress(JobState.REJECTED, detail=message))
            return self._outcome(job, JobState.REJECTED, started, message=message)
        flow_id = resume.flow_id if resume else None
        run_id = resume.run_id if resume and resume.state == JobState.RUNNING else None
        try:
            if run_id is None:
                flow = await self.flows.ensure(job)
                flow_id = flow.id
                structlog.contextvars.bind_contextvars(flow_id=flow_id)
                await on_state(Progress(JobState.FLOW_READY, flow_id=flow.id))
                intent_ms = (
                    resume.intent_ms
                    if resume and resume.state == JobState.TRIGGERING and resume.intent_ms
                    else int(self.clock.time() * 1000)
                )
                await on_state(Progress(JobState.TRIGGERING, flow_id=flow.id, intent_ms=intent_ms))
                if resume is not None and resume.state == JobState.TRIGGERING:
                    run_id = await self.triggerer.adopt(flow.id, intent_ms)
                if run_id is None:
                    run_id = await self.triggerer.trigger(
                        flow, job.dataset_id, intent_ms=intent_ms, deadline=deadline
                    )
                structlog.contextvars.bind_contextvars(run_id=run_id)
                await on_state(Progress(JobState.RUNNING, flow_id=flow.id, run_id=run_id))
            if not wait:
                return self._outcome(
                    job,
                    JobState.RUNNING,
                    started,
                    flow_id=flow_id,
                    run_id=run_id,
                    message="triggered; not waiting",
                )
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
                errors=(RunError(code=exc.code or str(exc.status or ""), message=exc.message),),
            )
        outcome = self._from_run(job, run, started)
        if run.succeeded and job.after == "disable" and flow_id is not None:
            await self._after_run(flow_id)
        return outcome

    async def _after_run(self, flow_id: str) -> None:
        """The seed's life cycle: a one-off flow is parked, schedule far out, disabled. What is
        already so is left alone: jobs that shared a run would otherwise race each other's
        etags (one flow, 200 jobs: a thousand 412s) for a change that is already made."""
        try:
            item = await self.api.get("flows", flow_id)
            if item is None:
                raise NotFoundError(f"flow {flow_id} is gone", status=404, operation="flows.get")
            flow = FlowInfo.parse(item)
            now_s = int(self.clock.time())
            if not schedule_matches(flow.schedule, "once", now_s, self.config):
                await self.flows.set_schedule(flow_id, desired_schedule("once", now_s, self.config))
            if flow.state != "disabled":
                await self.api.flow_action(flow_id, "disable")
                log.info("flow_disabled", flow_id=flow_id)
        except NotFoundError:
            log.warning("flow_gone_after_run", flow_id=flow_id)
        except AepError as exc:
            if "cannot be applied on the current state disabled" not in exc.message:
                log.warning("flow_disable_failed", flow_id=flow_id, error=str(exc))

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
