"""Query Service (Data Distiller): batch queries that really run, with DuckDB, over the lake.

`POST /queries` takes `{dbName, sql, name, description, queryParameters, ctasParameters |
insertIntoParameters}` and answers 202 with the query in state SUBMITTED; `GET /queries/{id}`
and `GET /queries` read it; `PATCH /queries/{id}` with `{"op": "cancel"}` kills it
(docs/aep-notes.md, "Query Service"). A query runs when its drawn duration is over and someone
reads it, as runs do: each dataset of the sandbox is a view named by its table name over its
Parquet batches; a CTAS writes its result as a new dataset, an INSERT INTO as a new batch of
the existing one. `$name` parameters are bound by DuckDB as values, never spliced into the SQL.

Failures end the query FAILED with `errors: [{code, message}]`, SQLSTATE-like codes: 42601 bad
SQL, 42P01 a missing table, 42P07 a table that exists already, 53400 past `query_timeout_s`,
58000 the `query_failure_rate` knob.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from aiohttp import web

from aep_emulator.common import json_ok, new_id, read_json, state_of
from aep_emulator.datalake import DataLake, table_name
from aep_emulator.errors import EmulatorError
from aep_emulator.facts import QUERY_SERVICE_PATH
from aep_emulator.gateway import caller
from aep_emulator.state import EmulatorState

PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
SELECT_RE = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)
TERMINAL = frozenset({"SUCCESS", "FAILED", "KILLED"})
MAX_LIMIT = 100


class QueryError(EmulatorError):
    """Query Service's own envelope, as its cancel answer shows: `{message, statusCode}`."""

    def body(self, request_id: str) -> dict[str, Any]:
        return {"message": self.message, "statusCode": self.status}


@dataclass
class Query:
    id: str
    sandbox: str
    client_id: str
    request: dict[str, Any]
    created: float
    complete_at: float
    state: str = "SUBMITTED"
    row_count: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    finished_at: float | None = None
    dataset_id: str | None = None
    running: asyncio.Task[None] | None = None

    @property
    def ctas(self) -> bool:
        return "ctasParameters" in self.request

    @property
    def insert(self) -> bool:
        return "insertIntoParameters" in self.request

    def view(self, base: str) -> dict[str, Any]:
        end = self.finished_at if self.finished_at is not None else self.created
        href = f"{base}{QUERY_SERVICE_PATH}/queries/{self.id}"
        links: dict[str, Any] = {
            "self": {"href": href, "method": "GET"},
            "soft_delete": {"href": href, "method": "PATCH", "body": '{ "op": "soft_delete"}'},
        }
        if self.state not in TERMINAL:
            links["cancel"] = {"href": href, "method": "PATCH", "body": '{ "op": "cancel"}'}
        return {
            "isInsertInto": self.insert,
            "request": self.request,
            "state": self.state,
            "rowCount": self.row_count,
            "errors": self.errors,
            "isCTAS": self.ctas,
            "version": 1,
            "id": self.id,
            "elapsedTime": int((end - self.created) * 1000),
            "updated": _iso(end),
            "client": "API",
            "userId": f"{self.client_id}@AdobeID",
            "created": _iso(self.created),
            "_links": links,
        }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _store(request: web.Request) -> dict[str, Query]:
    store: dict[str, Query] = state_of(request).queries
    return store


def _bad(message: str) -> QueryError:
    return QueryError(400, message)


def _target(body: dict[str, Any]) -> tuple[str, str] | None:
    """("ctas" | "insert", table) from the body's parameters, or None for a plain query."""
    for key, kind in (("ctasParameters", "ctas"), ("insertIntoParameters", "insert")):
        if key in body:
            params = body[key]
            name = params.get("datasetName") if isinstance(params, dict) else None
            if not isinstance(name, str) or not TABLE_RE.match(name):
                raise _bad(f"{key}.datasetName must be a table name (letters, digits, '_')")
            return kind, name
    return None


