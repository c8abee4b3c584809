"""ensure_flow: find the flow for an export target, or build it, exactly once.

A target's flow is named after its fingerprint, so AEP itself says whether it exists: the
local cache only saves requests. Concurrent jobs for one target share one attempt
(single-flight). The pieces of a flow are named after it too, so a creation that stopped
half-way — a crash, a lost answer — is resumed by finding them; one that AEP refuses is
cleaned up, leaving no orphans. One base connection serves each destination.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog

from exporter.aep import DATALAKE_SOURCE_SPEC_ID, SPEC_VERSION
from exporter.aepclient.api import AepApi, Collection, FlowInfo
from exporter.clock import Clock
from exporter.destinations import Destination
from exporter.engine.config import EngineConfig
from exporter.errors import AepError, ConfigError, PreconditionFailed
from exporter.jobs import ExportTarget, Job

log = structlog.get_logger("exporter.flows")


def desired_schedule(mode: str, now_s: int, config: EngineConfig) -> dict[str, Any]:
    """The flow's AEP schedule for a job mode. One-off flows start far in the future."""
    if mode == "once":
        start = now_s + int(config.far_future_s)
        return {
            "exportMode": "DAILY_FULL_EXPORT",
            "timeUnit": "day",
            "interval": 0,
            "startTime": start,
            "endTime": start + 86400,
        }
    if mode == "daily":
        return {
            "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
            "timeUnit": "day",
            "interval": 1,
            "startTime": now_s + 60,
        }
    hours = int(mode.split(":", 1)[1])
    return {
        "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
        "timeUnit": "hour",
        "interval": hours,
        "startTime": now_s + 60,
    }


def schedule_matches(
    current: Mapping[str, Any], mode: str, now_s: int, config: EngineConfig
) -> bool:
    want = desired_schedule(mode, now_s, config)
    same = all(
        str(current.get(k, "")).lower() == str(want[k]).lower()
        for k in ("exportMode", "timeUnit", "interval")
    )
    if mode == "once":
        # A one-off flow must never reach its start: keep it at least half the way out.
        return same and int(current.get("startTime", 0)) > now_s + config.far_future_s / 2
    return same


class FlowMismatch(ConfigError):
    """A flow carries our name but exports something else."""


