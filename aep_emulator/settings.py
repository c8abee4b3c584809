"""The emulator's knobs: set by command-line options, read and changed at run time through
`/_emulator/config`. Durations marked *emulated* are multiplied by `time_scale`."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_CLIENT_ID = "emulator-client"
DEFAULT_CLIENT_SECRET = "emulator-secret"  # noqa: S105 - the emulator's documented default
DEFAULT_ORG_ID = "EMULATOR000000000000000@AdobeOrg"


class Span(BaseModel):
    """A uniform distribution between `min` and `max` (equal bounds: a fixed value)."""

    model_config = ConfigDict(extra="forbid")

    min: float = Field(ge=0)
    max: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self

    def draw(self, rng: random.Random) -> float:
        return self.min if self.max == self.min else rng.uniform(self.min, self.max)

    @classmethod
    def parse(cls, text: str) -> Span:
        """`"5"` or `"2-10"` or `"2..10"`, as given on the command line."""
        for sep in ("..", "-"):
            if sep in text.strip().lstrip("-"):
                lo, hi = text.split(sep, 1)
                return cls(min=float(lo), max=float(hi))
        value = float(text)
        return cls(min=value, max=value)


RetryAfterMode = Literal["always", "never", "random"]


class Knobs(BaseModel):
    """Everything that makes the emulator behave like a busy production service."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Identity
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = Field(default=DEFAULT_CLIENT_SECRET, repr=False)
    org_id: str = DEFAULT_ORG_ID
    token_lifetime_s: float = Field(default=86_399, gt=0)
    sandboxes: list[str] = ["prod", "dev"]

    # Time
    time_scale: float = Field(default=1.0, gt=0)
    not_ready_window_s: float = Field(default=600, ge=0)  # emulated, from a dataset's join
    run_duration_s: Span = Span(min=20, max=60)  # emulated
    run_failure_rate: float = Field(default=0.0, ge=0, le=1)
    run_partial_rate: float = Field(default=0.0, ge=0, le=1)
    allow_json_uncompressed: bool = False
    adhoc_disabled_flow_specs: list[str] = []

    # Faults on platform calls (everything under /data/)
    latency_ms: Span = Span(min=0, max=0)
    rate_limit_rps: float | None = Field(default=None, gt=0)
    rate_limit_burst: float | None = Field(default=None, gt=0)
    retry_after: RetryAfterMode = "always"
    error_429_rate: float = Field(default=0.0, ge=0, le=1)
    error_5xx_rate: float = Field(default=0.0, ge=0, le=1)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_ms: float = Field(default=5_000, ge=0)

    # Limits
    # Adobe's destinations guardrails: at most 100 destination dataflows per sandbox.
    max_destination_flows: int = Field(default=100, ge=0)
    # Datasets over all destinations of one ad hoc call (Adobe documents 80 audiences per ad
    # hoc job and nothing for datasets: the same cap, by analogy).
    adhoc_max_datasets_per_call: int = Field(default=80, ge=1)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_rows_per_file: int = Field(default=1_000_000, gt=0)
    journal_size: int = Field(default=1_000_000, gt=0)
    seed: int | None = None

    def scaled(self, emulated_seconds: float) -> float:
        """Real seconds that an emulated wait takes."""
        return emulated_seconds * self.time_scale
