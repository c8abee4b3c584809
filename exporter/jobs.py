"""Export jobs: what a user asks for, how a job document is read, its identity, states and
outcome."""

from __future__ import annotations

import enum
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exporter.aep.facts import ALLOWED_FORMATS, Compression, FileType
from exporter.destinations import unknown_destination
from exporter.errors import ConfigError, ExporterError
from exporter.redaction import Scrubbed

PATH_RE = re.compile(r"^[0-9a-zA-Z/!\-_.*'()]+$")
DATASET_RE = re.compile(r"^[0-9a-zA-Z_-]{1,128}$")
ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._:@-]{0,199}$")
QUERY_RESULT = "query-result"
"""The `dataset_id` of a job with a query: the dataset is the query's result, known only once
the query has run."""
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
TABLE_TEMPLATE_RE = re.compile(r"^[A-Za-z_{][A-Za-z0-9_{}]{0,127}$")
TABLE_PLACEHOLDERS = ("{job}", "{slot_date}", "{slot_time}")
AUTO_PARAMS = ("job_id", "slot", "slot_date", "previous_date")
MODES = ("once", "daily", "hourly:3", "hourly:6", "hourly:9", "hourly:12")
DEFAULT_TIMEOUT_S = 6 * 3600.0

Mode = Literal["once", "daily", "hourly:3", "hourly:6", "hourly:9", "hourly:12"]


class JobState(enum.StrEnum):
    """A job's life; see docs/design.md for the diagram."""

    RECEIVED = "received"
    QUERYING = "querying"
    FLOW_READY = "flow_ready"
    TRIGGERING = "triggering"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    DELIVERY_MISMATCH = "delivery_mismatch"
    """The run succeeded in AEP but the export folder does not hold what it reported
    (verification is opt-in per destination; exporter/delivery/)."""


TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.TIMED_OUT,
        JobState.CANCELLED,
        JobState.REJECTED,
        JobState.DELIVERY_MISMATCH,
    }
)

ORDER = (
    JobState.RECEIVED,
    JobState.QUERYING,
    JobState.FLOW_READY,
    JobState.TRIGGERING,
    JobState.RUNNING,
)
"""The unfinished states, in the order a job goes through them."""

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset(
        {
            JobState.QUERYING,
            JobState.FLOW_READY,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.CANCELLED,
        }
    ),
    JobState.QUERYING: frozenset(
        {
            JobState.FLOW_READY,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.CANCELLED,
        }
    ),
    JobState.FLOW_READY: frozenset(
        {JobState.TRIGGERING, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}
    ),
    JobState.TRIGGERING: frozenset(
        {JobState.RUNNING, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.CANCELLED,
            JobState.DELIVERY_MISMATCH,
        }
    ),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(ExporterError):
    pass


