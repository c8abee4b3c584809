"""Lanes: the manager jobs use — membership, holding, schedule and state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import structlog

from exporter.aep.api import FlowInfo
from exporter.engine.lanes.identity import (
    LaneFlow,
    desired_schedule,
    schedule_matches,
)
from exporter.engine.lanes.membership import LaneMembership
from exporter.errors import (
    NotFoundError,
    PreconditionFailed,
)
from exporter.jobs import Job

log = structlog.get_logger("exporter.lanes")


class LaneManager(LaneMembership):
    """The lanes of one org and sandbox: finding, joining, budget, renewal, retirement."""

    # ---- the job's view ---------------------------------------------------------------

    async def member(self, job: Job) -> tuple[LaneFlow, int]:
        """The flow of the job's lane that exports its dataset, and when the dataset joined
        it (ms, AEP's clock as far as known). Joins, makes the lane, moves the dataset out of
        its other lanes for the same place, renews the schedule and enables the flow as
        needed. Raises `LaneBudgetExhausted` when no flow can be had."""
        key = self.key(job)
        lane = await self._lane(key)
        flow = lane.member(job.dataset_id)
        if flow is None:
            fut = lane.pending.joins.get(job.dataset_id)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                lane.pending.joins[job.dataset_id] = fut
                self._kick(lane)
            flow = await asyncio.shield(fut)
            await self._leave_others(key, job.dataset_id)
        flow.last_used = self._clock.monotonic()
        await self._reconcile(flow)
        return flow, flow.members.get(job.dataset_id, flow.created_at_ms)

    @contextlib.contextmanager
    def holding(self, flow: LaneFlow) -> Iterator[None]:
        """While a job uses the flow, its lane is not idle."""
        flow.in_use += 1
        try:
            yield
        finally:
            flow.in_use -= 1
            flow.last_used = self._clock.monotonic()
            if flow.in_use == 0:
                self._freed.set()

    def forget_member(self, flow: LaneFlow, dataset_id: str) -> None:
        """AEP says the dataset is not part of the flow (another hand changed it)."""
        flow.members.pop(dataset_id, None)

    async def park_if_idle(self, flow: LaneFlow) -> bool:
        """`after_run=disable` on a lane: disable the flow only when nothing else uses it —
        no job here, no change pending, and in AEP no run in progress. The next job that
        needs it enables it again."""
        lane = self._lanes.get(flow.key.fingerprint)
        if flow.in_use or (lane is not None and lane.busy) or flow.state == "disabled":
            return False
        now_ms = int(self._clock.time() * 1000)
        if await self._api.flow_busy(flow.id, now_ms):
            return False
        if flow.in_use:  # a job came in while AEP was asked
            return False
        flow.etag = await self._api.flow_action(flow.id, "disable")
        flow.state = "disabled"
        log.info("lane_parked", flow_id=flow.id, lane=flow.key.fingerprint)
        return True

    # ---- schedule and state -------------------------------------------------------------

    async def _reconcile(self, flow: LaneFlow) -> None:
        """The lane's schedule and state as its mode wants them; jobs arriving together wait
        for one fix instead of each sending its own."""

        def fine() -> bool:
            now_s = int(self._clock.time())
            ok = schedule_matches(flow.schedule, flow.key.mode, now_s, self._config)
            return ok and flow.state == "enabled"

        if fine():
            return
        async with flow.guard:
            now_s = int(self._clock.time())
            if not schedule_matches(flow.schedule, flow.key.mode, now_s, self._config):
                await self.set_schedule(flow, desired_schedule(flow.key.mode, now_s, self._config))
            if flow.state != "enabled":
                flow.etag = await self._api.flow_action(flow.id, "enable")
                flow.state = "enabled"
                log.info("flow_enabled", flow_id=flow.id)

    async def set_schedule(self, flow: LaneFlow, schedule: dict[str, Any]) -> None:
        """Replace the whole `scheduleParams` under `If-Match`, re-reading on a stale etag."""

        async def attempt() -> None:
            item = await self._api.get("flows", flow.id)
            if item is None:
                raise NotFoundError(f"flow {flow.id} disappeared", status=404)
            info = FlowInfo.parse(item)
            keep = {
                k: v
                for k, v in info.schedule.items()
                if k in ("foldernameTemplate", "folderNameTemplate")
            }
            full = keep | schedule
            flow.etag = await self._api.patch_flow(
                flow.id,
                info.etag,
                [{"op": "replace", "path": "/scheduleParams", "value": full}],
            )
            flow.schedule = full
            flow.state = info.state
            log.info("lane_schedule_set", flow_id=flow.id, schedule=full)

        await self._on_conflict(
            flow, attempt, retryable=lambda exc: isinstance(exc, PreconditionFailed)
        )

    async def renew(self) -> int:
        """Move forward the schedule of every lane flow close to its end (or, one-off, to its
        parked start); returns how many were renewed."""
        await self.refresh()
        now_s = int(self._clock.time())
        renewed = 0
        for name, item in list(self._known.items()):
            found = self._known_lane(name, item)
            if found is None:
                continue
            key, shard = found
            info = FlowInfo.parse(item)
            if schedule_matches(info.schedule, key.mode, now_s, self._config):
                continue
            lane = await self._lane(key)
            flow = lane.flows.get(shard)
            if flow is None:
                continue
            await self.set_schedule(flow, desired_schedule(key.mode, now_s, self._config))
            renewed += 1
        return renewed

    async def aclose(self) -> None:
        workers = [lane.worker for lane in self._lanes.values() if lane.worker is not None]
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
