"""`/v1/jobs` on the admin server: submit, list, get and cancel jobs.

A submitted job is a job file's content as a JSON body, read by the parser every source uses
(`exporter.jobs.parse_job`), so errors read the same. It runs with source "http" and a `Quiet`
origin: the journal is its whole record (an invalid body is answered 422 and not journaled:
the caller still holds it).

Cancelling stops the daemon's work on a job at once (it ends `cancelled`). AEP has no call
that stops a run already going on, so that run may still write its files; what AEP does
allow is disabling the flow, which is done when no other unfinished job of this daemon's
journal uses the same flow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from exporter.aep.api import AepApi, FlowInfo
from exporter.daemon.admission import Admission, Admissions, Quiet
from exporter.daemon.journal import JobRecord, Journal
from exporter.engine.lanes import LaneManager
from exporter.errors import AepError, ApiRequestError, ConfigError
from exporter.jobs import Job, JobState, Rejected, parse_job

log = structlog.get_logger("exporter.admin")

SOURCE = "http"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_REASON = 500
LIST_PARAMS = frozenset({"state", "source", "limit", "cursor"})
RETRY_FULL_S = 5
RETRY_UNAVAILABLE_S = 30
FLOW_DEADLINE_S = 15.0  # disabling a flow in AEP, after a cancel
SETTLE_DEADLINE_S = 10.0  # a cancelled job's outcome being journaled
DEFAULT_REASON = "cancelled through the admin API"


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def resource(record: JobRecord) -> dict[str, Any]:
    """A job as the API shows it."""
    return {
        "job_id": record.job_id,
        "source": record.source,
        "name": record.name,
        "state": record.state.value,
        "flow_id": record.flow_id,
        "run_id": record.run_id,
        "created": _time(record.created),
        "updated": _time(record.updated),
        "spec": record.spec,
        "outcome": record.outcome,
    }


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = extra.pop("headers", None)
    return web.json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )


class BadQuery(ApiRequestError):
    pass


def encode_cursor(record: JobRecord) -> str:
    raw = json.dumps([record.created, record.job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_limit(text: str | None, *, default: int, most: int) -> int:
    """A page's `limit` parameter: a whole number from 1 to `most`, `default` when not given.
    Raises `BadQuery` saying which."""
    if text is None:
        return default
    try:
        limit = int(text)
    except ValueError:
        raise BadQuery(f"limit: {text!r} is not a whole number") from None
    if not 1 <= limit <= most:
        raise BadQuery(f"limit: must be between 1 and {most}")
    return limit


def decode_cursor(cursor: str) -> tuple[float, str]:
    bad = BadQuery("cursor: not a cursor this API returned (pass next_cursor as is)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise bad
        when = float(created)  # a 400-digit integer overflows here
    except (binascii.Error, ValueError, TypeError, OverflowError):
        raise bad from None
    if not math.isfinite(when) or not isinstance(job_id, str):
        raise bad
    return when, job_id


class JobsApi:
    """The routes, on the daemon's `Admissions`; `lanes` tells which flow a job uses, `api`
    disables it after a cancel."""

    def __init__(self, admissions: Admissions, *, lanes: LaneManager, api: AepApi) -> None:
        self.admissions = admissions
        self.lanes = lanes
        self.api = api
        self._admitting = asyncio.Lock()  # room is checked and taken in one step

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/jobs", self.submit)
        router.add_get("/v1/jobs", self.list_jobs, allow_head=False)
        router.add_get("/v1/jobs/{job_id}", self.get_job, allow_head=False)
        router.add_delete("/v1/jobs/{job_id}", self.cancel)

    @property
    def journal(self) -> Journal:
        return self.admissions.journal

    def _unavailable(self) -> web.Response | None:
        if self.admissions.stopping:
            why, wait = "the daemon is stopping", RETRY_UNAVAILABLE_S
        elif not self.admissions.ready.is_set():
            why, wait = "the daemon is recovering unfinished jobs", RETRY_FULL_S
        else:
            return None
        return error_response(503, "unavailable", why, headers={"Retry-After": str(wait)})

    async def submit(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return error_response(
                415,
                "unsupported_media_type",
                f"send the job as Content-Type: application/json, not {request.content_type}",
            )
        raw = await request.read()
        try:
            parsed = parse_job("request.json", raw, self.admissions.settings.destinations)
        except Rejected as exc:
            log.info("job_refused", source=SOURCE, reason=str(exc))
            return error_response(422, "invalid_job", str(exc))
        job_id = parsed.job.job_id
        unavailable = self._unavailable()
        if unavailable is not None:
            return unavailable
        async with self._admitting:
            known = await self.journal.get(job_id)
            if known is None and (unavailable := self._unavailable()) is not None:
                return unavailable  # it began to stop meanwhile
            if known is None and self.admissions.room <= 0:
                return error_response(
                    503,
                    "full",
                    f"{len(self.admissions.running)} jobs in flight, the most this daemon takes on",
                    headers={"Retry-After": str(RETRY_FULL_S)},
                )
            if known is None:
                admitted = await self.admissions.submit(
                    parsed.job, parsed.spec, Quiet(SOURCE, job_id)
                )
                if admitted.result is Admission.DUPLICATE:
                    known = admitted.record
        if known is not None:
            return error_response(
                409,
                "duplicate",
                f"job id {job_id!r} was already submitted (from {known.source}, now "
                f"{known.state.value}); a job id runs once: give the new job another id",
                job=resource(known),
            )
        record = await self.journal.get(job_id)
        assert record is not None
        log.info("job_submitted", job_id=job_id, source=SOURCE)
        return web.json_response(
            resource(record), status=202, headers={"Location": f"/v1/jobs/{job_id}"}
        )

    async def list_jobs(self, request: web.Request) -> web.Response:
        try:
            states, source, limit, before = self._query(request)
        except BadQuery as exc:
            return error_response(400, "bad_request", str(exc))
        records = await self.journal.page(
            states=states, source=source, before=before, limit=limit + 1
        )
        more = len(records) > limit
        records = records[:limit]
        return web.json_response(
            {
                "jobs": [resource(r) for r in records],
                "next_cursor": encode_cursor(records[-1]) if more else None,
            }
        )

    @staticmethod
    def _query(
        request: web.Request,
    ) -> tuple[list[JobState], str | None, int, tuple[float, str] | None]:
        query = request.query
        unknown = sorted(set(query) - LIST_PARAMS)
        if unknown:
            raise BadQuery(
                f"unknown query parameter {unknown[0]!r}; known: state, source, limit, cursor"
            )
        states = []
        for value in query.getall("state", []):
            for name in value.split(","):
                try:
                    states.append(JobState(name.strip()))
                except ValueError:
                    raise BadQuery(
                        f"state: {name!r} is not a job state; states are "
                        f"{', '.join(s.value for s in JobState)}"
                    ) from None
        sources = query.getall("source", [])
        if len(sources) > 1:
            raise BadQuery("source: give one source")
        limit = page_limit(query.get("limit"), default=DEFAULT_LIMIT, most=MAX_LIMIT)
        cursor = query.get("cursor")
        before = decode_cursor(cursor) if cursor is not None else None
        return states, (sources[0] if sources else None), limit, before

    async def get_job(self, request: web.Request) -> web.Response:
        record = await self.journal.get(request.match_info["job_id"])
        if record is None:
            return error_response(404, "not_found", f"no job {request.match_info['job_id']!r}")
        return web.json_response(resource(record))

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        unknown = sorted(set(request.query) - {"reason"})
        if unknown:
            return error_response(
                400, "bad_request", f"unknown query parameter {unknown[0]!r}; known: reason"
            )
        reason = request.query.get("reason", "").strip() or DEFAULT_REASON
        if len(reason) > MAX_REASON:
            return error_response(400, "bad_request", f"reason: at most {MAX_REASON} characters")
        record = await self.journal.get(job_id)
        if record is None:
            return error_response(404, "not_found", f"no job {job_id!r}")
        if record.terminal:
            return self._finished(record)
        unavailable = self._unavailable()
        if unavailable is not None:
            return unavailable
        if not await self.admissions.cancel(job_id, reason):
            record = await self.journal.get(job_id)
            assert record is not None
            if record.terminal:
                return self._finished(record)
            return error_response(
                409,
                "not_in_flight",
                f"job {job_id!r} is not being worked on by this daemon (now "
                f"{record.state.value}); it cannot be cancelled here",
                job=resource(record),
            )
        try:
            record = await self._settled(job_id)
        except TimeoutError:
            return error_response(
                503,
                "unavailable",
                f"job {job_id!r} was stopped, but its outcome was not journaled within "
                f"{SETTLE_DEADLINE_S:g} s",
                headers={"Retry-After": str(RETRY_FULL_S)},
            )
        if record.state is not JobState.CANCELLED:
            return self._finished(record)
        log.info("job_cancelled", job_id=job_id, source=record.source, reason=reason)
        flow = await self._stop_flow(record)
        return web.json_response({"job": resource(record), "flow": flow})

    @staticmethod
    def _finished(record: JobRecord) -> web.Response:
        return error_response(
            409,
            "finished",
            f"job {record.job_id!r} has already finished ({record.state.value})",
            job=resource(record),
        )

    async def _settled(self, job_id: str) -> JobRecord:
        """The job's record once its outcome is journaled (it may have been written by the
        job's own settling step, which a cancel does not interrupt)."""
        filed = self.admissions.filed
        async with asyncio.timeout(SETTLE_DEADLINE_S), filed:
            while True:
                record = await self.journal.get(job_id)
                assert record is not None
                if record.terminal:
                    return record
                await filed.wait()

    def _fingerprint(self, spec: dict[str, Any]) -> str | None:
        try:
            return self.lanes.key(Job.model_validate(spec)).fingerprint
        except (ValidationError, ConfigError):
            return None

    async def _stop_flow(self, record: JobRecord) -> dict[str, Any]:
        """Disable the cancelled job's flow in AEP, unless another unfinished job uses it."""
        flow_id = record.flow_id
        if flow_id is None:
            return {
                "flow_id": None,
                "disabled": False,
                "detail": "no flow known yet: nothing to disable",
            }
        target = self._fingerprint(record.spec)
        for other in await self.journal.unfinished():
            same = other.flow_id == flow_id or (
                other.flow_id is None
                and target is not None
                and self._fingerprint(other.spec) == target
            )
            if same and other.job_id != record.job_id:
                return {
                    "flow_id": flow_id,
                    "disabled": False,
                    "detail": f"kept enabled: job {other.job_id!r} uses it too",
                }
        api = self.api
        try:
            async with asyncio.timeout(FLOW_DEADLINE_S):
                item = await api.get("flows", flow_id)
                if item is None:
                    return {"flow_id": flow_id, "disabled": False, "detail": "the flow is gone"}
                if FlowInfo.parse(item).state == "disabled":
                    return {"flow_id": flow_id, "disabled": True, "detail": "already disabled"}
                await api.flow_action(flow_id, "disable")
        except TimeoutError:
            detail = f"AEP did not answer within {FLOW_DEADLINE_S:g} s; the flow stays enabled"
            log.warning("flow_disable_failed", flow_id=flow_id, error=detail)
            return {"flow_id": flow_id, "disabled": False, "detail": detail}
        except AepError as exc:
            log.warning("flow_disable_failed", flow_id=flow_id, error=str(exc))
            return {"flow_id": flow_id, "disabled": False, "detail": f"AEP refused: {exc}"}
        log.info("flow_disabled", flow_id=flow_id, job_id=record.job_id, why="cancelled")
        return {"flow_id": flow_id, "disabled": True, "detail": "disabled"}
