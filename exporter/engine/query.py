"""The query step: a job's Data Distiller query, run to its end before the export.

    received ─► querying ─► flow_ready ─► ...

Exactly once: the query's name carries the job id (`aep-exporter:<job id>`), and the mark
taken before it is sent (this host's clock, less `adopt_window_s` for AEP's) is journaled with
`querying` first. A resumed job — or a call whose answer was lost — adopts the query of that
name created after the mark instead of sending another. A query that succeeded has written its
table; the dataset exported is then found by that table's name (the Catalog tag
`adobe/pqs/table`). Parameters go to Query Service as `queryParameters`, which it binds to the
`$name`s of the SQL: no value from a job is ever pasted into SQL text.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from exporter.aep.api import AepApi
from exporter.aep.queries import QueryApi, QueryInfo
from exporter.clock import Clock
from exporter.engine.config import EngineConfig
from exporter.errors import (
    AepError,
    ConfigError,
    ExporterError,
    ServerError,
    ThrottledError,
    TransportError,
)
from exporter.jobs import Job, JobState
from exporter.retry import Backoff

log = structlog.get_logger("exporter.query")
NAME_PREFIX = "aep-exporter:"
SLOT_RE = re.compile(r"@(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)$")
SQL_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.sql$")
PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
CANCEL_WITHIN_S = 30.0
_UNREADABLE = (TransportError, ServerError, ThrottledError)


class QueryFailed(ExporterError):
    """The job ends here: `state` (failed, timed_out, rejected), Query Service's own message
    and errors, and the query's id when there is one."""

    def __init__(
        self,
        state: JobState,
        message: str,
        *,
        query_id: str | None = None,
        errors: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.state = state
        self.message = message
        self.query_id = query_id
        self.errors = errors


@dataclass(frozen=True, slots=True)
class QueryDone:
    query_id: str | None
    dataset_id: str
    rows: int | None
    duration_s: float | None


OnQuerying = Callable[[int], Awaitable[None]]


def query_name(job: Job) -> str:
    return f"{NAME_PREFIX}{job.job_id}"


def slot_of(job: Job) -> datetime | None:
    """The schedule slot of a scheduled job (its id is `<schedule>@<slot in UTC>`)."""
    match = SLOT_RE.search(job.job_id)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def table_of(job: Job) -> str:
    """The table the query writes, its placeholders filled in."""
    template = job.query_table or "aep_exporter_{job}"
    slot = slot_of(job)
    job_part = re.sub(r"[^a-z0-9_]+", "_", job.job_id.lower()).strip("_")
    filled = template.replace("{job}", job_part)
    if "{slot_date}" in filled or "{slot_time}" in filled:
        if slot is None:
            raise ConfigError(
                f"query_table {template!r} names the schedule slot, but job {job.job_id} "
                "is not a scheduled one"
            )
        filled = filled.replace("{slot_date}", slot.strftime("%Y%m%d"))
        filled = filled.replace("{slot_time}", slot.strftime("%Y%m%dt%H%M%S"))
    return filled[:128]


def parameters(job: Job) -> dict[str, str]:
    """The values Query Service binds: the job's own and those the exporter sets."""
    values = {"job_id": job.job_id, **job.query_params}
    slot = slot_of(job)
    if slot is not None:
        values |= {
            "slot": slot.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "slot_date": slot.date().isoformat(),
            "previous_date": (slot.date() - timedelta(days=1)).isoformat(),
        }
    return values


def sql_of(job: Job, queries_dir: Path | None) -> str:
    """The job's SQL: its text, or the named file of `queries_dir`."""
    text = job.query or ""
    if not SQL_FILE_RE.match(text):
        return text
    if queries_dir is None:
        raise ConfigError(
            f"query names the file {text!r}, but no queries_dir is configured ([engine])"
        )
    path = queries_dir / text
    try:
        sql = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"query file {text!r} is not in {queries_dir}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"query file {text!r} cannot be read: {exc}") from None
    if not sql.strip():
        raise ConfigError(f"query file {text!r} is empty")
    return sql


class QueryStep:
    """Runs the query of each job that has one; `cancel(job_id)` kills a job's query."""

    def __init__(
        self,
        api: QueryApi,
        config: EngineConfig,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._api = api
        self._config = config
        self._clock = clock
        self._rng = rng
        self._pace = Backoff(
            max_attempts=1_000_000,
            base_delay_s=config.poll_min_s,
            max_delay_s=config.poll_max_s,
            max_elapsed_s=math.inf,
            jitter=0.2,
        )
        self._running: dict[str, str] = {}  # job id -> its query's id, while polled
        self._cancelling: set[str] = set()  # jobs being cancelled

    async def cancel(self, job_id: str) -> None:
        """The job is being cancelled: its query is cancelled in Query Service now if it is
        known, or as soon as its id is (a stop of the daemon does not call this: a restart
        adopts the query instead)."""
        query_id = self._running.get(job_id)
        if query_id is None:
            self._cancelling.add(job_id)  # done where its id becomes known
        else:
            await self._cancel_id(query_id)

    async def run(
        self,
        job: Job,
        on_querying: OnQuerying,
        *,
        resume_state: JobState | None,
        resume_mark_ms: int | None,
        deadline: float,
    ) -> QueryDone:
        """Run (or adopt) the job's query and find the dataset it wrote. Raises
        `QueryFailed`."""
        try:
            return await self._run(job, on_querying, resume_state, resume_mark_ms, deadline)
        finally:
            self._cancelling.discard(job.job_id)

    async def _run(
        self,
        job: Job,
        on_querying: OnQuerying,
        resume_state: JobState | None,
        resume_mark_ms: int | None,
        deadline: float,
    ) -> QueryDone:
        started = self._clock.monotonic()
        table = self._table(job)
        name = query_name(job)
        past_query = resume_state is not None and resume_state not in (
            JobState.RECEIVED,
            JobState.QUERYING,
        )
        adopt_since = resume_mark_ms if resume_state == JobState.QUERYING else None
        if past_query:  # the query succeeded before the restart: its table is there
            adopt_since = int((self._clock.time() - job.timeout - self._window) * 1000)
        info: QueryInfo | None = None
        if adopt_since is not None:
            info = await self._adopt(name, adopt_since, deadline)
        if info is None and past_query:
            dataset = await self._dataset(table, deadline)
            return QueryDone(None, dataset, None, None)
        if info is None:
            body = self._body(job, name, table)
            mark = int((self._clock.time() - self._window) * 1000)
            await on_querying(mark)
            try:
                info = await self._submit(body, name, mark, deadline)
            except asyncio.CancelledError:
                if job.job_id in self._cancelling:  # its id unknown yet: found by name
                    await asyncio.shield(self._cancel_named(name, mark))
                raise
        log.info("query_submitted", query_id=info.id, table=table)
        self._running[job.job_id] = info.id
        try:
            if job.job_id in self._cancelling:  # cancelled while the query was being sent
                await self._cancel_id(info.id)
            info = await self._wait(info, deadline)
        except asyncio.CancelledError:
            if job.job_id in self._cancelling:
                await asyncio.shield(self._cancel_id(info.id))
            raise
        finally:
            self._running.pop(job.job_id, None)
        if not info.succeeded:
            message = "; ".join(m for _, m in info.errors) or f"the query ended {info.state}"
            log.info("query_failed", query_id=info.id, state=info.state, error=message)
            raise QueryFailed(
                JobState.FAILED,
                f"query {info.id} {info.state.lower()}: {message}",
                query_id=info.id,
                errors=info.errors,
            )
        dataset = await self._dataset(table, deadline)
        duration = round(self._clock.monotonic() - started, 3)
        log.info("query_succeeded", query_id=info.id, rows=info.rows, dataset_id=dataset)
        return QueryDone(info.id, dataset, info.rows, duration)

    @property
    def _window(self) -> float:
        return self._config.adopt_window_s

    def _table(self, job: Job) -> str:
        try:
            return table_of(job)
        except ConfigError as exc:
            raise QueryFailed(JobState.REJECTED, str(exc)) from None

    def _body(self, job: Job, name: str, table: str) -> dict[str, Any]:
        try:
            sql = sql_of(job, self._config.queries_dir)
        except ConfigError as exc:
            raise QueryFailed(JobState.REJECTED, str(exc)) from None
        used = set(PARAM_RE.findall(sql))
        values = parameters(job)
        missing = sorted(used - set(values))
        if missing:
            raise QueryFailed(
                JobState.REJECTED,
                "the query uses " + ", ".join("$" + m for m in missing) + " but query_params "
                "gives no value for it",
            )
        body: dict[str, Any] = {
            "dbName": self._config.query_db,
            "sql": sql,
            "name": name,
            "description": f"aep-exporter job {job.job_id}",
        }
        if used:
            body["queryParameters"] = {k: v for k, v in values.items() if k in used}
        key = "insertIntoParameters" if job.query_into == "insert" else "ctasParameters"
        body[key] = {"datasetName": table}
        return body

    async def _submit(
        self, body: dict[str, Any], name: str, mark: int, deadline: float
    ) -> QueryInfo:
        """POST once; after a lost answer, adopt the query of that name, else POST again."""
        step = 1
        while True:
            try:
                return await self._api.submit_query(body)
            except _UNREADABLE as exc:
                log.warning("query_submit_uncertain", error=str(exc))
                await self._pause(step, deadline, getattr(exc, "retry_after", None))
                step += 1
                found = await self._adopt(name, mark, deadline)
                if found is not None:
                    return found
            except AepError as exc:
                raise QueryFailed(
                    JobState.FAILED,
                    f"Query Service refused the query: {exc.message}",
                    errors=((exc.code or str(exc.status or ""), exc.message),),
                ) from None

    async def _adopt(self, name: str, since_ms: int, deadline: float) -> QueryInfo | None:
        step = 1
        while True:
            try:
                found = await self._api.queries_named(name, since_ms)
            except _UNREADABLE as exc:
                log.warning("query_list_unreadable", error=str(exc))
                await self._pause(step, deadline)
                step += 1
                continue
            if found:
                log.info("query_adopted", query_id=found[0].id, state=found[0].state)
                return found[0]
            return None

    async def _wait(self, info: QueryInfo, deadline: float) -> QueryInfo:
        step = 1
        while not info.terminal:
            await self._pause(step, deadline, poll=True, query_id=info.id)
            step += 1
            try:
                read = await self._api.get_query(info.id)
            except _UNREADABLE as exc:
                log.warning("query_status_unreadable", query_id=info.id, error=str(exc))
                continue
            if read is None:
                raise QueryFailed(
                    JobState.FAILED, f"query {info.id} no longer exists", query_id=info.id
                )
            info = read
        return info

    async def _dataset(self, table: str, deadline: float) -> str:
        """The dataset of `table`, looked for again for up to `status_unreadable_s`: a new
        dataset may reach the Catalog's listing a little after its query ended."""
        step = 1
        give_up = self._clock.monotonic() + self._config.status_unreadable_s
        while True:
            try:
                dataset = await self._api.dataset_of_table(table)
            except _UNREADABLE as exc:
                log.warning("query_dataset_unreadable", error=str(exc))
                dataset = None
            if dataset is not None:
                return dataset
            if self._clock.monotonic() >= give_up:
                raise QueryFailed(
                    JobState.FAILED, f"the query succeeded but no dataset has the table {table}"
                )
            await self._pause(step, deadline)
            step += 1

    async def _pause(
        self,
        step: int,
        deadline: float,
        retry_after: float | None = None,
        *,
        poll: bool = False,
        query_id: str | None = None,
    ) -> None:
        delay = self._pace.next_delay(step, self._rng) or self._pace.max_delay_s
        delay = max(delay, retry_after or 0.0)
        left = deadline - self._clock.monotonic()
        if left <= 0 or delay >= left:
            await self._clock.sleep(max(0.0, left))
            if query_id is not None:
                await self._cancel_id(query_id)
            raise QueryFailed(
                JobState.TIMED_OUT,
                f"the query {query_id} did not end before the job's deadline"
                if poll
                else "Query Service could not be read before the job's deadline",
                query_id=query_id,
            )
        await self._clock.sleep(delay)

    async def _cancel_named(self, name: str, since_ms: int) -> None:
        try:
            async with asyncio.timeout(CANCEL_WITHIN_S):
                found = await self._api.queries_named(name, since_ms)
        except (AepError, TimeoutError) as exc:
            log.warning("query_cancel_failed", error=str(exc))
            return
        for info in found:
            if not info.terminal:
                await self._cancel_id(info.id)

    async def _cancel_id(self, query_id: str) -> None:
        try:
            async with asyncio.timeout(CANCEL_WITHIN_S):
                await self._api.cancel_query(query_id)
            log.info("query_cancelled", query_id=query_id)
        except (AepError, TimeoutError) as exc:
            log.warning("query_cancel_failed", query_id=query_id, error=str(exc))


def has_queries(api: AepApi | QueryApi) -> QueryApi | None:
    """`api` as a `QueryApi` when it has the verbs (`HttpAep` and `FakeAep` do)."""
    needed = ("submit_query", "get_query", "queries_named", "cancel_query", "dataset_of_table")
    if all(callable(getattr(api, verb, None)) for verb in needed):
        return api  # type: ignore[return-value]
    return None
