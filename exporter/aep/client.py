"""`HttpAep`: the engine's `AepApi` over HTTP (Flow Service, ad hoc runs, runs).

What the transport cannot know, this module does: a create whose answer was lost is looked up
by name before it is sent again; a trigger whose answer was lost is never sent again (the
caller reconciles with `runs_of_flow`); the ad hoc service's refusals become `NotReadyError`,
`AdhocNotEnabled` and `RunInProgress`; lists are followed page by page.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import structlog

from exporter.aep.adhoc import TriggerOutcomeUnknown, refusal, run_id_of, trigger_body
from exporter.aep.api import Collection, RunInfo
from exporter.aep.auth import OPERATION as IMS_OPERATION
from exporter.aep.config import AepConfig
from exporter.aep.envelopes import ConnectError
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    FLOW_SERVICE_PATH,
    LANDING_ZONE_PATH,
)
from exporter.aep.listing import (
    filterable,
    gather_all,
    id_batches,
    name_filters,
    pages,
    segment,
)
from exporter.aep.queries import HttpQueries, QueryInfo
from exporter.aep.ratelimit import RateLimiter
from exporter.aep.transport import Transport
from exporter.clock import Clock
from exporter.errors import (
    AdhocError,
    AepError,
    NotFoundError,
    RequestError,
    RunInProgress,
    ServerError,
    ThrottledError,
    TransportError,
)
from exporter.metrics import Metrics
from exporter.retry import Retrying, retry

log = structlog.get_logger("exporter.aep")
FS = FLOW_SERVICE_PATH


class HttpAep:
    """`AepApi` over HTTP. Use as an async context manager, or call `aclose()`.

    `page_size` is the `limit` asked of list calls (AEP's maximum, 100, unless a test wants
    to see paging).
    """

    def __init__(self, transport: Transport, *, page_size: int = 100) -> None:
        if not 1 <= page_size <= 100:
            raise ValueError("page_size must be between 1 and 100")
        self.transport = transport
        self.page_size = page_size

    @classmethod
    def from_config(
        cls,
        config: AepConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        limiter: RateLimiter | None = None,
        page_size: int = 100,
        metrics: Metrics | None = None,
    ) -> HttpAep:
        """A client with its own transport; pass the process's shared `limiter`, and the
        `metrics` to record requests in (also the limiter's, unless `limiter` is given)."""
        transport = Transport(config, clock=clock, rng=rng, limiter=limiter, metrics=metrics)
        return cls(transport, page_size=page_size)

    def __repr__(self) -> str:
        return f"HttpAep({self.transport!r})"

    async def __aenter__(self) -> HttpAep:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self.transport.aclose()

    async def check_token(self) -> None:
        await self.transport.tokens.token()

    async def drain(self, within_s: float) -> int:
        return await self.transport.drain(within_s)

    async def find_by_name(self, collection: Collection, name: str) -> list[dict[str, Any]]:
        """Entities of `collection` named exactly `name`, newest first. A name the filter
        language cannot say exactly is narrowed by a prefix range; should AEP refuse that
        range, every entity is listed and compared."""
        try:
            return await self._named(collection, name, name_filters(name))
        except RequestError:
            if filterable(name):
                raise
            log.info("aep_name_filter_refused", collection=collection)
            return await self._named(collection, name, [])

    async def _named(
        self, collection: Collection, name: str, filters: list[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        async for page in pages(
            self.transport, f"{FS}/{collection}", filters, f"{collection}.list", self.page_size
        ):
            found.extend(e for e in page if e.get("name") == name)
        found.sort(key=lambda e: e.get("createdAt") or 0, reverse=True)
        return found

    async def create(self, collection: Collection, body: Mapping[str, Any]) -> str:
        """POST the entity. After an ambiguous failure (no answer, 5xx, 429) wait as the retry
        policy says, then adopt the entity of that name if there is one (the oldest, should
        there be several), else POST again; give up when the policy does."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("create needs the entity's name, to find it after a lost answer")
        t, operation = self.transport, f"{collection}.create"
        failed: list[AepError] = []  # the POSTs' own failures (not the lookups')

        async def adopted(error: AepError) -> str | None:
            if not _was_sent(error):
                return None
            found = await self.find_by_name(collection, name)
            if not found:
                return None
            log.info(
                "aep_create_adopted",
                collection=collection,
                id=str(found[-1]["id"]),
                error=type(error).__name__,
            )
            return str(found[-1]["id"])

        async def post() -> str:
            if failed and (entity_id := await adopted(failed[-1])) is not None:
                return entity_id
            try:
                answer = await t.request(
                    "POST",
                    f"{FS}/{collection}",
                    operation=operation,
                    json_body=body,
                    idempotent=False,
                )
            except (TransportError, ServerError, ThrottledError) as exc:
                failed.append(exc)
                raise
            new_id = answer.body.get("id") if isinstance(answer.body, Mapping) else None
            if not isinstance(new_id, str) or not new_id:
                raise ServerError("the create answer has no id", operation=operation)
            return new_id

        def retrying(r: Retrying) -> None:
            error = failed[-1]
            log.info(
                "aep_create_retry",
                collection=collection,
                attempt=r.attempt,
                error=type(error).__name__,
                status=error.status,
            )
            if t.metrics is not None:
                t.metrics.api_retry(operation)

        try:
            return await retry(
                post,
                policy=t.policy,
                clock=t.clock,
                rng=t.rng,
                retryable=lambda exc: bool(failed) and exc is failed[-1] and failed[-1].retryable,
                on_retry=retrying,
            )
        except AepError as exc:
            # Given up: the last POST may still have made it.
            if failed and exc is failed[-1] and exc.retryable:
                entity_id = await adopted(exc)
                if entity_id is not None:
                    return entity_id
            raise

    async def get(self, collection: Collection, entity_id: str) -> dict[str, Any] | None:
        """One entity (unwrapped from AEP's `items`), or None if it does not exist."""
        try:
            answer = await self.transport.request(
                "GET", f"{FS}/{collection}/{segment(entity_id)}", operation=f"{collection}.get"
            )
        except NotFoundError:
            return None
        items = answer.body.get("items") if isinstance(answer.body, Mapping) else None
        return dict(items[0]) if items and isinstance(items[0], dict) else None

    async def delete(self, collection: Collection, entity_id: str) -> None:
        """Delete an entity; one that is already gone is fine."""
        try:
            await self.transport.request(
                "DELETE",
                f"{FS}/{collection}/{segment(entity_id)}",
                operation=f"{collection}.delete",
            )
        except NotFoundError:
            return

    async def patch_flow(self, flow_id: str, etag: str, ops: Sequence[Mapping[str, Any]]) -> str:
        """JSON Patch under `If-Match: etag`; returns the new etag. A stale etag (also the one
        a retry meets after a lost answer) raises `PreconditionFailed`: re-read and re-plan."""
        answer = await self.transport.request(
            "PATCH",
            f"{FS}/flows/{segment(flow_id)}",
            operation="flows.patch",
            json_body=list(ops),
            headers={"If-Match": etag},
        )
        return _etag(answer.body, "flows.patch")

    async def flow_action(self, flow_id: str, op: Literal["enable", "disable"]) -> str:
        """Enable or disable a flow; returns its etag. A flow already in that state is success,
        so a retry after a lost answer is too."""
        verb = op.lower()
        try:
            answer = await self.transport.request(
                "POST",
                f"{FS}/flows/{segment(flow_id)}/action",
                operation="flows.action",
                query=[("op", verb)],
                idempotent=True,
            )
        except RequestError:
            flow = await self.get("flows", flow_id)
            if flow is None or str(flow.get("state", "")).lower() != f"{verb}d":
                raise
            return str(flow.get("etag", ""))
        return _etag(answer.body, "flows.action")

    async def trigger(self, flow_id: str, dataset_id: str) -> str:
        """Start an ad hoc export of one dataset of a flow; returns the run id."""
        return (await self.trigger_many(flow_id, [dataset_id]))[dataset_id]

    async def trigger_many(
        self, flow_id: str, dataset_ids: Sequence[str], *, send_by: float | None = None
    ) -> dict[str, str]:
        """Start ad hoc exports of datasets of one flow in one call; returns the run id of
        each dataset the answer names (a dataset it leaves out has no known run).

        Raises `NotReadyError`, `AdhocNotEnabled`, `RunInProgress` (with the run id and, when
        AEP names it, the dataset), `FlowDisabled`, `NotAMember`, other `AdhocError`s, and
        `TriggerOutcomeUnknown` when the request went out but its answer was lost: it is
        never re-sent here.
        """
        if not dataset_ids:
            raise ValueError("trigger_many needs at least one dataset")
        t = self.transport
        sent_at_ms = int(t.clock.time() * 1000)
        try:
            answer = await t.request(
                "POST",
                ADHOC_PATH,
                operation="adhoc.run",
                json_body=trigger_body(flow_id, dataset_ids),
                headers={"Accept": ADHOC_DATASET_ACCEPT},
                idempotent=False,
                send_by=send_by,
            )
        except (TransportError, ServerError) as exc:
            if not _was_sent(exc):
                raise
            raise TriggerOutcomeUnknown(
                f"the trigger of flow {flow_id} ({len(dataset_ids)} datasets) got no usable "
                f"answer ({exc}); runs may have started",
                flow_id=flow_id,
                dataset_id=dataset_ids[0],
                sent_at_ms=sent_at_ms,
                status=exc.status,
                operation="adhoc.run",
            ) from exc
        except RequestError as exc:
            error = refusal(exc, flow_id)
            if isinstance(error, RunInProgress) and not error.run_id:
                error.run_id = await self._active_run(flow_id) or ""
                if not error.run_id:
                    error = AdhocError(
                        error.message,
                        status=error.status,
                        code=error.code,
                        operation=error.operation,
                    )
            raise error from exc
        found = {d: r for d in dataset_ids if (r := run_id_of(answer.body, flow_id, d))}
        if not found:
            raise TriggerOutcomeUnknown(
                "the trigger's answer names no statusURL for the datasets",
                flow_id=flow_id,
                dataset_id=dataset_ids[0],
                sent_at_ms=sent_at_ms,
                status=answer.status,
                operation="adhoc.run",
            )
        log.info("aep_runs_triggered", flow_id=flow_id, datasets=len(found))
        return found

    async def list_prefixed(self, collection: Collection, prefix: str) -> list[dict[str, Any]]:
        """Entities of `collection` whose name starts with `prefix`, newest first."""
        query = name_filters(prefix)
        if filterable(prefix):
            query = [("property", f"name>={prefix}"), ("property", f"name<={prefix}\U0010ffff")]
        found: list[dict[str, Any]] = []
        async for page in pages(
            self.transport, f"{FS}/{collection}", query, f"{collection}.list", self.page_size
        ):
            found.extend(e for e in page if str(e.get("name", "")).startswith(prefix))
        found.sort(key=lambda e: e.get("createdAt") or 0, reverse=True)
        return found

    async def count_destination_flows(self) -> int:
        """How many destination dataflows the sandbox holds (AEP's guardrail counts these)."""
        answer = await self.transport.request(
            "GET",
            f"{FS}/flows",
            operation="flows.list",
            query=[
                ("property", "inheritedAttributes.properties.isDestinationFlow==true"),
                ("count", "true"),
            ],
        )
        count = answer.body.get("count") if isinstance(answer.body, Mapping) else None
        if not isinstance(count, int):
            raise ServerError("the flow count answer has no count", operation="flows.list")
        return count

    async def flow_busy(self, flow_id: str, since_ms: int) -> bool:
        """Whether a run of the flow is in progress, or one was created at or after
        `since_ms` (AEP's word, not this process's memory)."""
        if not filterable(flow_id):
            return False
        for query in (
            [("property", f"flowId=={flow_id}"), ("property", f"createdAt>={int(since_ms)}")],
            [
                ("property", f"flowId=={flow_id}"),
                ("property", "metrics.statusSummary.status==processing"),
            ],
        ):
            async for page in pages(self.transport, f"{FS}/runs", query, "runs.list", 1):
                if any(i.get("flowId") == flow_id for i in page):
                    return True
                break
        return False

    async def _active_run(self, flow_id: str) -> str | None:
        """The flow's run in progress: asked for by status, not by listing its history."""
        query = [
            ("property", f"flowId=={flow_id}"),
            ("property", "metrics.statusSummary.status==processing"),
        ]
        async for page in pages(self.transport, f"{FS}/runs", query, "runs.list", self.page_size):
            for run in _runs_of(page, flow_id):
                if not run.terminal:
                    return run.id
        return None

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunInfo]:
        """The runs among `run_ids` that exist, by id; asked 100 ids per query, the queries
        concurrently (the limiter paces them). Ids that cannot be run ids are skipped."""
        found: dict[str, RunInfo] = {}
        for runs in await gather_all([self._runs_batch(b) for b in id_batches(run_ids)]):
            found.update(runs)
        return found

    async def _runs_batch(self, ids: list[str]) -> dict[str, RunInfo]:
        asked, found = set(ids), {}
        query = [("property", "id==" + ",".join(ids))]
        async for page in pages(self.transport, f"{FS}/runs", query, "runs.list", self.page_size):
            found.update({i["id"]: RunInfo.parse(i) for i in page if i.get("id") in asked})
        return found

    async def landing_zone_credentials(self) -> dict[str, Any]:
        """The Data Landing Zone's credentials for its destination container
        (docs/aep-notes.md#data-landing-zone); the SAS in them is a secret."""
        answer = await self.transport.request(
            "GET",
            f"{LANDING_ZONE_PATH}/credentials",
            operation="landingzone.credentials",
            query=[("type", "dlz_destination")],
        )
        if not isinstance(answer.body, Mapping):
            raise ServerError(
                "the landing zone's credentials answer is not an object",
                operation="landingzone.credentials",
            )
        return dict(answer.body)

    async def runs_of_flow(self, flow_id: str, since_ms: int) -> list[RunInfo]:
        """Runs of `flow_id` created at or after `since_ms`, newest first."""
        if not filterable(flow_id):
            return []
        query = [("property", f"flowId=={flow_id}"), ("property", f"createdAt>={int(since_ms)}")]
        runs: list[RunInfo] = []
        async for page in pages(self.transport, f"{FS}/runs", query, "runs.list", self.page_size):
            runs.extend(_runs_of(page, flow_id))
        runs = [r for r in runs if r.created_at_ms >= since_ms]
        runs.sort(key=lambda r: r.created_at_ms, reverse=True)
        return runs

    async def newest_run(self, flow_id: str, since_ms: int) -> RunInfo | None:
        """The flow's newest run created at or after `since_ms`, by `orderby=-createdAt`
        and `limit=1` (runs are sortable: Adobe's sort-and-filter guide)."""
        if not filterable(flow_id):
            return None
        query = [
            ("property", f"flowId=={flow_id}"),
            ("property", f"createdAt>={int(since_ms)}"),
            ("orderby", "-createdAt"),
        ]
        async for page in pages(self.transport, f"{FS}/runs", query, "runs.list", 1):
            fresh = [r for r in _runs_of(page, flow_id) if r.created_at_ms >= since_ms]
            return max(fresh, key=lambda r: r.created_at_ms) if fresh else None
        return None

    # -- Query Service (exporter.aep.queries): the same transport, token and limiter ------------

    @property
    def _queries(self) -> HttpQueries:
        return HttpQueries(self.transport, page_size=self.page_size)

    async def submit_query(self, body: Mapping[str, Any]) -> QueryInfo:
        return await self._queries.submit_query(body)

    async def get_query(self, query_id: str) -> QueryInfo | None:
        return await self._queries.get_query(query_id)

    async def queries_named(self, name: str, since_ms: int) -> list[QueryInfo]:
        return await self._queries.queries_named(name, since_ms)

    async def cancel_query(self, query_id: str) -> None:
        await self._queries.cancel_query(query_id)

    async def dataset_of_table(self, table: str) -> str | None:
        return await self._queries.dataset_of_table(table)


def _was_sent(error: AepError) -> bool:
    """Whether a failed request may have reached AEP (and so may have taken effect): not if
    no connection was made, nor if no token could be had for it."""
    return not isinstance(error, ConnectError) and error.operation != IMS_OPERATION


def _etag(body: Any, operation: str) -> str:
    etag = body.get("etag") if isinstance(body, Mapping) else None
    if not isinstance(etag, str):
        raise ServerError("the answer has no etag", operation=operation)
    return etag


def _runs_of(page: Sequence[Mapping[str, Any]], flow_id: str) -> list[RunInfo]:
    """The runs of `flow_id` in a page of `GET /runs`, each item checked (should a server
    ignore the `flowId` filter, no other flow's run gets in)."""
    return [RunInfo.parse(i) for i in page if i.get("flowId") == flow_id and "id" in i]
