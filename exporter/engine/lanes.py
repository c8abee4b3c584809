"""Export lanes: one AEP dataflow exports many datasets.

A lane is everything that makes two exports go the same way — org, sandbox, destination
identity, format, compression, path and schedule mode — but not the dataset: AEP writes each
dataset of a flow under `<path>/<datasetId>/exportTime=…/`, so datasets sharing a flow never
mix. A sandbox holds at most 100 destination dataflows (Adobe's guardrail), so one flow per
dataset cannot scale; one flow per lane can.

- **Finding**: a lane's flow is named after its fingerprint (a second shard, when a lane
  outgrows `max_datasets_per_flow`, adds `#2`…), so AEP says which lanes exist; a restarted
  or second daemon finds them by listing the flows with the lane prefix.
- **Membership**: a flow exports the datasets of its source connection, whose list cannot be
  changed. A dataset joins (or leaves) through a new source connection with the new set and a
  `replace /sourceConnectionIds` PATCH under `If-Match`; joins that arrive while a change is
  pending wait for the next one, so many datasets cost one change. A 412 re-reads and
  merges: a concurrent change by another daemon is never undone. Source connections are
  named after their dataset set, so a change cut short by a crash is found and finished;
  ones no flow uses are deleted.
- **Budget**: before a flow is made the sandbox's destination flows are counted; at
  `max_flows` the least recently used idle lane (no job here, a one-off schedule, and in AEP no
  run in progress and none for `lane_idle_s`) is retired — disabled, deleted with its source
  and target connections — or the job waits, bounded, and is then rejected naming the limit.
- **Lifecycle**: scheduled lanes carry an `endTime` that is moved forward well before it
  passes; one-off lanes keep their start parked far in the future, renewed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from exporter.aep.api import AepApi, Collection, FlowInfo
from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, SPEC_VERSION
from exporter.clock import Clock, sleep_or_wake
from exporter.destinations import Destination, unknown_destination
from exporter.engine.config import EngineConfig
from exporter.errors import (
    AepError,
    ConfigError,
    LaneBudgetExhausted,
    NotFoundError,
    PreconditionFailed,
)
from exporter.jobs import Job
from exporter.retry import Backoff

log = structlog.get_logger("exporter.lanes")
LANE_PREFIX = "aep-exporter lane "


@dataclass(frozen=True, slots=True)
class LaneKey:
    """What identifies a lane; the dataset is not part of it."""

    org_id: str
    sandbox: str
    destination: str
    identity: str
    file_type: str
    compression: str
    path: str
    mode: str

    @property
    def fingerprint(self) -> str:
        content = json.dumps(
            [
                self.org_id,
                self.sandbox,
                self.destination,
                self.identity,
                self.file_type,
                self.compression,
                self.path,
                self.mode,
            ]
        )
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    @property
    def home(self) -> tuple[str, str, str, str, str]:
        """Where a dataset's files land: one lane per dataset and home at a time."""
        return (self.sandbox, self.destination, self.file_type, self.compression, self.path)

    def flow_name(self, shard: int = 1) -> str:
        name = f"{LANE_PREFIX}{self.destination} [{self.fingerprint}]"
        return name if shard == 1 else f"{name} #{shard}"

    def describe(self) -> str:
        """The flow's description: the lane in words a person (and `lanes list`) reads."""
        return json.dumps(
            {
                "destination": self.destination,
                "identity": self.identity,
                "format": self.file_type,
                "compression": self.compression,
                "path": self.path,
                "mode": self.mode,
            },
            sort_keys=True,
        )