def check_transition(old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a job cannot go from {old} to {new}")


class Job(BaseModel):
    """One export of one dataset to one named destination."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    id: str | None = None  # default: derived from the content (job_id)
    dataset_id: str
    destination: str = Field(min_length=1, max_length=100)
    format: Literal["parquet", "json"] = "parquet"
    compression: Literal["gzip", "none"] = "gzip"
    path: str = Field(min_length=1, max_length=1024)
    mode: Mode = "once"
    after_run: Literal["keep", "disable"] | None = None
    export_now: bool | None = None
    """Trigger an ad hoc run now. Default: yes for `once`; for `daily`/`hourly`, no — the
    schedule's next slot exports a new member in full, and the job reports that run."""
    timeout: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=7 * 86400)
    labels: dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=500)]] = (
        Field(default_factory=dict, max_length=50)
    )
    query: str | None = Field(default=None, min_length=1, max_length=50_000)
    """A Data Distiller query run before the export, whose result is the dataset exported: a
    SELECT, or the name of a `.sql` file in the engine's `queries_dir`. `$name` parameters
    are bound by Query Service from `query_params` and `job_id`, `slot`, `slot_date`,
    `previous_date` (see docs/design.md, "Query jobs")."""
    query_into: Literal["create", "insert"] | None = None
    """`create` (default): CREATE TABLE `query_table` AS the SELECT, a new dataset;
    `insert`: INSERT INTO the existing dataset whose table is `query_table`."""
    query_table: str | None = Field(default=None, max_length=128)
    """The table written; for `create`, {job}, {slot_date} and {slot_time} are filled in
    (default `aep_exporter_{job}`)."""
    query_params: dict[
        Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=1000)]
    ] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="before")
    @classmethod
    def _query_dataset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("query") is not None:
            given = data.get("dataset_id", QUERY_RESULT)
            if given != QUERY_RESULT:
                raise ValueError(
                    "a job with a query exports the query's result: drop dataset_id "
                    "(query_table names the table written)"
                )
            data = {**data, "dataset_id": QUERY_RESULT}
        return data

    @field_validator("query_params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not PARAM_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a parameter name (letters, digits, '_')")
            if name in AUTO_PARAMS:
                raise ValueError(f"{name!r} is set by the exporter; choose another name")
        return value

    @field_validator("query_table")
    @classmethod
    def _table(cls, value: str | None) -> str | None:
        if value is None:
            return value
        bare = value
        for placeholder in TABLE_PLACEHOLDERS:
            bare = bare.replace(placeholder, "x")
        if not TABLE_TEMPLATE_RE.match(value) or "{" in bare or "}" in bare:
            raise ValueError(
                "must be a table name (letters, digits, '_') with optional "
                + ", ".join(TABLE_PLACEHOLDERS)
            )
        return value

    @field_validator("format", "compression", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("dataset_id")
    @classmethod
    def _dataset(cls, value: str) -> str:
        if not DATASET_RE.match(value):
            raise ValueError("must be an AEP dataset id (letters, digits, '-' and '_')")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        if value is not None and not ID_RE.match(value):
            raise ValueError(
                "must be 1-200 characters: letters, digits and . _ : @ -, "
                "starting with a letter or digit"
            )
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value == "/":
            # The storage's root: AEP's connection specs take `/` as the folder path
            # (docs/aep-notes.md#destination-options).
            return value
        cleaned = value.strip("/")
        if not cleaned or not PATH_RE.match(cleaned):
            raise ValueError("must be a relative folder of letters, digits and / ! - _ . * ' ( )")
        if any(part in ("", ".", "..") for part in cleaned.split("/")):
            raise ValueError("must not contain empty, '.' or '..' segments")
        return cleaned

    @model_validator(mode="after")
    def _coherent(self) -> Job:
        if (FileType(self.format.upper()), Compression(self.compression.upper())) not in (
            ALLOWED_FORMATS
        ):
            raise ValueError(
                "JSON exports must be gzip-compressed (AEP exports JSON "
                "compressed only): set compression to gzip"
            )
        if self.mode == "once" and self.export_now is False:
            raise ValueError(
                "a once job without export_now would never run: AEP never runs a one-off "
                "lane by itself; drop export_now or choose a daily or hourly mode"
            )
        if self.query is None and (
            self.query_into is not None or self.query_table is not None or self.query_params
        ):
            raise ValueError("query_into, query_table and query_params need a query")
        if self.query_into == "insert" and self.query_table is None:
            raise ValueError("query_into=insert needs query_table: the table to insert into")
        if self.mode != "once" and self.after_run == "disable":
            raise ValueError(
                f"after_run=disable would stop the {self.mode} schedule; "
                "use after_run=keep or mode=once"
            )
        return self

    @property
    def file_type(self) -> FileType:
        return FileType(self.format.upper())

    @property
    def compression_type(self) -> Compression:
        return Compression(self.compression.upper())

    @property
    def after(self) -> Literal["keep", "disable"]:
        """What to do with the flow after the run: disable one-off flows, keep schedules."""
        if self.after_run is not None:
            return self.after_run
        return "disable" if self.mode == "once" else "keep"

    @property
    def trigger_now(self) -> bool:
        return self.export_now if self.export_now is not None else self.mode == "once"

    @property
    def job_id(self) -> str:
        """The given id, or one derived from the content so a resubmitted file is the same job."""
        if self.id is not None:
            return self.id
        # A field added later is left out while unset, so older jobs keep their ids.
        unset = {"export_now"} if self.export_now is None else set()
        unset |= {f for f in ("query", "query_into", "query_table") if getattr(self, f) is None}
        unset |= set() if self.query_params else {"query_params"}
        content = self.model_dump(mode="json", exclude={"id", *unset})
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return f"job-{digest[:24]}"

    @property
    def has_query(self) -> bool:
        return self.query is not None


class RunError(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: Scrubbed


class Delivery(BaseModel):
    """What verification found at the destination (exporter/delivery/): the verdict, what
    was counted there, and each difference from the run's metrics."""

    model_config = ConfigDict(frozen=True)

    verdict: Literal["verified", "mismatch"]
    files: int = 0
    bytes: int = 0
    rows: int | None = None
    """Rows counted from the Parquet footers; None for JSON (not counted without reading)."""
    differences: tuple[str, ...] = ()
    requests: int = 0
    """Requests made to the store (listing, footer reads, marker writes)."""
    success_marker: bool = False
    manifest: str | None = None
    """The manifest's name in the export folder, when one was written."""


class Outcome(BaseModel):
    """How a job ended: what a result file, a queue message and a log line report."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    state: JobState
    flow_id: str | None = None
    run_id: str | None = None
    files: int = 0
    records: int = 0
    bytes: int = 0
    duration_s: float | None = None
    partial: bool = False
    errors: tuple[RunError, ...] = ()
    message: Scrubbed = ""
    cause: Literal["", "aep", "auth", "unreachable"] = Field(default="", exclude=True)
    """For a job that failed on an error rather than a run: which kind (auth: credentials
    refused; unreachable: no connection to AEP or IMS). In-process only, for exit codes
    (exporter/exitcodes.py); results and the journal do not carry it."""
    landing_uri: str | None = None
    """The export folder's storage URI (docs/aep-notes.md#where-an-export-lands)."""
    retention_days: int | None = None
    """How long the destination keeps the files, where AEP says (the landing zone: 7)."""
    delivery: Delivery | None = None
    query_id: str | None = None
    query_rows: int | None = None
    query_duration_s: float | None = None
    dataset_id: str | None = None
    """The dataset exported, for a job with a query (its result)."""


# -- reading a job document (a job file, a message, a request body) --------------------------


class Rejected(ConfigError):
    """A job file that cannot become a job; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Parsed:
    job: Job
    spec: dict[str, Any]


MAX_PROBLEMS = 10  # listed in a reason; a file with 10,000 bad labels gets a readable one
TYPE_NAMES = {
    "NoneType": "null (or empty)",
    "list": "a list",
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "true/false",
}


def _describe(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors(include_url=False, include_input=False)
    unknown = False
    for error in errors[:MAX_PROBLEMS]:
        where = ".".join(str(p) for p in error["loc"]) or "job"
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            unknown = True
            parts.append(f"{where}: unknown field")
        else:
            parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    if unknown:
        parts.append(f"job fields are {', '.join(Job.model_fields)}")
    return "; ".join(parts)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (which value was meant is unknowable)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise Rejected(f"invalid JSON: the key {key!r} appears twice; give each field once")
        data[key] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key_node.value!r} appears twice; give each field once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_job(name: str, raw: bytes, destinations: Mapping[str, object]) -> Parsed:
    """A job from the bytes of a job file named `name`; raises `Rejected` with the reason."""
    suffix = Path(name).suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); job "
            "files are JSON, YAML or TOML"
        ) from None
    if "\x00" in text:
        raise Rejected("contains NUL bytes: job files are JSON, YAML or TOML text")
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise Rejected(f"invalid JSON at {where}: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        raise Rejected(f"invalid TOML: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        problem = exc.problem or exc.context or "syntax error"
        raise Rejected(f"invalid YAML{where}: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise Rejected(f"invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise Rejected("nested too deeply: a job is a flat mapping of fields") from None
    except ValueError as exc:  # a value the parser cannot build: a 5,000-digit number, !!int x
        kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
        raise Rejected(f"invalid {kind}: {str(exc).split(';')[0]}") from None
    if not isinstance(data, dict):
        kind = TYPE_NAMES.get(type(data).__name__, type(data).__name__)
        raise Rejected(
            f"the job must be a mapping of fields (dataset_id, destination, path, ...), not {kind}"
        )
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise Rejected(_describe(exc)) from None
    if job.destination not in destinations:
        raise Rejected(f"destination: {unknown_destination(job.destination, destinations)}")
    # What the journal keeps: JSON-safe whatever the parser made (YAML !!binary is bytes).
    return Parsed(job, job.model_dump(mode="json", exclude_unset=True))