class FlowManager:
    def __init__(
        self,
        api: AepApi,
        destinations: Mapping[str, Destination],
        config: EngineConfig,
        *,
        org_id: str,
        sandbox: str,
        clock: Clock,
    ) -> None:
        self._api = api
        self._destinations = destinations
        self._config = config
        self._org_id = org_id
        self._sandbox = sandbox
        self._clock = clock
        self._flows: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Future[FlowInfo]] = {}
        self._bases: dict[str, str] = {}
        self._base_locks: dict[str, asyncio.Lock] = {}
        self._setups = asyncio.Semaphore(config.max_concurrent_setups)
        self.created = 0

    def target(self, job: Job) -> ExportTarget:
        return ExportTarget.of(job, org_id=self._org_id, sandbox=self._sandbox)

    async def ensure(self, job: Job) -> FlowInfo:
        """The enabled flow for the job's target, with the job's schedule."""
        key = self.target(job).fingerprint
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._ensure_bounded(job))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    async def _ensure_bounded(self, job: Job) -> FlowInfo:
        # Thousands of targets arriving at once would each hold requests, responses and
        # parsed bodies while they queue for the rate limit; a few hundred at a time keep
        # the limiter just as busy at a fraction of the memory.
        async with self._setups:
            return await self._ensure(job)

    async def aclose(self) -> None:
        """Stop the setups still going on (their jobs were cancelled: the journal says where
        each was, and the next start resumes them)."""
        pending = list(self._inflight.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def add_destinations(self, destinations: Mapping[str, Destination]) -> None:
        """New and changed destinations replace the old; removed ones stay known to the jobs
        under way (the engine admits no new job to them)."""
        self._destinations = {**self._destinations, **destinations}

    def forget(self, job: Job) -> None:
        """Drop the cached flow id (after AEP said the flow is gone)."""
        self._flows.pop(self.target(job).fingerprint, None)

    async def _ensure(self, job: Job) -> FlowInfo:
        target = self.target(job)
        flow = await self._known(target) or await self._find(job, target)
        if flow is None:
            flow = await self._create(job, target)
        self._flows[target.fingerprint] = flow.id
        return await self._reconcile(job, flow)

    async def _known(self, target: ExportTarget) -> FlowInfo | None:
        flow_id = self._flows.get(target.fingerprint)
        if flow_id is None:
            return None
        item = await self._api.get("flows", flow_id)
        return None if item is None else FlowInfo.parse(item)

    async def _find(self, job: Job, target: ExportTarget) -> FlowInfo | None:
        for item in await self._api.find_by_name("flows", target.flow_name):
            flow = FlowInfo.parse(item)
            await self._check(job, flow)
            log.info("flow_reused", flow_id=flow.id, fingerprint=target.fingerprint)
            return flow
        return None

    async def _check(self, job: Job, flow: FlowInfo) -> None:
        """Make sure a flow found by name really exports what the job asks."""
        dest = self._destination(job)
        problems = []
        if flow.flow_spec_id != dest.spec.dataset_flow_spec_id:
            problems.append(f"flow spec {flow.flow_spec_id}")
        source = await self._api.get("sourceConnections", flow.source_connection_ids[0])
        datasets = [
            d.get("dataSetId") for d in (source or {}).get("params", {}).get("datasets", [])
        ]
        if datasets != [job.dataset_id]:
            problems.append(f"datasets {datasets}")
        target = await self._api.get("targetConnections", flow.target_connection_ids[0])
        params = (target or {}).get("params", {})
        want = self._target_params(job)
        for key, value in want.items():
            if str(params.get(key, "")).strip("/").lower() != value.strip("/").lower():
                problems.append(f"{key}={params.get(key)!r}")
        if problems:
            raise FlowMismatch(
                f"flow {flow.id} is named {flow.name!r} like aep-exporter's flow for this export "
                f"but differs in {', '.join(problems)}; delete or rename it"
            )

    def _destination(self, job: Job) -> Destination:
        dest = self._destinations.get(job.destination)
        if dest is None:
            raise ConfigError(
                f"unknown destination {job.destination!r}; configured: "
                f"{', '.join(sorted(self._destinations)) or 'none'}"
            )
        return dest

    def _target_params(self, job: Job) -> dict[str, str]:
        dest = self._destination(job)
        return {
            **dest.location(),
            dest.spec.path_param: job.path,
            "datasetFileType": job.file_type.value,
            "compression": job.compression_type.value,
        }

    async def _base_connection(self, name: str, dest: Destination) -> str:
        lock = self._base_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._bases:
                conn_name = f"aep-exporter destination {name}"
                found = await self._api.find_by_name("connections", conn_name)
                if found:
                    self._bases[name] = found[0]["id"]
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
                    self._bases[name] = await self._api.create("connections", body)
                    log.info("base_connection_created", destination=name)
            return self._bases[name]

    async def _create(self, job: Job, target: ExportTarget) -> FlowInfo:
        dest = self._destination(job)
        base = await self._base_connection(job.destination, dest)
        made: list[tuple[Collection, str]] = []
        try:
            source = await self._piece(
                "sourceConnections",
                made,
                {
                    "name": f"{target.flow_name} source",
                    "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": SPEC_VERSION},
                    "params": {"datasets": [{"dataSetId": job.dataset_id, "name": job.dataset_id}]},
                },
            )
            tconn = await self._piece(
                "targetConnections",
                made,
                {
                    "name": f"{target.flow_name} target",
                    "baseConnectionId": base,
                    "connectionSpec": {"id": dest.spec.connection_spec_id, "version": SPEC_VERSION},
                    "params": {"mode": "Server-to-server", **self._target_params(job)},
                },
            )
            now_s = int(self._clock.time())
            flow_id = await self._piece(
                "flows",
                made,
                search=False,  # `_find` looked for it by name a moment ago
                body={
                    "name": target.flow_name,
                    "flowSpec": {"id": dest.spec.dataset_flow_spec_id, "version": SPEC_VERSION},
                    "sourceConnectionIds": [source],
                    "targetConnectionIds": [tconn],
                    "transformations": [],
                    "scheduleParams": desired_schedule(job.mode, now_s, self._config),
                },
            )
        except AepError as exc:
            if not exc.retryable:
                await self._clean_up(made)
            raise
        item = await self._api.get("flows", flow_id)
        if item is None:
            raise AepError(
                f"flow {flow_id} was created but cannot be read back", operation="flows.get"
            )
        self.created += 1
        log.info("flow_created", flow_id=flow_id, fingerprint=target.fingerprint)
        return FlowInfo.parse(item)

    async def _piece(
        self,
        collection: Collection,
        made: list[tuple[Collection, str]],
        body: dict[str, Any],
        *,
        search: bool = True,
    ) -> str:
        """Reuse a piece left by an earlier, interrupted creation, or create it."""
        found = await self._api.find_by_name(collection, body["name"]) if search else []
        if found:
            return str(found[0]["id"])
        entity_id = await self._api.create(collection, body)
        made.append((collection, entity_id))
        return entity_id

    async def _clean_up(self, made: list[tuple[Collection, str]]) -> None:
        for collection, entity_id in reversed(made):
            try:
                await self._api.delete(collection, entity_id)
            except AepError as exc:
                log.warning(
                    "flow_cleanup_failed", collection=collection, id=entity_id, error=str(exc)
                )

    async def _reconcile(self, job: Job, flow: FlowInfo) -> FlowInfo:
        now_s = int(self._clock.time())
        if not schedule_matches(flow.schedule, job.mode, now_s, self._config):
            flow = await self.set_schedule(flow.id, desired_schedule(job.mode, now_s, self._config))
        if flow.state != "enabled":
            await self._api.flow_action(flow.id, "enable")
            log.info("flow_enabled", flow_id=flow.id)
            item = await self._api.get("flows", flow.id)
            flow = FlowInfo.parse(item) if item else flow
        return flow

    async def set_schedule(self, flow_id: str, schedule: dict[str, Any]) -> FlowInfo:
        """Replace the whole `scheduleParams` under `If-Match`, re-reading on a stale etag."""
        for attempt in range(1, self._config.patch_attempts + 1):
            item = await self._api.get("flows", flow_id)
            if item is None:
                raise AepError(f"flow {flow_id} disappeared", status=404, operation="flows.get")
            flow = FlowInfo.parse(item)
            current = dict(flow.schedule)
            full = {
                k: v
                for k, v in current.items()
                if k in ("foldernameTemplate", "folderNameTemplate")
            } | schedule
            try:
                await self._api.patch_flow(
                    flow_id,
                    flow.etag,
                    [{"op": "replace", "path": "/scheduleParams", "value": full}],
                )
            except PreconditionFailed:
                if attempt == self._config.patch_attempts:
                    raise
                continue
            log.info("flow_schedule_set", flow_id=flow_id, schedule=full)
            fresh = await self._api.get("flows", flow_id)
            return FlowInfo.parse(fresh) if fresh else flow
        raise AssertionError("unreachable")