def desired_schedule(mode: str, now_s: int, config: EngineConfig) -> dict[str, Any]:
    """A lane's AEP schedule. One-off lanes start far in the future (AEP never runs them by
    itself); scheduled lanes end `schedule_end_s` from now and are renewed before that."""
    if mode == "once":
        start = now_s + int(config.far_future_s)
        return {
            "exportMode": "DAILY_FULL_EXPORT",
            "timeUnit": "day",
            "interval": 0,
            "startTime": start,
            "endTime": start + 86400,
        }
    unit, interval = ("day", 1) if mode == "daily" else ("hour", int(mode.split(":", 1)[1]))
    return {
        "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
        "timeUnit": unit,
        "interval": interval,
        "startTime": now_s + 60,
        "endTime": now_s + int(config.schedule_end_s),
    }


def schedule_matches(
    current: Mapping[str, Any], mode: str, now_s: int, config: EngineConfig
) -> bool:
    """Whether a flow's schedule is the mode's and has not come close to its renewal."""
    want = desired_schedule(mode, now_s, config)
    same = all(
        str(current.get(k, "")).lower() == str(want[k]).lower()
        for k in ("exportMode", "timeUnit", "interval")
    )
    if not same:
        return False
    horizon = now_s + config.renew_before_s
    if mode == "once":
        return int(current.get("startTime", 0)) > horizon
    return int(current.get("endTime", 0)) > horizon


def _entity_missing(exc: AepError) -> bool:
    """AEP's answer to a flow naming a connection that does not exist (400, code 1416)."""
    return exc.status == 400 and "1416" in (exc.code or "")


def set_digest(datasets: frozenset[str]) -> str:
    return hashlib.sha256("\n".join(sorted(datasets)).encode()).hexdigest()[:12]


@dataclass(slots=True)
class LaneFlow:
    """One flow of a lane, as this process last saw it."""

    key: LaneKey
    shard: int
    id: str
    etag: str
    state: str
    created_at_ms: int
    flow_spec_id: str
    source_id: str
    target_id: str
    schedule: dict[str, Any]
    members: dict[str, int] = field(default_factory=dict)  # dataset -> joined at (ms)
    in_use: int = 0
    last_used: float = float("-inf")  # monotonic; -inf: not used by this process
    updated_at_ms: int = 0
    guard: asyncio.Lock = field(default_factory=asyncio.Lock)  # one schedule/state fix at a time

    @classmethod
    def of(
        cls, key: LaneKey, shard: int, item: Mapping[str, Any], members: dict[str, int]
    ) -> LaneFlow:
        """The lane flow AEP shows in `item`, exporting `members` (dataset -> joined at)."""
        info = FlowInfo.parse(item)
        return cls(
            key=key,
            shard=shard,
            id=info.id,
            etag=info.etag,
            state=info.state,
            created_at_ms=info.created_at_ms,
            flow_spec_id=info.flow_spec_id,
            source_id=next(iter(info.source_connection_ids), ""),
            target_id=next(iter(info.target_connection_ids), ""),
            schedule=dict(info.schedule),
            members=members,
            updated_at_ms=int(item.get("updatedAt") or 0),
        )

    @property
    def name(self) -> str:
        return self.key.flow_name(self.shard)

    def info(self) -> FlowInfo:
        return FlowInfo(
            id=self.id,
            name=self.name,
            etag=self.etag,
            state=self.state,
            created_at_ms=self.created_at_ms,
            flow_spec_id=self.flow_spec_id,
            source_connection_ids=(self.source_id,),
            target_connection_ids=(self.target_id,),
            schedule=self.schedule,
        )


@dataclass(slots=True)
class _Change:
    """Datasets waiting for a lane's next membership change."""

    joins: dict[str, asyncio.Future[LaneFlow]] = field(default_factory=dict)
    leaves: dict[str, asyncio.Future[None]] = field(default_factory=dict)


@dataclass(slots=True)
class Lane:
    key: LaneKey
    flows: dict[int, LaneFlow] = field(default_factory=dict)  # by shard
    pending: _Change = field(default_factory=_Change)
    worker: asyncio.Task[None] | None = None
    loaded: bool = False
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load at a time

    def member(self, dataset_id: str) -> LaneFlow | None:
        return next((f for f in self.flows.values() if dataset_id in f.members), None)

    @property
    def busy(self) -> bool:
        return any(f.in_use for f in self.flows.values()) or bool(
            self.pending.joins or self.pending.leaves
        )


