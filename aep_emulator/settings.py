"""The emulator's knobs: set by command-line options, read and changed at run time through
`/_emulator/config`. Durations marked *emulated* are multiplied by `time_scale`."""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aep_emulator.facts import StorageType
from aep_emulator.storage import parse_endpoints

DEFAULT_CLIENT_ID = "emulator-client"
SECRET_FILE = "client-secret"  # noqa: S105 - a file name, not a secret
"""Where `aep-exporter emulator` keeps its client secret, in its data folder, when no
`--client-secret-file` is given: made at random on the first start, read on the next."""
DEFAULT_ORG_ID = "EMULATOR000000000000000@AdobeOrg"


def new_secret() -> str:
    """A client secret nobody else knows: no emulator accepts a secret printed anywhere."""
    return secrets.token_urlsafe(24)


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
# The Experience Platform permissions Adobe's dataset export guide asks for (View Destinations,
# View Datasets, Manage and Activate Dataset Destinations), by the names `--deny-permission`
# takes; docs/aep-notes.md#permissions says which calls need which.
Permission = Literal["view-destinations", "view-datasets", "manage-dataset-destinations"]


@dataclass(frozen=True, slots=True)
class Flag:
    """How a knob appears on `aep-exporter emulator`'s command line (aep_emulator/cli.py builds
    the options from these): its option group, its name when not `--field-name`, its metavar,
    and `from_file` for a secret given as the path of a file holding it."""

    group: str
    name: str = ""
    metavar: str | None = None
    from_file: bool = False


KNOB_GROUPS = (
    "identity",
    "emulated time",
    "guardrails",
    "faults on platform calls",
    "limits",
    "destinations",
)
IDENTITY, TIME, GUARDRAILS, FAULTS, LIMITS, DESTINATIONS = KNOB_GROUPS