async def create_query(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object")
    allowed = {
        "dbName",
        "sql",
        "name",
        "description",
        "queryParameters",
        "templateId",
        "ctasParameters",
        "insertIntoParameters",
    }
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"Unknown fields in the request body: {', '.join(unknown)}")
    if not isinstance(body.get("dbName"), str) or not body["dbName"]:
        raise _bad("dbName is required")
    sql = body.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise _bad("sql is required (templates are not emulated)")
    if "ctasParameters" in body and "insertIntoParameters" in body:
        raise _bad("Give ctasParameters or insertIntoParameters, not both")
    _target(body)
    params = body.get("queryParameters", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise _bad("queryParameters must be an object of string values")
    missing = sorted(set(PARAM_RE.findall(sql)) - set(params))
    if missing:
        raise _bad(f"queryParameters has no value for: {', '.join('$' + m for m in missing)}")
    state, who = state_of(request), caller(request)
    now = state.clock.now()
    duration = state.knobs.scaled(state.knobs.query_duration_s.draw(state.rng))
    query = Query(new_id(), who.sandbox.name, who.client_id, body, now, now + duration)
    _store(request)[query.id] = query
    return json_ok(query.view(_base(request)), status=202)


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def get_query(request: web.Request) -> web.Response:
    query = _owned(request, request.match_info["id"])
    await _settle(state_of(request), query)
    return json_ok(query.view(_base(request)))


async def list_queries(request: web.Request) -> web.Response:
    """`property` (created/updated/state/id with == != > < >= <=; comma: AND), `orderby`,
    `limit`, `start` (an ISO time the page starts after, in the order asked)."""
    sandbox = caller(request).sandbox.name
    state = state_of(request)
    found = [q for q in _store(request).values() if q.sandbox == sandbox]
    for query in found:
        await _settle(state, query)
    prop = request.query.get("property")
    if prop:
        for clause in prop.split(","):
            found = [q for q in found if _matches(q, clause)]
    order = request.query.get("orderby", "-created")
    if order.lstrip("+-") not in ("created", "updated"):
        raise _bad("orderby supports created and updated")
    newest = order.startswith("-")
    found.sort(key=lambda q: (q.created, q.id), reverse=newest)
    start = request.query.get("start")
    if start:
        at = _parse_time(start)
        found = [q for q in found if (q.created < at if newest else q.created > at)]
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise _bad("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit must be between 1 and {MAX_LIMIT}")
    page = found[:limit]
    answer: dict[str, Any] = {
        "queries": [q.view(_base(request)) for q in page],
        "_page": {"orderby": order, "count": len(page)},
        "_links": {},
        "version": 1,
    }
    if len(found) > limit:
        nxt = _iso(page[-1].created)
        answer["_page"]["next"] = nxt
        pairs = [("orderby", order), ("limit", str(limit)), ("start", nxt)]
        if prop:
            pairs.append(("property", prop))
        link = urlencode(pairs, quote_via=quote)
        answer["_links"]["next"] = {"href": f"{QUERY_SERVICE_PATH}/queries?{link}"}
    return json_ok(answer)


def _parse_time(text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{text!r} is not an ISO timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


def _matches(query: Query, clause: str) -> bool:
    for op in ("==", "!=", ">=", "<=", ">", "<"):
        if op in clause:
            key, value = clause.split(op, 1)
            break
    else:
        raise _bad(f"Invalid property filter {clause!r}")
    key = key.strip()
    mine: Any
    if key in ("created", "updated"):
        mine = query.created if key == "created" else (query.finished_at or query.created)
        theirs: Any = _parse_time(value)
    elif key in ("state", "id"):
        mine, theirs = (query.state if key == "state" else query.id), value
    else:
        raise _bad(f"property filters support created, updated, state and id, not {key!r}")
    return bool(_OPS[op](mine, theirs))


async def patch_query(request: web.Request) -> web.Response:
    query = _owned(request, request.match_info["id"])
    body = await read_json(request)
    op = body.get("op") if isinstance(body, dict) else None
    if op not in ("cancel", "soft_delete"):
        raise _bad("op must be cancel or soft_delete")
    state = state_of(request)
    await _settle(state, query)
    if op == "cancel" and query.state not in TERMINAL:
        query.state = "KILLED"
        query.finished_at = state.clock.now()
    elif op == "soft_delete":
        _store(request).pop(query.id, None)
    return json_ok({"message": f"Query {op} request received", "statusCode": 202}, status=202)


def _owned(request: web.Request, query_id: str) -> Query:
    query = _store(request).get(query_id)
    if query is None or query.sandbox != caller(request).sandbox.name:
        raise QueryError(404, f"Query {query_id} not found")
    return query


async def _settle(state: EmulatorState, query: Query) -> None:
    """Move the query on to where the clock says it is; run it when its time is over."""
    if query.state in TERMINAL:
        return
    now = state.clock.now()
    deadline = query.created + state.knobs.scaled(state.knobs.query_timeout_s)
    if now < query.complete_at:
        if query.state == "SUBMITTED":
            query.state = "IN_PROGRESS"
        if now >= deadline:
            _fail(query, deadline, "53400", "Query timed out: it ran longer than the limit")
        return
    if query.complete_at >= deadline:
        _fail(query, deadline, "53400", "Query timed out: it ran longer than the limit")
        return
    if query.running is None:
        rng = random.Random(state.rng.random())
        fails = rng.random() < state.knobs.query_failure_rate
        query.running = asyncio.create_task(
            asyncio.to_thread(_execute, state.lake, query, rng, fails),
            name=f"emulator-query-{query.id}",
        )
    await asyncio.shield(query.running)


def _fail(query: Query, at: float, code: str, message: str) -> None:
    query.state = "FAILED"
    query.finished_at = at
    query.errors = [{"code": code, "message": message}]


_LAKE_LOCK = threading.Lock()  # one query writes the lake at a time: CTAS names stay unique


def _execute(lake: DataLake, query: Query, rng: random.Random, fails: bool) -> None:
    """Run the SQL (in a worker thread) and record the outcome on `query`."""
    try:
        _run_sql(lake, query, rng, fails)
    except Exception as exc:  # a bug of the emulator: the query fails, the server stays up
        _fail(query, query.complete_at, "58000", f"Internal error: {type(exc).__name__}: {exc}")


def _run_sql(lake: DataLake, query: Query, rng: random.Random, fails: bool) -> None:
    end = query.complete_at
    if fails:
        _fail(query, end, "58000", "Internal error: the query engine failed; run it again")
        return
    sql = query.request["sql"]
    if not SELECT_RE.match(sql):
        _fail(query, end, "42601", "only SELECT (or WITH ... SELECT) statements are emulated")
        return
    given = query.request.get("queryParameters") or {}
    params = {k: v for k, v in given.items() if k in set(PARAM_RE.findall(sql))}
    target = _target(query.request)
    with _LAKE_LOCK:
        tables = {}
        for ds in reversed(lake.list(query.sandbox)):  # oldest first: the newest name wins
            if ds.batches:
                tables[table_name(ds.name)] = ds
        if target is not None and target[0] == "ctas" and target[1] in tables:
            _fail(query, end, "42P07", f'relation "{target[1]}" already exists')
            return
        if target is not None and target[0] == "insert" and target[1] not in tables:
            _fail(query, end, "42P01", f'relation "{target[1]}" does not exist')
            return
        # No file system from SQL: the tables are Arrow datasets registered by name.
        con = duckdb.connect(":memory:", config={"enable_external_access": False})
        try:
            for name, ds in tables.items():
                con.register(name, pads.dataset([str(b.path) for b in ds.batches]))
            relation = con.sql(sql, params=params or None)
            if relation is None:
                _fail(query, end, "42601", "the statement returns no rows")
                return
            result: pa.Table = relation.to_arrow_table()
        except duckdb.CatalogException as exc:
            _fail(query, end, "42P01", _first_line(exc))
            return
        except (duckdb.ParserException, duckdb.BinderException) as exc:
            _fail(query, end, "42601", _first_line(exc))
            return
        except duckdb.Error as exc:
            _fail(query, end, "42000", _first_line(exc))
            return
        finally:
            con.close()
        now_ms = int(end * 1000)
        if target is not None and target[0] == "ctas":
            ds = lake.create_from_table(query.sandbox, target[1], result, rng=rng, now_ms=now_ms)
            query.dataset_id = ds.id
        elif target is not None:
            into = tables[target[1]]
            if list(result.schema.names) != list(into.columns):
                _fail(
                    query,
                    end,
                    "42601",
                    f"INSERT INTO {target[1]}: the query's columns {result.schema.names} are "
                    f"not the table's {list(into.columns)}",
                )
                return
            schema = _schema_of(into.batches[0].path)
            lake.append_table(query.sandbox, into.id, result.cast(schema), rng=rng, now_ms=now_ms)
            query.dataset_id = into.id
    query.row_count = result.num_rows
    query.state = "SUCCESS"
    query.finished_at = end


def _schema_of(path: Any) -> pa.Schema:
    return pq.read_schema(path)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def add_routes(app: web.Application) -> None:
    r, base = app.router, f"{QUERY_SERVICE_PATH}/queries"
    r.add_post(base, create_query, name="queries.create")
    r.add_get(base, list_queries, name="queries.list")
    r.add_get(f"{base}/{{id}}", get_query, name="queries.get")
    r.add_patch(f"{base}/{{id}}", patch_query, name="queries.patch")