@dataclass(frozen=True, slots=True)
class LaneView:
    """A lane as `lanes list` shows it."""

    lane: str
    flow_id: str
    name: str
    destination: str
    path: str
    format: str
    compression: str
    mode: str
    datasets: int
    state: str
    schedule: Mapping[str, Any]
    end_time: int | None
    last_run: Mapping[str, Any] | None
    in_use: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "lane": self.lane,
            "flow_id": self.flow_id,
            "name": self.name,
            "destination": self.destination,
            "path": self.path,
            "format": self.format,
            "compression": self.compression,
            "mode": self.mode,
            "datasets": self.datasets,
            "state": self.state,
            "schedule": dict(self.schedule),
            "end_time": self.end_time,
            "last_run": dict(self.last_run) if self.last_run else None,
            "jobs_here": self.in_use,
        }


class LaneManager:
    """The lanes of one org and sandbox: finding, joining, budget, renewal, retirement."""

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
        self._rng = random.Random()
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
        datasets = _datasets(source)
        # When each member joined is not in AEP; the source connection's creation is the
        # latest it can have been (a wait too long once after a restart, never too short).
        joined = max(info.created_at_ms, int((source or {}).get("createdAt") or 0))
        log.info("lane_found", flow_id=info.id, lane=key.fingerprint, datasets=len(datasets))
        return LaneFlow.of(key, shard, item, dict.fromkeys(datasets, joined))

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
            batch, lane.pending = lane.pending, _Change()
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

    async def _apply(self, lane: Lane, batch: _Change) -> None:
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
        try:
            for attempt in range(1, self._config.patch_attempts + 1):
                if attempt == 1 and flow.etag and flow.source_id:
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
                    current = frozenset(_datasets(source_item))
                    _sync(flow, info, old_source)
                room = self._config.max_datasets_per_flow - len(current - drops)
                fit = sorted(adds - current)[: max(0, room)]
                rest = sorted(adds - current)[max(0, room) :]
                wanted = (current | set(fit)) - drops
                now_ms = int(self._clock.time() * 1000)
                if wanted == current:
                    _keep(flow, current, now_ms)
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
                except PreconditionFailed:
                    if attempt == self._config.patch_attempts:
                        raise
                    log.info("lane_change_conflict", flow_id=flow.id, attempt=attempt)
                    await self._after_conflict(attempt)
                    continue
                except AepError as exc:
                    # The source connection found by its name was deleted as an orphan (a
                    # tidy, ours or another daemon's) between the lookup and the PATCH: make
                    # the set again.
                    if not _entity_missing(exc) or attempt == self._config.patch_attempts:
                        raise
                    log.info("lane_source_vanished", flow_id=flow.id, source_id=source)
                    if source in made:
                        made.remove(source)
                    continue
                made.remove(source)
                flow.source_id = source
                # Joined when AEP took the change: after the answer, never before it.
                _keep(flow, wanted, int(self._clock.time() * 1000))
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
            raise AssertionError("unreachable")
        finally:
            for source in made:
                await self._delete_quietly("sourceConnections", source)

    async def _after_conflict(self, attempt: int) -> None:
        delay = self._conflict.next_delay(attempt, self._rng)
        await self._clock.sleep(self._conflict.ceiling(attempt) if delay is None else delay)

    async def _source(self, flow_name: str, datasets: frozenset[str]) -> str:
        """The source connection holding exactly `datasets`, named after the set, so one a
        crash left behind is found and used."""
        name = f"{flow_name} source {set_digest(datasets)}"
        for item in await self._api.find_by_name("sourceConnections", name):
            if frozenset(_datasets(item)) == datasets:
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
                    self._bases[conn_name] = await self._api.create("connections", body)
                    log.info("base_connection_created", destination=name)
            return self._bases[conn_name]

    async def _make_room(self) -> None:
        """Return once the sandbox has room for one more flow; retire an idle lane if needed;
        wait for one, bounded; else raise `LaneBudgetExhausted`."""
        limit = self._config.max_flows
        waited_until = self._clock.monotonic() + self._config.budget_wait_s
        while True:
            count = await self._api.count_destination_flows()
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

    def _known_lane(self, name: str, item: Mapping[str, Any]) -> tuple[LaneKey, int] | None:
        """The lane and shard a listed flow is, when it is one of ours (its description names
        a lane whose flow name is its name) and its destination is configured here."""
        described = _described(item)
        if described is None:
            return None
        key = LaneKey(org_id=self._org_id, sandbox=self._sandbox, **described)
        shard = int(name.rsplit("#", 1)[1]) if " #" in name else 1
        if key.flow_name(shard) != name or key.destination not in self._destinations:
            return None
        return key, shard

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

    async def _delete_quietly(self, collection: Collection, entity_id: str) -> None:
        if not entity_id:
            return
        try:
            await self._api.delete(collection, entity_id)
        except AepError as exc:
            log.warning("lane_cleanup_failed", collection=collection, id=entity_id, error=str(exc))

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
        for attempt in range(1, self._config.patch_attempts + 1):
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
            try:
                flow.etag = await self._api.patch_flow(
                    flow.id,
                    info.etag,
                    [{"op": "replace", "path": "/scheduleParams", "value": full}],
                )
            except PreconditionFailed:
                if attempt == self._config.patch_attempts:
                    raise
                await self._after_conflict(attempt)
                continue
            flow.schedule = full
            flow.state = info.state
            log.info("lane_schedule_set", flow_id=flow.id, schedule=full)
            return

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

    # ---- operators --------------------------------------------------------------------------

    async def views(self) -> list[LaneView]:
        """Every lane flow of the sandbox, as AEP has it."""
        await self.refresh()
        in_use = {f.id: f.in_use for lane in self._lanes.values() for f in lane.flows.values()}
        out = []
        for name, item in sorted(self._known.items()):
            described = _described(item) or {}
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
                    datasets=len(_datasets(source)),
                    state=info.state,
                    schedule=info.schedule,
                    end_time=info.schedule.get("endTime"),
                    last_run=item.get("lastRunDetails"),
                    in_use=in_use.get(info.id, 0),
                )
            )
        return out

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

    async def aclose(self) -> None:
        workers = [lane.worker for lane in self._lanes.values() if lane.worker is not None]
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _datasets(source: Mapping[str, Any] | None) -> list[str]:
    params = (source or {}).get("params") or {}
    return [
        str(d["dataSetId"])
        for d in params.get("datasets") or ()
        if isinstance(d, Mapping) and d.get("dataSetId")
    ]


def _described(item: Mapping[str, Any]) -> dict[str, str] | None:
    """The lane a flow's description names, or None when it is not one of ours."""
    try:
        data = json.loads(str(item.get("description") or ""))
    except ValueError:
        return None
    fields = ("destination", "identity", "format", "compression", "path", "mode")
    if not isinstance(data, dict) or not all(isinstance(data.get(f), str) for f in fields):
        return None
    return {
        "destination": data["destination"],
        "identity": data["identity"],
        "file_type": data["format"],
        "compression": data["compression"],
        "path": data["path"],
        "mode": data["mode"],
    }


def _sync(flow: LaneFlow, info: FlowInfo, source_id: str) -> None:
    flow.etag, flow.state, flow.source_id = info.etag, info.state, source_id
    flow.schedule = dict(info.schedule)


def _keep(flow: LaneFlow, datasets: frozenset[str], now_ms: int) -> None:
    """The flow now exports `datasets`: members that stay keep their join time."""
    flow.members = {d: flow.members.get(d, now_ms) for d in datasets}
