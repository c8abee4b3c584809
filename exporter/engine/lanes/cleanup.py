"""Lanes: the flow budget, retiring idle lanes, orphans and `lanes prune`."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

from exporter.clock import sleep_or_wake
from exporter.engine.lanes.identity import (
    LANE_PREFIX,
    Lane,
    LaneFlow,
    LaneKey,
    LaneView,
)
from exporter.engine.lanes.listing import LaneBase
from exporter.errors import (
    LaneBudgetExhausted,
    NotFoundError,
)

log = structlog.get_logger("exporter.lanes")


class LaneCleanup(LaneBase):
    """Making room in the sandbox: retiring idle lanes, tidying what changes left."""

    async def _make_room(self) -> None:
        """Return once the sandbox has room for one more flow; retire an idle lane if needed;
        wait for one, bounded; else raise `LaneBudgetExhausted`."""
        limit = self._config.max_flows
        waited_until = self._clock.monotonic() + self._config.budget_wait_s
        while True:
            count = await self._api.count_destination_flows()
            if self.metrics is not None:
                self.metrics.flow_budget(count, limit)
            if count < limit:
                return
            if await self._retire_one():
                continue
            left = waited_until - self._clock.monotonic()
            if left <= 0:
                raise LaneBudgetExhausted(
                    f"no room for another export flow: the sandbox holds {count} destination "
                    f"dataflows and the limit is max_flows={limit} (AEP allows at most 100 "
                    "destination dataflows per sandbox) and no lane has been idle for "
                    f"lane_idle_s={self._config.lane_idle_s:g} s; waited "
                    f"{self._config.budget_wait_s:g} s. Run `aep-exporter lanes prune`, "
                    "delete flows made by other tools, or raise max_flows if AEP allows it."
                )
            log.info("lane_budget_wait", flows=count, limit=limit)
            self._freed.clear()  # until a lane is released here, or the recheck is due
            await sleep_or_wake(self._clock, min(left, self._config.budget_recheck_s), self._freed)

    def _idle_candidates(self) -> list[LaneFlow]:
        """Lane flows that may be retired, least recently used first."""
        known: list[LaneFlow] = []
        for lane in self._lanes.values():
            if lane.busy:
                continue
            # A schedule is a promise: only one-off lanes, and disabled (emptied) ones, go.
            known.extend(
                f for f in lane.flows.values() if lane.key.mode == "once" or f.state == "disabled"
            )
        now = self._clock.monotonic()
        fresh = [f for f in known if now - f.last_used < self._config.lane_idle_s]
        idle = [f for f in known if f not in fresh]
        return sorted(idle, key=lambda f: (f.last_used, f.updated_at_ms))

    async def _unloaded_candidates(self) -> list[tuple[LaneKey, int, dict[str, Any]]]:
        """Lane flows in AEP that this process has not loaded (another daemon's, or older)."""
        loaded = {f.name for lane in self._lanes.values() for f in lane.flows.values()}
        out = []
        for name, item in self._known.items():
            found = None if name in loaded else self._known_lane(name, item)
            if found is None:
                continue
            key, shard = found
            if key.mode != "once" and str(item.get("state")) != "disabled":
                continue
            out.append((key, shard, item))
        out.sort(key=lambda t: int(t[2].get("updatedAt") or 0))
        return out

    async def _retire_one(self) -> bool:
        """Retire the least recently used idle lane flow, asking AEP whether it is idle."""
        since_ms = int((self._clock.time() - self._config.lane_idle_s) * 1000)
        for flow in self._idle_candidates():
            if await self._api.flow_busy(flow.id, since_ms):
                flow.last_used = self._clock.monotonic()  # AEP says busy: not a candidate now
                continue
            lane = self._lanes[flow.key.fingerprint]
            if lane.busy:
                continue
            await self._retire(lane, flow, reason="the flow budget is full")
            return True
        for key, shard, item in await self._unloaded_candidates():
            if await self._api.flow_busy(str(item["id"]), since_ms):
                continue
            lane = self._lanes.get(key.fingerprint) or self._lanes.setdefault(
                key.fingerprint, Lane(key)
            )
            flow = lane.flows.get(shard) or await self._load(key, shard, item)
            lane.flows[shard] = flow
            if lane.busy:
                continue
            await self._retire(lane, flow, reason="the flow budget is full")
            return True
        return False

    async def _empty(self, lane: Lane, flow: LaneFlow, now_ms: int) -> None:
        """The flow's last dataset leaves. A flow cannot export nothing: retire it — unless a
        run is still going on (its files must land), then only disable it (no further slot
        fires) and leave it to the budget or `lanes prune`."""
        if flow.in_use or await self._api.flow_busy(flow.id, now_ms):
            if flow.state != "disabled":
                flow.etag = await self._api.flow_action(flow.id, "disable")
                flow.state = "disabled"
            log.info("lane_emptied_while_busy", flow_id=flow.id, lane=flow.key.fingerprint)
            return
        await self._retire(lane, flow, reason="its last dataset left")

    async def _retire(self, lane: Lane, flow: LaneFlow, *, reason: str) -> None:
        """Disable, then delete the flow and its source and target connections."""
        log.info("lane_retiring", flow_id=flow.id, lane=flow.key.fingerprint, reason=reason)
        with contextlib.suppress(NotFoundError):
            if flow.state != "disabled":
                await self._api.flow_action(flow.id, "disable")
        await self._api.delete("flows", flow.id)
        await self._delete_quietly("sourceConnections", flow.source_id)
        await self._delete_quietly("targetConnections", flow.target_id)
        lane.flows.pop(flow.shard, None)
        self._known.pop(flow.name, None)
        self.retired += 1
        log.info("lane_retired", flow_id=flow.id, lane=flow.key.fingerprint)

    async def delete_orphans(self) -> list[str]:
        """Delete source connections of our lanes that no flow uses (a change cut short);
        only ones older than a few minutes, since another daemon may be about to use one."""
        await self.refresh()
        used = {
            sid for item in self._known.values() for sid in item.get("sourceConnectionIds") or ()
        }
        horizon = (self._clock.time() - self._config.orphan_age_s) * 1000
        changing = tuple(
            f"{lane.key.flow_name()}"
            for lane in self._lanes.values()
            if lane.worker is not None and not lane.worker.done()
        )
        deleted = []
        for item in await self._api.list_prefixed("sourceConnections", LANE_PREFIX):
            if item["id"] in used or int(item.get("createdAt") or 0) >= horizon:
                continue
            if changing and str(item.get("name", "")).startswith(changing):
                continue  # a change of ours is under way: it may be about to use it
            if item["id"] in self._claimed:
                continue  # a change that started since the listing is about to use it
            await self._delete_quietly("sourceConnections", str(item["id"]))
            deleted.append(str(item["id"]))
        log.info("lane_tidy", orphans_deleted=len(deleted))
        return deleted

    async def prune(self, *, dry_run: bool = False) -> list[LaneView]:
        """Retire every idle one-off lane (as the budget would) and delete orphaned source
        connections; with `dry_run`, only say which lanes would go."""
        views = {v.flow_id: v for v in await self.views()}
        since_ms = int((self._clock.time() - self._config.lane_idle_s) * 1000)
        gone: list[LaneView] = []
        candidates = [(f.key, f.shard, f.id) for f in self._idle_candidates()] + [
            (k, s, str(i["id"])) for k, s, i in await self._unloaded_candidates()
        ]
        for key, shard, flow_id in candidates:
            if await self._api.flow_busy(flow_id, since_ms):
                continue
            lane = await self._lane(key)
            flow = lane.flows.get(shard)
            if flow is None or lane.busy:
                continue
            if not dry_run:
                await self._retire(lane, flow, reason="pruned")
            if flow_id in views:
                gone.append(views[flow_id])
        if not dry_run:
            await self.delete_orphans()
        return gone
