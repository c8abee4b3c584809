"""How patient the engine is: waits, backoff and polling cadence."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

JOIN_SHARE = 0.05  # of the not-ready wait: 30 s of AEP's ten minutes


class EngineConfig(BaseModel):
    """Timings of the export engine. Defaults suit real AEP; tests and benchmarks shrink them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    not_ready_wait_s: float = Field(default=600.0, ge=0)
    """How long after a flow's `createdAt` AEP refuses ad hoc runs ("not ready")."""
    not_ready_retry_s: float = Field(default=15.0, gt=0)
    not_ready_retry_max_s: float = Field(default=120.0, gt=0)
    poll_min_s: float = Field(default=3.0, gt=0)
    poll_max_s: float = Field(default=120.0, gt=0)
    poll_growth: float = Field(default=0.25, gt=0, le=1)
    """A run is polled again after this share of its age, within [poll_min_s, poll_max_s]."""
    poll_jitter: float = Field(default=0.2, ge=0, lt=1)
    poll_batch: int = Field(default=100, ge=1, le=100)
    status_unreadable_s: float = Field(default=900.0, gt=0)
    """A run whose status cannot be read for this long fails its job."""
    patch_attempts: int = Field(default=8, ge=1)
    """Attempts at a flow change when another writer changed it first (a jittered wait each)."""
    far_future_s: float = Field(default=365 * 86400.0, gt=86400)
    """Where a one-off flow's schedule start is kept, so AEP never runs it by itself."""

    # Export lanes: one flow, many datasets (docs/design.md, "Export lanes").
    max_flows: int = Field(default=100, ge=1, le=10_000)
    """Flows the engine may hold in the sandbox, counting every destination dataflow there:
    AEP allows 100 per sandbox; set it lower to leave room for flows made by other tools."""
    max_datasets_per_flow: int = Field(default=250, ge=1, le=10_000)
    """Adobe documents 250 audiences per dataflow and nothing for datasets."""
    max_datasets_per_trigger: int = Field(default=80, ge=1, le=1_000)
    """Datasets named in one ad hoc call (docs/aep-notes.md: 80, as for audiences)."""
    join_coalesce_s: float = Field(default=30.0, ge=0)
    """Datasets arriving within this window join a lane in one membership change; the window
    is at most `JOIN_SHARE` of `not_ready_wait_s` (a joining dataset waits that anyway)."""
    trigger_coalesce_s: float = Field(default=1.0, ge=0)
    """Ready datasets arriving within this window share one ad hoc call."""
    lane_idle_s: float = Field(default=3600.0, ge=0)
    """A lane with no run for this long, none in progress and no job here may be retired."""
    budget_wait_s: float = Field(default=1800.0, ge=0)
    """How long a job waits for room in the flow budget before it is rejected."""
    budget_recheck_s: float = Field(default=60.0, gt=0)
    schedule_end_s: float = Field(default=180 * 86400.0, gt=86400)
    """How far out a scheduled lane's `endTime` is set (AEP's default end: six months)."""
    renew_before_s: float = Field(default=30 * 86400.0, gt=0)
    """A lane's schedule end (or a one-off lane's parked start) is moved forward once it is
    this close."""
    renew_every_s: float = Field(default=6 * 3600.0, gt=0)
    orphan_age_s: float = Field(default=600.0, ge=0)
    """A lane's source connection that no flow uses is deleted once it is this old (younger,
    another daemon may be about to use it in its change)."""
    adopt_window_s: float = Field(default=3600.0, gt=0)
    """How far back a trigger's mark looks for the flow's newest run (and a query's mark
    for queries): the clocks of AEP and this host may disagree by up to this much."""
    queries_dir: Path | None = None
    """The folder of `.sql` files a job's `query` may name (unset: jobs give SQL text)."""
    query_db: str = Field(default="prod:all", min_length=1)
    """The `dbName` of Data Distiller queries (Adobe's examples use `prod:all`)."""

    @property
    def join_window_s(self) -> float:
        """How long a lane gathers joins before it changes: free next to the not-ready wait
        each joining dataset has ahead of it anyway."""
        return min(self.join_coalesce_s, JOIN_SHARE * self.not_ready_wait_s)

    @model_validator(mode="after")
    def _ordered(self) -> EngineConfig:
        if self.poll_max_s < self.poll_min_s:
            raise ValueError("poll_max_s must be at least poll_min_s")
        if self.not_ready_retry_max_s < self.not_ready_retry_s:
            raise ValueError("not_ready_retry_max_s must be at least not_ready_retry_s")
        if self.renew_before_s >= self.schedule_end_s:
            raise ValueError("renew_before_s must be shorter than schedule_end_s")
        return self
