"""Query Service (Data Distiller): the verbs the query step needs, and their HTTP client.

Facts (docs/aep-notes.md, "Query Service"): `POST /data/foundation/query/queries` with
`{dbName, sql, name, description, queryParameters, ctasParameters | insertIntoParameters}`
answers 202 and the query in state SUBMITTED; `GET /queries/{id}` reads it; `PATCH
/queries/{id}` with `{"op": "cancel"}` asks to cancel it. Lists filter by `created`, `updated`,
`state` and `id` only (not by name), so a query is found again by its name among those created
after a journaled mark. The new dataset of a CTAS is found by its table name, the Catalog tag
`adobe/pqs/table` of the exportable datasets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, FLOW_SERVICE_PATH, QUERY_SERVICE_PATH
from exporter.aep.listing import MAX_PAGES, next_target, segment
from exporter.aep.transport import Transport
from exporter.errors import NotFoundError, ServerError

QUERIES = f"{QUERY_SERVICE_PATH}/queries"
SUCCESS = "SUCCESS"
FAILED_STATES = frozenset({"FAILED", "KILLED", "CANCELLED", "TIMEOUT"})
TABLE_TAG = "adobe/pqs/table"


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """A query as `GET /queries/{id}` shows it."""

    id: str
    name: str
    state: str
    created_ms: int
    rows: int = 0
    elapsed_ms: int = 0
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state == SUCCESS or self.state in FAILED_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCESS

    @classmethod
    def parse(cls, item: Mapping[str, Any]) -> QueryInfo:
        request = item.get("request") or {}
        errors = tuple(
            (str(e.get("code", "")), str(e.get("message", "")))
            for e in item.get("errors") or ()
            if isinstance(e, Mapping)
        )
        return cls(
            id=str(item["id"]),
            name=str(request.get("name", "")) if isinstance(request, Mapping) else "",
            state=str(item.get("state", "")).upper(),
            created_ms=_ms(item.get("created")),
            rows=int(item.get("rowCount") or 0),
            elapsed_ms=int(item.get("elapsedTime") or 0),
            errors=errors,
        )


def _ms(stamp: Any) -> int:
    if isinstance(stamp, int | float):
        return int(stamp)
    if isinstance(stamp, str) and stamp:
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            return 0
    return 0


def iso_ms(ms: int) -> str:
    """An epoch-ms time as the ISO stamp Query Service's filters take."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class QueryApi(Protocol):
    """What the query step asks of Query Service. Errors are `exporter.errors.AepError`s."""

    async def submit_query(self, body: Mapping[str, Any]) -> QueryInfo:
        """POST a query (sent once: a lost answer is reconciled by `queries_named`)."""

    async def get_query(self, query_id: str) -> QueryInfo | None:
        """The query, or None when it does not exist."""

    async def queries_named(self, name: str, since_ms: int) -> list[QueryInfo]:
        """Queries named exactly `name` created at or after `since_ms`, oldest first."""

    async def cancel_query(self, query_id: str) -> None:
        """Ask Query Service to cancel the query."""

    async def dataset_of_table(self, table: str) -> str | None:
        """The id of the dataset whose Query Service table is `table`, if there is one."""


class HttpQueries:
    """`QueryApi` over the client's transport (same token, limiter, retries and metrics)."""

    def __init__(self, transport: Transport, *, page_size: int = 100) -> None:
        self.transport = transport
        self.page_size = page_size

    async def submit_query(self, body: Mapping[str, Any]) -> QueryInfo:
        answer = await self.transport.request(
            "POST", QUERIES, operation="queries.create", json_body=dict(body), idempotent=False
        )
        if not isinstance(answer.body, Mapping) or not answer.body.get("id"):
            raise ServerError("the query answer has no id", operation="queries.create")
        return QueryInfo.parse(answer.body)

    async def get_query(self, query_id: str) -> QueryInfo | None:
        try:
            answer = await self.transport.request(
                "GET", f"{QUERIES}/{segment(query_id)}", operation="queries.get"
            )
        except NotFoundError:
            return None
        if not isinstance(answer.body, Mapping) or not answer.body.get("id"):
            raise ServerError("the query answer has no id", operation="queries.get")
        return QueryInfo.parse(answer.body)

    async def queries_named(self, name: str, since_ms: int) -> list[QueryInfo]:
        found: list[QueryInfo] = []
        target = QUERIES
        params = [
            ("property", f"created>={iso_ms(since_ms)}"),
            ("orderby", "+created"),
            ("limit", str(self.page_size)),
        ]
        for _ in range(MAX_PAGES):
            answer = await self.transport.request(
                "GET", target, operation="queries.list", query=params
            )
            body = answer.body if isinstance(answer.body, Mapping) else {}
            for item in body.get("queries") or ():
                if isinstance(item, Mapping) and item.get("id"):
                    info = QueryInfo.parse(item)
                    if info.name == name:
                        found.append(info)
            href = ((body.get("_links") or {}).get("next") or {}).get("href")
            if not isinstance(href, str) or not href:
                break
            target, params = next_target(href), []
        found.sort(key=lambda q: q.created_ms)
        return found

    async def cancel_query(self, query_id: str) -> None:
        await self.transport.request(
            "PATCH",
            f"{QUERIES}/{segment(query_id)}",
            operation="queries.patch",
            json_body={"op": "cancel"},
            idempotent=True,
        )

    async def dataset_of_table(self, table: str) -> str | None:
        target = f"{FLOW_SERVICE_PATH}/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs"
        start = 0
        for _ in range(MAX_PAGES):
            answer = await self.transport.request(
                "GET",
                target,
                operation="connectionSpecs.configs",
                query=[
                    ("outputType", "activationDatasets"),
                    ("outputField", "datasets"),
                    ("start", str(start)),
                    ("limit", str(self.page_size)),
                ],
            )
            body = answer.body if isinstance(answer.body, Mapping) else {}
            items = [i for i in body.get("items") or () if isinstance(i, Mapping)]
            for item in items:
                tags = item.get("tags") or {}
                if table in (tags.get(TABLE_TAG) or ()):
                    return str(item["id"])
            if not items or not (body.get("pageInfo") or {}).get("hasNext"):
                return None
            start += len(items)
        return None