class Knobs(BaseModel):
    """Everything that makes the emulator behave like a busy production service."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Identity
    client_id: Annotated[str, Flag(IDENTITY)] = Field(
        default=DEFAULT_CLIENT_ID, description="the accepted client id, also the API key"
    )
    client_secret: Annotated[str, Flag(IDENTITY, "--client-secret-file", "FILE", True)] = Field(
        default_factory=new_secret,
        repr=False,
        description=f"file holding the accepted client secret (default: {SECRET_FILE} in the "
        "data folder, made at random on the first start)",
    )
    org_id: Annotated[str, Flag(IDENTITY)] = Field(
        default=DEFAULT_ORG_ID, description="the IMS org of the tokens it issues"
    )
    token_lifetime_s: Annotated[float, Flag(IDENTITY, "--token-lifetime", "S")] = Field(
        default=86_399, gt=0, description="access token lifetime in seconds"
    )
    sandboxes: Annotated[list[str], Flag(IDENTITY, "--sandbox", "NAME")] = Field(
        default=["prod", "dev"], description="a sandbox name to serve; repeat for more"
    )
    denied_permissions: Annotated[list[Permission], Flag(IDENTITY, "--deny-permission", "NAME")] = (
        Field(
            default=[],
            description="a permission the credential lacks (view-destinations, view-datasets, "
            "manage-dataset-destinations): the calls needing it answer 403; repeat for more",
        )
    )

    # Time
    time_scale: Annotated[float, Flag(TIME, metavar="X")] = Field(
        default=1.0,
        gt=0,
        description="real seconds per emulated second (0.01: ten minutes take six seconds)",
    )
    not_ready_window_s: Annotated[float, Flag(TIME, "--not-ready-window", "S")] = Field(
        default=600,
        ge=0,
        description="emulated seconds after a dataset joins a flow (its creation, or a PATCH "
        "of sourceConnectionIds) during which ad hoc runs answer 'not ready'",
    )
    run_duration_s: Annotated[Span, Flag(TIME, "--run-duration", "A-B")] = Field(
        default=Span(min=20, max=60), description="emulated run duration, uniform in [A, B]"
    )
    run_failure_rate: Annotated[float, Flag(TIME, metavar="P")] = Field(
        default=0.0, ge=0, le=1, description="share of runs that end failed, shaped like AEP's"
    )
    run_partial_rate: Annotated[float, Flag(TIME, metavar="P")] = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of successful runs that report warnings in errors[]",
    )
    # Query Service (Data Distiller): batch queries run with DuckDB over the data lake.
    query_duration_s: Annotated[Span, Flag(TIME, "--query-duration", "A-B")] = Field(
        default=Span(min=5, max=20), description="emulated query duration, uniform in [A, B]"
    )
    query_failure_rate: Annotated[float, Flag(TIME, metavar="P")] = Field(
        default=0.0, ge=0, le=1, description="share of queries that fail with an internal error"
    )
    query_timeout_s: Annotated[float, Flag(TIME, "--query-timeout", "S")] = Field(
        default=86400.0,
        gt=0,
        description="emulated seconds after which a batch query fails with error 53400",
    )
    allow_json_uncompressed: Annotated[bool, Flag(FAULTS)] = Field(
        default=False,
        description="accept JSON without GZIP, as Adobe's examples (not its rules) do",
    )
    adhoc_disabled_flow_specs: Annotated[
        list[str], Flag(TIME, "--adhoc-disabled-flow-spec", "ID")
    ] = Field(default=[], description="flow spec id whose ad hoc runs 'can not be executed'")

    # Faults on platform calls (everything under /data/)
    latency_ms: Annotated[Span, Flag(FAULTS, metavar="A-B")] = Field(
        default=Span(min=0, max=0), description="added latency per call in ms, uniform in [A, B]"
    )
    rate_limit_rps: Annotated[float | None, Flag(FAULTS, "--rate-limit", "RPS")] = Field(
        default=None, gt=0, description="requests per second per org before 429 (unset: unlimited)"
    )
    rate_limit_burst: Annotated[float | None, Flag(FAULTS, metavar="N")] = Field(
        default=None,
        gt=0,
        description="calls allowed at once before the limit applies (unset: RPS)",
    )
    retry_after: Annotated[RetryAfterMode, Flag(FAULTS)] = Field(
        default="always", description="whether 429 answers carry Retry-After"
    )
    error_429_rate: Annotated[float, Flag(FAULTS, metavar="P")] = Field(
        default=0.0, ge=0, le=1, description="share of calls answered 429 regardless of the limit"
    )
    error_5xx_rate: Annotated[float, Flag(FAULTS, metavar="P")] = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of calls answered 500, 502, 503 or 504, without effect",
    )
    drop_rate: Annotated[float, Flag(FAULTS, metavar="P")] = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of connections closed with no answer (half before, half after the "
        "request took effect)",
    )
    slow_rate: Annotated[float, Flag(FAULTS, metavar="P")] = Field(
        default=0.0, ge=0, le=1, description="share of calls delayed by a further --slow-ms"
    )
    slow_ms: Annotated[float, Flag(FAULTS, metavar="MS")] = Field(
        default=5_000, ge=0, description="the delay of a slow call, in ms"
    )

    # Limits
    # Adobe's destinations guardrails: at most 100 destination dataflows per sandbox.
    max_destination_flows: Annotated[int, Flag(GUARDRAILS, metavar="N")] = Field(
        default=100,
        ge=0,
        description="destination dataflows a sandbox may hold before creating one more is "
        "refused (Adobe's guardrail)",
    )
    # Datasets over all destinations of one ad hoc call (Adobe documents 80 audiences per ad
    # hoc job and nothing for datasets: the same cap, by analogy).
    adhoc_max_datasets_per_call: Annotated[int, Flag(GUARDRAILS, metavar="N")] = Field(
        default=80, ge=1, description="datasets one ad hoc call may name, over all its flows"
    )
    max_body_bytes: Annotated[int, Flag(LIMITS, metavar="BYTES")] = Field(
        default=1_048_576, gt=0, description="largest request body accepted"
    )
    max_rows_per_file: Annotated[int, Flag(LIMITS, metavar="N")] = Field(
        default=1_000_000, gt=0, description="rows per exported file before a run starts another"
    )
    journal_size: Annotated[int, Flag(LIMITS, metavar="N")] = Field(
        default=1_000_000, gt=0, description="served requests the control API's journal keeps"
    )
    seed: Annotated[int | None, Flag(FAULTS)] = Field(
        default=None, description="random seed for faults and durations (unset: random)"
    )

    # Destinations: where runs write (aep_emulator/storage.py)
    storage_endpoints: Annotated[
        list[str], Flag(DESTINATIONS, "--storage-endpoint", "KIND=URL")
    ] = Field(
        default=[],
        description="write runs of a storage kind to a server instead of a local folder: "
        "s3=URL, gcs=URL (its XML API, with the HMAC keys), azure_blob=URL (Azurite; or "
        "azure_blob=connection for the connection string's BlobEndpoint), "
        "sftp=connection (the connection's domain and port); repeat for more",
    )

    @field_validator("storage_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        parse_endpoints(value)
        return value

    def endpoints(self) -> dict[StorageType, str]:
        """`storage_endpoints` by storage kind."""
        return parse_endpoints(self.storage_endpoints)

    def scaled(self, emulated_seconds: float) -> float:
        """Real seconds that an emulated wait takes."""
        return emulated_seconds * self.time_scale
