"""A lane's identity and what this process knows of its flows: keys, names, schedules,
views."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.aep.api import FlowInfo
from exporter.engine.config import EngineConfig
from exporter.errors import (
    AepError,
)

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


def entity_missing(exc: AepError) -> bool:
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
class PendingChange:
    """Datasets waiting for a lane's next membership change."""

    joins: dict[str, asyncio.Future[LaneFlow]] = field(default_factory=dict)
    leaves: dict[str, asyncio.Future[None]] = field(default_factory=dict)


@dataclass(slots=True)
class Lane:
    key: LaneKey
    flows: dict[int, LaneFlow] = field(default_factory=dict)  # by shard
    pending: PendingChange = field(default_factory=PendingChange)
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


def datasets_of(source: Mapping[str, Any] | None) -> list[str]:
    params = (source or {}).get("params") or {}
    return [
        str(d["dataSetId"])
        for d in params.get("datasets") or ()
        if isinstance(d, Mapping) and d.get("dataSetId")
    ]


def described_lane(item: Mapping[str, Any]) -> dict[str, str] | None:
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


def sync_flow(flow: LaneFlow, info: FlowInfo, source_id: str) -> None:
    flow.etag, flow.state, flow.source_id = info.etag, info.state, source_id
    flow.schedule = dict(info.schedule)


def keep_members(flow: LaneFlow, datasets: frozenset[str], now_ms: int) -> None:
    """The flow now exports `datasets`: members that stay keep their join time."""
    flow.members = {d: flow.members.get(d, now_ms) for d in datasets}
