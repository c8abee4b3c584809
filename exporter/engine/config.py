"""How patient the engine is: waits, backoff and polling cadence."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """Timings of the export engine. Defaults suit real AEP; tests and benchmarks shrink them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    not_ready_wait_s: float = Field(default=600.0, ge=0)
    """How long after a flow's `createdAt` AEP refuses ad hoc runs ("not ready")."""
    not_ready_retry_s: float = Field(default=15.0, gt=0)
    not_ready_retry_max_s: float = Field(default=120.0, gt=0)
    max_concurrent_setups: int = Field(default=256, ge=1, le=100_000)
    """Distinct flows being found or created at once; more jobs queue for a turn."""
    poll_min_s: float = Field(default=3.0, gt=0)
    poll_max_s: float = Field(default=120.0, gt=0)
    poll_growth: float = Field(default=0.25, gt=0, le=1)
    """A run is polled again after this share of its age, within [poll_min_s, poll_max_s]."""
    poll_jitter: float = Field(default=0.2, ge=0, lt=1)
    poll_batch: int = Field(default=100, ge=1, le=100)
    status_unreadable_s: float = Field(default=900.0, gt=0)
    """A run whose status cannot be read for this long fails its job."""
    patch_attempts: int = Field(default=5, ge=1)
    far_future_s: float = Field(default=365 * 86400.0, gt=86400)
    """Where a one-off flow's schedule start is kept, so AEP never runs it by itself."""

    @model_validator(mode="after")
    def _ordered(self) -> EngineConfig:
        if self.poll_max_s < self.poll_min_s:
            raise ValueError("poll_max_s must be at least poll_min_s")
        if self.not_ready_retry_max_s < self.not_ready_retry_s:
            raise ValueError("not_ready_retry_max_s must be at least not_ready_retry_s")
        return self
