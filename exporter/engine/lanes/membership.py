"""Lanes: joining and leaving (PATCH under If-Match) and making a lane's flows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from exporter.aep.api import Collection, FlowInfo
from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, SPEC_VERSION
from exporter.destinations import Destination
from exporter.engine.lanes.cleanup import LaneCleanup
from exporter.engine.lanes.identity import (
    Lane,
    LaneFlow,
    LaneKey,
    PendingChange,
    datasets_of,
    desired_schedule,
    entity_missing,
    keep_members,
    set_digest,
    sync_flow,
)
from exporter.errors import (
    AepError,
    NotFoundError,
    PreconditionFailed,
)
from exporter.retry import Retrying, retry

log = structlog.get_logger("exporter.lanes")
T = TypeVar("T")


class LaneMembership(LaneCleanup):
    """Datasets joining and leaving lanes, and the flows made for them."""

    # ---- membership -----------------------------------------------------------------------

    def _kick(self, lane: Lane) -> None:
        if lane.worker is None or lane.worker.done():
            lane.worker = asyncio.create_task(
                self._changes(lane), name=f"lane-{lane.key.fingerprint}"
            )

    async def _changes(self, lane: Lane) -> None:
        """Apply pending membership changes, one batch at a time, until none is left."""
        while lane.pending.joins or lane.pending.leaves:
            if self._config.join_window_s:
                await self._clock.sleep(self._config.join_window_s)
            batch, lane.pending = lane.pending, PendingChange()
            try:
                await self._apply(lane, batch)
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else asyncio.CancelledError()
                futures: list[asyncio.Future[Any]] = [
                    *batch.joins.values(),
                    *batch.leaves.values(),
                ]
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(error)
                        fut.exception()  # retrieved: a job that left no longer awaits it
                if not isinstance(exc, Exception):
                    raise
                log.warning("lane_change_failed", lane=lane.key.fingerprint, error=str(exc))

    async def _apply(self, lane: Lane, batch: PendingChange) -> None:
        joins = [d for d in batch.joins if lane.member(d) is None]
        leaves = set(batch.leaves)
        for shard in sorted(lane.flows):
            flow = lane.flows[shard]
            room = self._config.max_datasets_per_flow - len(flow.members)
            adds, joins = joins[: max(0, room)], joins[max(0, room) :]
            drop = leaves & set(flow.members)
            if adds or drop:
                rest = await self._change(lane, flow, set(adds), drop)
                joins = rest + joins
        shard = max(lane.flows, default=0)
        while joins:
            shard += 1
            take, joins = (
                joins[: self._config.max_datasets_per_flow],
                joins[self._config.max_datasets_per_flow :],
            )
            lane.flows[shard] = await self._create(lane.key, shard, frozenset(take))
        for dataset, fut in batch.joins.items():
            flow_or_none = lane.member(dataset)
            if fut.done():
                continue
            if flow_or_none is None:
                fut.set_exception(AepError(f"dataset {dataset} could not join its lane"))
                fut.exception()
            else:
                fut.set_result(flow_or_none)
        for left in batch.leaves.values():
            if not left.done():
                left.set_result(None)

    async def _change(
        self, lane: Lane, flow: LaneFlow, adds: set[str], drops: set[str]
    ) -> list[str]:
        """Read-modify-write of the flow's dataset set under `If-Match`; returns the joins
        that did not fit (another daemon filled the flow meanwhile)."""
        made: list[str] = []
        first = True

        async def attempt() -> list[str]:
            nonlocal first
            if first and flow.etag and flow.source_id:
                # What this process last saw: if anyone changed the flow since, its etag
                # changed too, and the PATCH's If-Match says so (then AEP is read).
                etag, old_source = flow.etag, flow.source_id
                current = frozenset(flow.members)
            else:
                item = await self._api.get("flows", flow.id)
                if item is None:
                    raise NotFoundError(f"lane flow {flow.id} is gone", status=404)
                info = FlowInfo.parse(item)
                etag, old_source = info.etag, info.source_connection_ids[0]
                source_item = await self._api.get("sourceConnections", old_source)
                current = frozenset(datasets_of(source_item))
                sync_flow(flow, info, old_source)
            first = False
            room = self._config.max_datasets_per_flow - len(current - drops)
            fit = sorted(adds - current)[: max(0, room)]
            rest = sorted(adds - current)[max(0, room) :]
            wanted = (current | set(fit)) - drops
            now_ms = int(self._clock.time() * 1000)
            if wanted == current:
                keep_members(flow, current, now_ms)
                return rest
            if not wanted:
                await self._empty(lane, flow, now_ms)
                return rest
            source = await self._source(flow.name, wanted)
            if source not in made:
                made.append(source)
            try:
                flow.etag = await self._api.patch_flow(
                    flow.id,
                    etag,
                    [{"op": "replace", "path": "/sourceConnectionIds", "value": [source]}],
                )
            except AepError as exc:
                # The source connection found by its name was deleted as an orphan (a tidy,
                # ours or another daemon's) between the lookup and the PATCH: make the set
                # again (the retry does).
                if entity_missing(exc):
                    log.info("lane_source_vanished", flow_id=flow.id, source_id=source)
                    if source in made:
                        made.remove(source)
                raise
            made.remove(source)
            flow.source_id = source
            # Joined when AEP took the change: after the answer, never before it.
            keep_members(flow, wanted, int(self._clock.time() * 1000))
            log.info(
                "lane_members_changed",
                flow_id=flow.id,
                joined=len(wanted - current),
                left=len(current - wanted),
                datasets=len(wanted),
            )
            if old_source != source:
                await self._delete_quietly("sourceConnections", old_source)
            return rest

        try:
            return await self._on_conflict(
                flow,
                attempt,
                retryable=lambda exc: (
                    isinstance(exc, PreconditionFailed)
                    or (isinstance(exc, AepError) and entity_missing(exc))
                ),
            )
        finally:
            for source in made:
                await self._delete_quietly("sourceConnections", source)

    async def _on_conflict(
        self,
        flow: LaneFlow,
        call: Callable[[], Awaitable[T]],
        *,
        retryable: Callable[[Exception], bool],
    ) -> T:
        """`call()`, a read-modify-write of `flow` under `If-Match`, again while it fails as
        `retryable` says (a 412: another hand changed the flow), up to `patch_attempts`."""

        def conflict(r: Retrying) -> None:
            if isinstance(r.error, PreconditionFailed):
                log.info(
                    "lane_change_conflict",
                    flow_id=flow.id,
                    attempt=r.attempt,
                    retry_in_s=round(r.delay, 3),
                )

        return await retry(
            call,
            policy=self._conflict,
            clock=self._clock,
            rng=self._rng,
            retryable=retryable,
            on_retry=conflict,
        )

    async def _source(self, flow_name: str, datasets: frozenset[str]) -> str:
        """The source connection holding exactly `datasets`, named after the set, so one a
        crash left behind is found and used."""
        name = f"{flow_name} source {set_digest(datasets)}"
        for item in await self._api.find_by_name("sourceConnections", name):
            if frozenset(datasets_of(item)) == datasets:
                self._claimed.add(str(item["id"]))  # the tidy keeps its hands off it
                return str(item["id"])
        return await self._api.create(
            "sourceConnections",
            {
                "name": name,
                "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": SPEC_VERSION},
                "params": {"datasets": [{"dataSetId": d, "name": d} for d in sorted(datasets)]},
            },
        )

    async def _leave_others(self, key: LaneKey, dataset_id: str) -> None:
        """A dataset has one schedule per place its files land: joining a daily or hourly lane
        moves it out of every other lane there (the seed's "promote the flow"; a new schedule
        replaces the old), and an edited destination's new lane takes it out of the old one,
        which then exports nothing more for it. A one-off export leaves a schedule alone."""

        def displaced(other: LaneKey) -> bool:
            if other == key or other.home != key.home:
                return False
            return key.mode != "once" or other.mode == "once"

        others = [lane for lane in self._lanes.values() if displaced(lane.key)]
        for name, item in self._known.items():
            found = self._known_lane(name, item)
            if (
                found is not None
                and displaced(found[0])
                and found[0].fingerprint not in self._lanes
            ):
                others.append(await self._lane(found[0]))
        for lane in others:
            if not lane.loaded:
                await self._lane(lane.key)
            if lane.member(dataset_id) is None:
                continue
            fut = lane.pending.leaves.get(dataset_id)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                lane.pending.leaves[dataset_id] = fut
                self._kick(lane)
            log.info("lane_dataset_moves", dataset_id=dataset_id, out_of=lane.key.fingerprint)
            await asyncio.shield(fut)

    # ---- making and retiring flows --------------------------------------------------------

    async def _create(self, key: LaneKey, shard: int, datasets: frozenset[str]) -> LaneFlow:
        """A new flow for the lane holding `datasets`, within the flow budget."""
        dest = self.destination(key.destination)
        name = key.flow_name(shard)
        async with self._budget:
            await self.refresh()
            found = self._known.get(name)
            if found is not None:  # made by another daemon (or before a crash)
                flow = await self._load(key, shard, found)
                lane = self._lanes[key.fingerprint]
                lane.flows[shard] = flow
                rest = await self._change(lane, flow, set(datasets), set())
                if rest:
                    raise AepError(f"lane flow {flow.id} is full; {len(rest)} datasets wait")
                return flow
            await self._make_room()
            base = await self._base_connection(key.destination, dest, key.identity)
            made: list[tuple[Collection, str]] = []
            try:
                source = await self._source(name, datasets)
                made.append(("sourceConnections", source))
                target = await self._piece(
                    "targetConnections",
                    made,
                    {
                        "name": f"{name} target",
                        "baseConnectionId": base,
                        "connectionSpec": {
                            "id": dest.spec.connection_spec_id,
                            "version": SPEC_VERSION,
                        },
                        "params": {
                            "mode": "Server-to-server",
                            **dest.location(),
                            dest.spec.path_param: key.path,
                            "datasetFileType": key.file_type,
                            "compression": key.compression,
                        },
                    },
                )
                now_s = int(self._clock.time())
                flow_id = await self._api.create(
                    "flows",
                    {
                        "name": name,
                        "description": key.describe(),
                        "flowSpec": {"id": dest.spec.dataset_flow_spec_id, "version": SPEC_VERSION},
                        "sourceConnectionIds": [source],
                        "targetConnectionIds": [target],
                        "transformations": [],
                        "scheduleParams": desired_schedule(key.mode, now_s, self._config),
                    },
                )
            except AepError as exc:
                if not exc.retryable:
                    for collection, entity_id in reversed(made):
                        await self._delete_quietly(collection, entity_id)
                raise
            item = await self._api.get("flows", flow_id)
            if item is None:
                raise AepError(f"flow {flow_id} was created but cannot be read back")
            same = await self._api.find_by_name("flows", name)
            first = min(same or [item], key=lambda i: (int(i.get("createdAt") or 0), i["id"]))
            if first["id"] != flow_id:
                # Another daemon made this lane's flow at the same moment: the older one is
                # the lane's (both daemons decide alike); ours, still unused, goes.
                log.info("lane_made_twice", flow_id=flow_id, kept=first["id"], lane=key.fingerprint)
                await self._delete_quietly("flows", flow_id)
                await self._delete_quietly("sourceConnections", source)
                await self._delete_quietly("targetConnections", target)
                self._known[name] = first
                flow = await self._load(key, shard, first)
                self._lanes[key.fingerprint].flows[shard] = flow
                rest = await self._change(self._lanes[key.fingerprint], flow, set(datasets), set())
                if rest:
                    raise AepError(f"lane flow {flow.id} is full; {len(rest)} datasets wait")
                return flow
            self._known[name] = item
            self.created += 1
            log.info("lane_created", flow_id=flow_id, lane=key.fingerprint, datasets=len(datasets))
            created_at = int(item.get("createdAt") or 0)
            return LaneFlow.of(key, shard, item, dict.fromkeys(datasets, created_at))

    async def _piece(
        self, collection: Collection, made: list[tuple[Collection, str]], body: dict[str, Any]
    ) -> str:
        found = await self._api.find_by_name(collection, body["name"])
        if found:
            return str(found[0]["id"])
        entity_id = await self._api.create(collection, body)
        made.append((collection, entity_id))
        return entity_id

    async def _base_connection(self, name: str, dest: Destination, identity: str) -> str:
        """One base connection per destination identity: an edited destination gets a new
        one (AEP holds the credentials it was made with)."""
        conn_name = f"aep-exporter destination {name} [{identity}]"
        lock = self._base_locks.setdefault(conn_name, asyncio.Lock())
        async with lock:
            if conn_name not in self._bases:
                found = await self._api.find_by_name("connections", conn_name)
                if found:
                    self._bases[conn_name] = str(found[-1]["id"])
                else:
                    body: dict[str, Any] = {
                        "name": conn_name,
                        "connectionSpec": {
                            "id": dest.spec.connection_spec_id,
                            "version": SPEC_VERSION,
                        },
                    }
                    auth = dest.auth()
                    if auth is not None:
                        body["auth"] = auth
                    encryption = dest.encryption()
                    if encryption is not None:
                        body["encryption"] = encryption
                    self._bases[conn_name] = await self._api.create("connections", body)
                    log.info("base_connection_created", destination=name)
            return self._bases[conn_name]
