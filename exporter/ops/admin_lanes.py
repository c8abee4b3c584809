"""`/v1/lanes` on the admin server: the export lanes of the daemon's sandbox, and pruning.

    GET  /v1/lanes         every lane flow, as AEP has it: {"lanes": [...]}
    POST /v1/lanes/prune   retire idle one-off lanes: {"retired": [...], "dry_run": bool}

Both use the daemon's own engine (its `LaneManager`), so a lane one of its jobs holds is
never retired. Each answer is bounded: AEP not answering within the deadline is a 504, an AEP
error a 502. A prune that runs out of time is not cut short in the middle of retiring a flow:
it goes on in the background (its end is logged), and another prune is refused (409) until it
ends.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from aiohttp import web

from exporter.daemon.admission import Admissions
from exporter.engine.lanes import LaneManager, LaneView
from exporter.errors import ApiRequestError, ExporterError
from exporter.sources.http import RETRY_FULL_S, RETRY_UNAVAILABLE_S, error_response

log = structlog.get_logger("exporter.admin")

LIST_DEADLINE_S = 30.0  # listing the lane flows and reading each one's source connection
PRUNE_DEADLINE_S = 60.0  # the answer to a prune; the prune itself goes on past it
BOOLEANS = {"true": True, "false": False}


class BadPrune(ApiRequestError):
    pass


class LanesApi:
    def __init__(self, admissions: Admissions, lanes: LaneManager) -> None:
        self.admissions = admissions
        self.lanes = lanes
        self._pruning: asyncio.Task[list[LaneView]] | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/lanes", self.list_lanes, allow_head=False)
        router.add_post("/v1/lanes/prune", self.prune)

    async def aclose(self) -> None:
        """A prune still going on when the server closes is stopped."""
        task, self._pruning = self._pruning, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _unavailable(self, *, recovering_too: bool) -> web.Response | None:
        if self.admissions.stopping:
            why, wait = "the daemon is stopping", RETRY_UNAVAILABLE_S
        elif recovering_too and not self.admissions.ready.is_set():
            # Jobs being recovered may not hold their lanes yet: none may be retired now.
            why, wait = "the daemon is recovering unfinished jobs", RETRY_FULL_S
        else:
            return None
        return error_response(503, "unavailable", why, headers={"Retry-After": str(wait)})

    @staticmethod
    def _aep_failed(exc: ExporterError, doing: str) -> web.Response:
        log.warning("admin_lanes_failed", doing=doing, error=str(exc))
        return error_response(502, "aep_error", f"{doing}: AEP: {exc}")

    @staticmethod
    def _timed_out(doing: str, deadline: float, more: str = "") -> web.Response:
        log.warning("admin_lanes_failed", doing=doing, error=f"no answer within {deadline:g} s")
        return error_response(
            504, "aep_timeout", f"{doing}: AEP did not answer within {deadline:g} s{more}"
        )

    async def list_lanes(self, request: web.Request) -> web.Response:
        if request.query:
            unknown = sorted(request.query)[0]
            return error_response(400, "bad_request", f"unknown query parameter {unknown!r}")
        unavailable = self._unavailable(recovering_too=False)
        if unavailable is not None:
            return unavailable
        try:
            async with asyncio.timeout(LIST_DEADLINE_S):
                views = await self.lanes.views()
        except TimeoutError:
            return self._timed_out("listing the lanes", LIST_DEADLINE_S)
        except ExporterError as exc:
            return self._aep_failed(exc, "listing the lanes")
        return web.json_response({"lanes": [v.as_dict() for v in views]})

    async def _dry_run(self, request: web.Request) -> bool:
        """From the query (`dry_run=true|false`) or the optional body (`{"dry_run": bool}`);
        both may be given only if they agree."""
        unknown = sorted(set(request.query) - {"dry_run"})
        if unknown:
            raise BadPrune(f"unknown query parameter {unknown[0]!r}; known: dry_run")
        wanted: list[bool] = []
        given = request.query.getall("dry_run", [])
        if len(given) > 1:
            raise BadPrune("dry_run: give it once")
        for text in given:
            if text not in BOOLEANS:
                raise BadPrune(f"dry_run: {text!r} is not true or false")
            wanted.append(BOOLEANS[text])
        raw = await request.read()
        if raw.strip():
            if request.content_type != "application/json":
                raise web.HTTPUnsupportedMediaType(
                    text=f"send the body as Content-Type: application/json, "
                    f"not {request.content_type}"
                )
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise BadPrune("the body is not JSON") from None
            if not isinstance(body, dict):
                raise BadPrune('the body must be a JSON object like {"dry_run": true}')
            extra = sorted(set(body) - {"dry_run"})
            if extra:
                raise BadPrune(f"unknown field {extra[0]!r} in the body; known: dry_run")
            if "dry_run" in body:
                if not isinstance(body["dry_run"], bool):
                    raise BadPrune("dry_run: must be true or false")
                wanted.append(body["dry_run"])
        if len(set(wanted)) > 1:
            raise BadPrune("dry_run: given both true and false")
        return wanted[0] if wanted else False

    async def prune(self, request: web.Request) -> web.Response:
        try:
            dry_run = await self._dry_run(request)
        except BadPrune as exc:
            return error_response(400, "bad_request", str(exc))
        except web.HTTPUnsupportedMediaType as exc:
            return error_response(415, "unsupported_media_type", exc.text or exc.reason)
        unavailable = self._unavailable(recovering_too=True)
        if unavailable is not None:
            return unavailable
        if self._pruning is not None and not self._pruning.done():
            return error_response(
                409,
                "prune_in_progress",
                "a prune is still going on (an earlier request ran out of time); try again "
                "once it ends (`lane_retired` in the daemon's log)",
                headers={"Retry-After": str(RETRY_FULL_S)},
            )
        task = asyncio.create_task(self.lanes.prune(dry_run=dry_run), name="admin-lanes-prune")
        self._pruning = task
        task.add_done_callback(_log_end)
        try:
            async with asyncio.timeout(PRUNE_DEADLINE_S):
                retired = await asyncio.shield(task)
        except TimeoutError:
            return self._timed_out(
                "pruning the lanes",
                PRUNE_DEADLINE_S,
                "; the prune goes on in the background (see the daemon's log)",
            )
        except ExporterError as exc:
            return self._aep_failed(exc, "pruning the lanes")
        log.info(
            "lanes_pruned",
            dry_run=dry_run,
            retired=[v.flow_id for v in retired],
        )
        return web.json_response({"retired": [v.as_dict() for v in retired], "dry_run": dry_run})


def _log_end(task: asyncio.Task[list[LaneView]]) -> None:
    """A prune that outlived its request says how it ended."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("lanes_prune_failed", error=f"{type(exc).__name__}: {exc}")
