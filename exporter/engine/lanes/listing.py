"""Lanes: the manager's state, what a lane is called, and finding lanes in AEP."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import structlog

from exporter.aep.api import AepApi, Collection, FlowInfo
from exporter.clock import Clock
from exporter.destinations import Destination, unknown_destination
from exporter.engine.config import EngineConfig
from exporter.engine.lanes.identity import (
    LANE_PREFIX,
    Lane,
    LaneFlow,
    LaneKey,
    LaneView,
    datasets_of,
    described_lane,
)
from exporter.errors import (
    AepError,
    ConfigError,
    NotFoundError,
)
from exporter.jobs import Job
from exporter.metrics import Metrics
from exporter.retry import Backoff

log = structlog.get_logger("exporter.lanes")


class LaneBase:
    """The lanes of one org and sandbox as AEP lists them (the manager's state)."""

    metrics: Metrics | None = None
    """Where the flow budget is recorded each time it is counted (the daemon's)."""

    def __init__(
        self,
        api: AepApi,
        destinations: Mapping[str, Destination],
        config: EngineConfig,
        *,
        org_id: str,
        sandbox: str,
        clock: Clock,
        identity_key: bytes,
        rng: random.Random,
    ) -> None:
        self._api = api
        self._destinations = dict(destinations)
        self._config = config
        self._org_id = org_id
        self._sandbox = sandbox
        self._clock = clock
        self._key = identity_key
        # Two daemons changing one flow: the loser of a 412 waits a jittered moment, so the
        # two do not meet again at once (and a busy winner does not starve it).
        self._conflict = Backoff(
            max_attempts=config.patch_attempts, base_delay_s=0.2, max_delay_s=5.0
        )
        self._rng = rng
        # Leftover source connections a change of ours found by name and uses: never orphans
        # to the tidy (rare, so kept for the process's life).
        self._claimed: set[str] = set()
        self._lanes: dict[str, Lane] = {}
        self._known: dict[str, dict[str, Any]] = {}  # flow name -> AEP item (lane flows only)
        self._listed = False
        self._list_lock = asyncio.Lock()
        self._budget = asyncio.Lock()
        self._freed = asyncio.Event()
        self._bases: dict[str, str] = {}
        self._base_locks: dict[str, asyncio.Lock] = {}
        self.created = 0
        self.retired = 0

    # ---- identity -------------------------------------------------------------------

    def add_destinations(self, destinations: Mapping[str, Destination]) -> None:
        self._destinations = {**self._destinations, **destinations}

    def destination(self, name: str) -> Destination:
        dest = self._destinations.get(name)
        if dest is None:
            raise ConfigError(unknown_destination(name, self._destinations))
        return dest

    def key(self, job: Job) -> LaneKey:
        dest = self.destination(job.destination)
        return LaneKey(
            org_id=self._org_id,
            sandbox=self._sandbox,
            destination=job.destination,
            identity=dest.identity(self._key),
            file_type=job.file_type.value,
            compression=job.compression_type.value,
            path=job.path,
            mode=job.mode,
        )

    def loaded_lanes(self) -> list[dict[str, Any]]:
        """The lanes this process has loaded, with each flow's datasets, from memory (no call
        to AEP): what the admin server's status page shows."""
        out = []
        for fingerprint, lane in sorted(self._lanes.items()):
            key = lane.key
            flows = [
                {
                    "flow_id": flow.id,
                    "shard": shard,
                    "state": flow.state,
                    "datasets": sorted(flow.members),
                    "jobs_here": flow.in_use,
                }
                for shard, flow in sorted(lane.flows.items())
            ]
            out.append(
                {
                    "lane": fingerprint,
                    "destination": key.destination,
                    "path": key.path,
                    "format": key.file_type,
                    "compression": key.compression,
                    "mode": key.mode,
                    "flows": flows,
                }
            )
        return out

    # ---- finding lanes ------------------------------------------------------------------

    async def refresh(self, *, if_unread: bool = False) -> None:
        """Read every lane flow of the sandbox from AEP (one list: at most 100 flows)."""
        async with self._list_lock:
            if if_unread and self._listed:
                return
            items = await self._api.list_prefixed("flows", LANE_PREFIX)
            self._known = {str(i.get("name")): i for i in items}
            self._listed = True
            names = set(self._known)
            for lane in self._lanes.values():
                for shard, flow in list(lane.flows.items()):
                    if flow.name not in names:
                        del lane.flows[shard]  # deleted elsewhere: found again if remade
                    else:
                        flow.updated_at_ms = int(self._known[flow.name].get("updatedAt") or 0)

    async def _lane(self, key: LaneKey) -> Lane:
        lane = self._lanes.get(key.fingerprint)
        if lane is None:
            lane = self._lanes[key.fingerprint] = Lane(key)
        if not lane.loaded:
            async with lane.loading:  # jobs arriving together wait for one load
                if lane.loaded:
                    return lane
                await self.refresh(if_unread=True)
                for shard in range(1, 10_000):
                    item = self._known.get(key.flow_name(shard))
                    if item is None:
                        break
                    if shard not in lane.flows:
                        lane.flows[shard] = await self._load(key, shard, item)
                lane.loaded = True
        return lane

    async def _load(self, key: LaneKey, shard: int, item: Mapping[str, Any]) -> LaneFlow:
        info = FlowInfo.parse(item)
        dest = self.destination(key.destination)
        if info.flow_spec_id != dest.spec.dataset_flow_spec_id:
            raise ConfigError(
                f"flow {info.id} is named {info.name!r} like an aep-exporter lane but has flow "
                f"spec {info.flow_spec_id}; delete or rename it"
            )
        source_id = info.source_connection_ids[0] if info.source_connection_ids else ""
        source = await self._api.get("sourceConnections", source_id) if source_id else None
        for _ in range(self._config.patch_attempts):
            if source is not None or not source_id:
                break
            # The listing is older than a change that replaced the source: read the flow again.
            fresh = await self._api.get("flows", info.id)
            if fresh is None:
                raise NotFoundError(f"lane flow {info.id} is gone", status=404)
            item, info = fresh, FlowInfo.parse(fresh)
            source_id = info.source_connection_ids[0] if info.source_connection_ids else ""
            source = await self._api.get("sourceConnections", source_id) if source_id else None
        datasets = datasets_of(source)
        # When each member joined is not in AEP; the source connection's creation is the
        # latest it can have been (a wait too long once after a restart, never too short).
        joined = max(info.created_at_ms, int((source or {}).get("createdAt") or 0))
        log.info("lane_found", flow_id=info.id, lane=key.fingerprint, datasets=len(datasets))
        return LaneFlow.of(key, shard, item, dict.fromkeys(datasets, joined))

    def _known_lane(self, name: str, item: Mapping[str, Any]) -> tuple[LaneKey, int] | None:
        """The lane and shard a listed flow is, when it is one of ours (its description names
        a lane whose flow name is its name) and its destination is configured here."""
        described = described_lane(item)
        if described is None:
            return None
        key = LaneKey(org_id=self._org_id, sandbox=self._sandbox, **described)
        shard = int(name.rsplit("#", 1)[1]) if " #" in name else 1
        if key.flow_name(shard) != name or key.destination not in self._destinations:
            return None
        return key, shard

    async def _delete_quietly(self, collection: Collection, entity_id: str) -> None:
        if not entity_id:
            return
        try:
            await self._api.delete(collection, entity_id)
        except AepError as exc:
            log.warning("lane_cleanup_failed", collection=collection, id=entity_id, error=str(exc))

    # ---- operators --------------------------------------------------------------------------

    async def views(self) -> list[LaneView]:
        """Every lane flow of the sandbox, as AEP has it."""
        await self.refresh()
        in_use = {f.id: f.in_use for lane in self._lanes.values() for f in lane.flows.values()}
        out = []
        for name, item in sorted(self._known.items()):
            described = described_lane(item) or {}
            info = FlowInfo.parse(item)
            source = (
                await self._api.get("sourceConnections", info.source_connection_ids[0])
                if (info.source_connection_ids)
                else None
            )
            key = (
                LaneKey(org_id=self._org_id, sandbox=self._sandbox, **described)
                if described
                else None
            )
            out.append(
                LaneView(
                    lane=key.fingerprint if key else "",
                    flow_id=info.id,
                    name=name,
                    destination=str(described.get("destination", "")),
                    path=str(described.get("path", "")),
                    format=str(described.get("file_type", "")),
                    compression=str(described.get("compression", "")),
                    mode=str(described.get("mode", "")),
                    datasets=len(datasets_of(source)),
                    state=info.state,
                    schedule=info.schedule,
                    end_time=info.schedule.get("endTime"),
                    last_run=item.get("lastRunDetails"),
                    in_use=in_use.get(info.id, 0),
                )
            )
        return out
