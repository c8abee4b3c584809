"""The engine's view of AEP: the verbs it needs and the shapes it reads back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Collection = Literal["connections", "sourceConnections", "targetConnections", "flows"]
SUCCESS, FAILED = "success", "failed"


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """The parts of a flow the engine checks when it reuses one."""

    id: str
    name: str
    etag: str
    state: str
    created_at_ms: int
    flow_spec_id: str
    source_connection_ids: tuple[str, ...]
    target_connection_ids: tuple[str, ...]
    schedule: Mapping[str, Any]

    @classmethod
    def parse(cls, item: Mapping[str, Any]) -> FlowInfo:
        return cls(
            id=item["id"],
            name=item.get("name", ""),
            etag=item.get("etag", ""),
            state=str(item.get("state", "")).lower(),
            created_at_ms=int(item.get("createdAt", 0)),
            flow_spec_id=item.get("flowSpec", {}).get("id", ""),
            source_connection_ids=tuple(item.get("sourceConnectionIds", ())),
            target_connection_ids=tuple(item.get("targetConnectionIds", ())),
            schedule=dict(item.get("scheduleParams", {})),
        )


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A flow run as read from `GET /runs`; counts default to 0 when AEP leaves them out."""

    id: str
    flow_id: str
    status: str
    created_at_ms: int
    started_at_ms: int | None
    completed_at_ms: int | None
    dataset_id: str = ""
    output_bytes: int = 0
    output_records: int = 0
    output_files: int = 0
    errors: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def terminal(self) -> bool:
        """Done only when the status says so and the completion time is there."""
        return self.status in (SUCCESS, FAILED) and self.completed_at_ms is not None

    @property
    def succeeded(self) -> bool:
        return self.terminal and self.status == SUCCESS

    @classmethod
    def parse(cls, item: Mapping[str, Any]) -> RunInfo:
        metrics = item.get("metrics") or {}
        duration = metrics.get("durationSummary") or {}
        status = metrics.get("statusSummary") or {}
        errors = tuple(
            (str(e.get("code", "")), str(e.get("message", "")))
            for e in status.get("errors") or ()
            if isinstance(e, Mapping)
        )
        records = metrics.get("recordSummary") or {}
        sources = records.get("sourceSummaries") or ()
        dataset = next((s.get("id") for s in sources if isinstance(s, Mapping)), "") or ""
        return cls(
            id=item["id"],
            flow_id=item.get("flowId", ""),
            dataset_id=str(dataset),
            status=str(status.get("status", "")).lower(),
            created_at_ms=int(item.get("createdAt", 0)),
            started_at_ms=duration.get("startedAtUTC"),
            completed_at_ms=duration.get("completedAtUTC"),
            output_bytes=int((metrics.get("sizeSummary") or {}).get("outputBytes", 0)),
            output_records=int(records.get("outputRecordCount", 0)),
            output_files=int((metrics.get("fileSummary") or {}).get("outputFileCount", 0)),
            errors=errors,
        )


class AepApi(Protocol):
    """Everything the engine asks of AEP. Errors are `exporter.errors.AepError`s.

    Creates are safe to call again after an ambiguous failure: an implementation looks the
    entity up by its (unique, deterministic) name before creating it a second time.
    """

    async def create(self, collection: Collection, body: Mapping[str, Any]) -> str:
        """Create an entity; returns its id."""

    async def find_by_name(self, collection: Collection, name: str) -> list[dict[str, Any]]:
        """Entities of `collection` whose name is exactly `name`, newest first."""

    async def get(self, collection: Collection, entity_id: str) -> dict[str, Any] | None:
        """One entity, or None when it does not exist."""

    async def delete(self, collection: Collection, entity_id: str) -> None:
        """Delete an entity; deleting one that is already gone is not an error."""

    async def patch_flow(self, flow_id: str, etag: str, ops: Sequence[Mapping[str, Any]]) -> str:
        """JSON Patch under `If-Match`; returns the new etag. A stale etag raises
        `PreconditionFailed`."""

    async def flow_action(self, flow_id: str, op: Literal["enable", "disable"]) -> str:
        """Enable or disable a flow; returns the new etag."""

    async def trigger(self, flow_id: str, dataset_id: str) -> str:
        """Start an ad hoc export; returns the run id. Raises `NotReadyError`,
        `AdhocNotEnabled` or `RunInProgress` (which carries the run id)."""

    async def trigger_many(
        self, flow_id: str, dataset_ids: Sequence[str], *, send_by: float | None = None
    ) -> dict[str, str]:
        """Start ad hoc exports of several datasets of a flow in one call; returns the run
        id of each dataset the answer names. Raises as `trigger`, and `FlowDisabled`,
        `NotAMember`; AEP refuses the whole call when one dataset cannot run. A call that
        could not be on the wire by `send_by` (monotonic) is not sent: `SendWindowMissed`."""

    async def list_prefixed(self, collection: Collection, prefix: str) -> list[dict[str, Any]]:
        """Entities of `collection` whose name starts with `prefix`, newest first."""

    async def count_destination_flows(self) -> int:
        """How many destination dataflows the sandbox holds."""

    async def flow_busy(self, flow_id: str, since_ms: int) -> bool:
        """Whether a run of the flow is in progress or was created at or after `since_ms`."""

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunInfo]:
        """The runs among `run_ids` that exist (any number; batched by the implementation)."""

    async def check_token(self) -> None:
        """Get an access token (or reuse a valid one); raises if none can be had. What the
        daemon's readiness probe asks."""
        ...

    async def drain(self, within_s: float) -> int:
        """Wait up to `within_s` for requests already on the wire (a stop lets them
        finish); returns how many are still going on."""
        ...

    async def aclose(self) -> None:
        """Release the connections; after `drain`."""
        ...

    async def runs_of_flow(self, flow_id: str, since_ms: int) -> list[RunInfo]:
        """Runs of a flow created at or after `since_ms`, newest first (`dataset_id` says
        which dataset each exports)."""

    async def newest_run(self, flow_id: str, since_ms: int) -> RunInfo | None:
        """The flow's newest run created at or after `since_ms`, whatever its dataset: one
        short answer however many runs the flow has had."""
