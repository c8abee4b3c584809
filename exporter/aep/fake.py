"""`FakeAep`: an in-memory `AepApi` for the engine's unit tests.

It keeps entities in dicts (ids, names, quoted etags, `createdAt` from the injected clock) and
answers as `HttpAep` does against AEP: a young flow is "not ready", a flow spec can be made
"not enabled", a second trigger of a running (flow, dataset) is `RunInProgress`, runs end after
a set time with a set outcome. Failures can be scripted per operation, before or after the
operation takes effect, and every call is counted, so a test can say "exactly one flow was
created". Operation names are the emulator's (`flows.create`, `adhoc.run`, `runs.list`...).
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn

from exporter.aep.adhoc import refusal
from exporter.aep.api import Collection, RunInfo
from exporter.aep.facts import ALREADY_RUNNING_PHRASE, NOT_ENABLED_PHRASE, NOT_READY_MESSAGE
from exporter.aep.queries import QueryInfo
from exporter.clock import Clock
from exporter.errors import NotFoundError, PreconditionFailed, RequestError, SendWindowMissed

RunOutcome = Literal["success", "failed", "partial", "never"]
COLLECTIONS: tuple[Collection, ...] = (
    "connections",
    "sourceConnections",
    "targetConnections",
    "flows",
)
FailureFactory = BaseException | Callable[[], BaseException]
_RUN_ERRORS = {
    "failed": {"code": "ACTIVATION_BATCH-0000-FAILED", "message": "Job aborted."},
    "partial": {"code": "ACTIVATION_BATCH-0002-WARNING", "message": "Completed with warnings."},
}


@dataclass
class FakeRun:
    """A run and what it will turn out to be."""

    id: str
    flow_id: str
    flow_spec_id: str
    dataset_id: str
    created: float
    complete_at: float | None  # None: never completes
    outcome: RunOutcome
    output: tuple[int, int, int]

    def status(self, now: float) -> str:
        if self.complete_at is None or now < self.complete_at:
            return "processing"
        return "failed" if self.outcome == "failed" else "success"

    def view(self, now: float) -> dict[str, Any]:
        """The run as `GET /runs` shows it at `now` (AEP's shape, the fields `RunInfo` reads)."""
        status = self.status(now)
        metrics: dict[str, Any] = {
            "durationSummary": {"startedAtUTC": int(self.created * 1000)},
            "statusSummary": {"status": status, "errors": []},
            "recordSummary": {"sourceSummaries": [{"id": self.dataset_id}]},
        }
        if status != "processing" and self.complete_at is not None:
            metrics["durationSummary"]["completedAtUTC"] = int(self.complete_at * 1000)
        if status == "success":
            size, records, files = self.output
            metrics["sizeSummary"] = {"outputBytes": size}
            metrics["recordSummary"]["outputRecordCount"] = records
            metrics["fileSummary"] = {"outputFileCount": files}
        if status != "processing" and self.outcome in ("failed", "partial"):
            metrics["statusSummary"]["errors"] = [_RUN_ERRORS[self.outcome]]
        return {
            "id": self.id,
            "flowId": self.flow_id,
            "flowSpec": {"id": self.flow_spec_id, "version": "1.0"},
            "createdAt": int(self.created * 1000),
            "metrics": metrics,
        }


@dataclass
class FakeQuery:
    """A Query Service query and what it will turn out to be."""

    id: str
    name: str
    table: str
    created: float
    complete_at: float
    outcome: Literal["success", "failed"]
    rows: int
    killed: bool = False

    def info(self, now: float) -> QueryInfo:
        if self.killed:
            state = "KILLED"
        elif now < self.complete_at:
            state = "IN_PROGRESS"
        else:
            state = "SUCCESS" if self.outcome == "success" else "FAILED"
        errors = (("42601", "syntax error at or near the fake"),) if state == "FAILED" else ()
        return QueryInfo(
            id=self.id,
            name=self.name,
            state=state,
            created_ms=int(self.created * 1000),
            rows=self.rows if state == "SUCCESS" else 0,
            errors=errors,
        )


@dataclass
class _Failure:
    exc: FailureFactory
    times: int
    after: bool

    def make(self) -> BaseException:
        return self.exc if isinstance(self.exc, BaseException) else self.exc()


def _etag() -> str:
    return f'"{uuid.uuid4().hex[:8]}-0000-0200-0000-{uuid.uuid4().hex[:12]}"'


def _bad(message: str, code: int = 1400) -> RequestError:
    return RequestError(message, status=400, code=f"FLOW-{code}-400")


class FakeAep:
    """In-memory `AepApi`. Change `ready_after_s`, `run_duration_s`, `run_outcome`, `output`
    and `adhoc_disabled_flow_specs` at any time; new runs and triggers follow them."""

    def __init__(
        self,
        clock: Clock,
        *,
        ready_after_s: float = 600.0,
        run_duration_s: float = 20.0,
        run_outcome: RunOutcome = "success",
        adhoc_disabled_flow_specs: Iterable[str] = (),
        output: tuple[int, int, int] = (1024, 100, 1),
    ) -> None:
        self.clock = clock
        self.ready_after_s = ready_after_s
        self.run_duration_s = run_duration_s
        self.run_outcome: RunOutcome = run_outcome
        self.adhoc_disabled_flow_specs = set(adhoc_disabled_flow_specs)
        self.output = output
        self.entities: dict[Collection, dict[str, dict[str, Any]]] = {c: {} for c in COLLECTIONS}
        self.runs: dict[str, FakeRun] = {}
        self.queries: dict[str, FakeQuery] = {}
        self.tables: dict[str, str] = {}  # Query Service table -> dataset id
        self.query_duration_s = 30.0
        self.query_outcome: Literal["success", "failed"] = "success"
        self.calls: Counter[str] = Counter()
        self._failures: dict[str, deque[_Failure]] = {}

    async def __aenter__(self) -> FakeAep:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release; here so that the fake and `HttpAep` are used alike."""

    async def check_token(self) -> None:
        """Fails like the others: `fail_next("check_token", ...)`."""
        self._begin("check_token")

    async def drain(self, within_s: float) -> int:
        """Nothing is ever on the wire."""
        return 0

    def fail_next(
        self, operation: str, exc: FailureFactory, times: int = 1, *, after: bool = False
    ) -> None:
        """Make the next `times` calls of `operation` raise `exc` (an exception, or a factory
        of one): before taking effect, or with `after=True` once it has (a lost answer)."""
        self._failures.setdefault(operation, deque()).append(_Failure(exc, times, after))

    def _begin(self, operation: str) -> _Failure | None:
        self.calls[operation] += 1
        queue = self._failures.get(operation)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.popleft()
        if not failure.after:
            raise failure.make()
        return failure

    def _now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    def _sorted(self, entities: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        # Among equal stamps (a clock that stands still) the later insertion is the newer.
        newest = sorted(enumerate(entities), key=lambda p: (p[1]["createdAt"], p[0]), reverse=True)
        return [copy.deepcopy(e) for _, e in newest]

    def _check_links(self, collection: Collection, body: Mapping[str, Any]) -> None:
        def one(field: str, where: Collection) -> None:
            ids = body.get(field)
            ids = [ids] if isinstance(ids, str) else ids
            if not isinstance(ids, list) or len(ids) != 1 or ids[0] not in self.entities[where]:
                raise _bad(f"{field} must name one existing {where} entity", 1416)

        if collection == "targetConnections":
            one("baseConnectionId", "connections")
        elif collection == "flows":
            one("sourceConnectionIds", "sourceConnections")
            one("targetConnectionIds", "targetConnections")

    async def create(self, collection: Collection, body: Mapping[str, Any]) -> str:
        """Store a copy of `body` as a new entity (duplicates by name are allowed, as in AEP)."""
        failure = self._begin(f"{collection}.create")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad("'name' is required and must be a non-empty string")
        self._check_links(collection, body)
        now, etag = self._now_ms(), _etag()
        entity = copy.deepcopy(dict(body))
        entity.update(
            id=str(uuid.uuid4()),
            createdAt=now,
            updatedAt=now,
            etag=etag,
            version=etag,
            state="enabled",
        )
        self.entities[collection][entity["id"]] = entity
        if failure is not None:
            raise failure.make()
        return str(entity["id"])

    async def find_by_name(self, collection: Collection, name: str) -> list[dict[str, Any]]:
        self._begin(f"{collection}.list")
        return self._sorted(e for e in self.entities[collection].values() if e.get("name") == name)

    async def get(self, collection: Collection, entity_id: str) -> dict[str, Any] | None:
        self._begin(f"{collection}.get")
        found = self.entities[collection].get(entity_id)
        return copy.deepcopy(found) if found is not None else None

    def _users(self, collection: Collection, entity_id: str) -> list[str]:
        flows = self.entities["flows"].values()
        if collection == "sourceConnections":
            return [f["id"] for f in flows if entity_id in f["sourceConnectionIds"]]
        if collection == "targetConnections":
            return [f["id"] for f in flows if entity_id in f["targetConnectionIds"]]
        if collection == "connections":
            targets = {
                t["id"]
                for t in self.entities["targetConnections"].values()
                if t.get("baseConnectionId") == entity_id
            }
            return [f["id"] for f in flows if targets & set(f["targetConnectionIds"])]
        return []

    async def delete(self, collection: Collection, entity_id: str) -> None:
        failure = self._begin(f"{collection}.delete")
        if entity_id in self.entities[collection]:
            users = self._users(collection, entity_id)
            if users:
                raise _bad(f"{entity_id} is in use by flows {sorted(users)}", 1418)
            del self.entities[collection][entity_id]
        if failure is not None:
            raise failure.make()

    def _flow(self, flow_id: str) -> dict[str, Any]:
        flow = self.entities["flows"].get(flow_id)
        if flow is None:
            raise NotFoundError(
                f"flows not found with id = [{flow_id}]", status=404, code="FLOW-1101-404"
            )
        return flow

    def _touch(self, entity: dict[str, Any]) -> str:
        etag = _etag()
        entity.update(etag=etag, version=etag, updatedAt=self._now_ms())
        return etag

    async def patch_flow(self, flow_id: str, etag: str, ops: Sequence[Mapping[str, Any]]) -> str:
        failure = self._begin("flows.patch")
        flow = self._flow(flow_id)
        if etag != flow["etag"]:
            raise PreconditionFailed(
                f"Supplied version=[{etag}] does not match the current version on entity=[flows]",
                status=412,
                code="FLOW-1404-412",
            )
        updated = copy.deepcopy(flow)
        for op in ops:
            verb, parts = (
                str(op.get("op", "")).lower(),
                str(op.get("path", "")).strip("/").split("/"),
            )
            if verb not in ("add", "replace", "remove") or not parts[0] or len(parts) > 2:
                raise _bad(f"Invalid patch instruction {dict(op)!r}", 1455)
            if verb == "remove":
                updated.pop(parts[0], None)
            elif len(parts) == 1:
                updated[parts[0]] = copy.deepcopy(op.get("value"))
            else:
                updated.setdefault(parts[0], {})[parts[1]] = copy.deepcopy(op.get("value"))
        flow.clear()
        flow.update(updated)
        new_etag = self._touch(flow)
        if failure is not None:
            raise failure.make()
        return new_etag

    async def flow_action(self, flow_id: str, op: Literal["enable", "disable"]) -> str:
        failure = self._begin("flows.action")
        flow = self._flow(flow_id)
        state = f"{op.lower()}d"
        if flow["state"] != state:
            flow["state"] = state
            self._touch(flow)
        if failure is not None:
            raise failure.make()
        return str(flow["etag"])

    def _refuse(self, text: str, flow_id: str) -> NoReturn:
        raise refusal(RequestError(text, status=400, operation="adhoc.run"), flow_id)

    async def trigger(self, flow_id: str, dataset_id: str) -> str:
        return (await self.trigger_many(flow_id, [dataset_id]))[dataset_id]

    async def trigger_many(
        self, flow_id: str, dataset_ids: Sequence[str], *, send_by: float | None = None
    ) -> dict[str, str]:
        """All or nothing, as the emulator: every dataset is checked before any run starts."""
        if send_by is not None and self.clock.monotonic() > send_by:
            self.calls["adhoc.unsent"] += 1
            raise SendWindowMissed("not sent: past its send-by time", operation="adhoc.run")
        failure = self._begin("adhoc.run")
        for dataset_id in dataset_ids:
            self._check_trigger(flow_id, dataset_id)
        started = {d: self._start(flow_id, d) for d in dataset_ids}
        if failure is not None:
            raise failure.make()
        return started

    async def list_prefixed(self, collection: Collection, prefix: str) -> list[dict[str, Any]]:
        self._begin(f"{collection}.list")
        return self._sorted(
            e for e in self.entities[collection].values() if str(e.get("name")).startswith(prefix)
        )

    async def count_destination_flows(self) -> int:
        self._begin("flows.list")
        return len(self.entities["flows"])

    async def flow_busy(self, flow_id: str, since_ms: int) -> bool:
        self._begin("runs.list")
        now = self.clock.time()
        return any(
            r.flow_id == flow_id and (r.status(now) == "processing" or r.created * 1000 >= since_ms)
            for r in self.runs.values()
        )

    def _check_trigger(self, flow_id: str, dataset_id: str) -> None:
        flow = self.entities["flows"].get(flow_id)
        if flow is None:
            self._refuse(f"Flow for id {flow_id} is incorrect. Error is [Flow not found].", flow_id)
        spec_id = str((flow.get("flowSpec") or {}).get("id", ""))
        if spec_id in self.adhoc_disabled_flow_specs:
            self._refuse(
                f"Flow for id {flow_id} is incorrect. Error is [{NOT_ENABLED_PHRASE}={spec_id}.]",
                flow_id,
            )
        if flow["state"] != "enabled":
            self._refuse(
                f"Flow for id {flow_id} is incorrect. Error is [Flow is disabled.]", flow_id
            )
        now = self.clock.time()
        if now * 1000 < flow["createdAt"] + self.ready_after_s * 1000:
            self._refuse(NOT_READY_MESSAGE, flow_id)
        source = self.entities["sourceConnections"].get(flow["sourceConnectionIds"][0], {})
        datasets = {d.get("dataSetId") for d in (source.get("params") or {}).get("datasets", [])}
        if dataset_id not in datasets:
            self._refuse(f"Dataset {dataset_id} is not part of flow {flow_id}.", flow_id)
        key = (flow_id, dataset_id)
        for busy in self.runs.values():
            if (busy.flow_id, busy.dataset_id) == key and busy.status(now) == "processing":
                self._refuse(
                    f"{ALREADY_RUNNING_PHRASE} {dataset_id} for order {flow_id} "
                    f"with run id {busy.id}",
                    flow_id,
                )

    def _start(self, flow_id: str, dataset_id: str) -> str:
        flow = self.entities["flows"][flow_id]
        spec_id = str((flow.get("flowSpec") or {}).get("id", ""))
        now = self.clock.time()
        never = self.run_outcome == "never"
        run = FakeRun(
            id=str(uuid.uuid4()),
            flow_id=flow_id,
            flow_spec_id=spec_id,
            dataset_id=dataset_id,
            created=now,
            complete_at=None if never else now + self.run_duration_s,
            outcome=self.run_outcome,
            output=self.output,
        )
        self.runs[run.id] = run
        return run.id

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunInfo]:
        self._begin("runs.list")
        now = self.clock.time()
        return {i: RunInfo.parse(self.runs[i].view(now)) for i in run_ids if i in self.runs}

    async def runs_of_flow(self, flow_id: str, since_ms: int) -> list[RunInfo]:
        self._begin("runs.list")
        now = self.clock.time()
        runs = [RunInfo.parse(r.view(now)) for r in self.runs.values() if r.flow_id == flow_id]
        return sorted(
            (r for r in runs if r.created_at_ms >= since_ms),
            key=lambda r: r.created_at_ms,
            reverse=True,
        )

    async def newest_run(self, flow_id: str, since_ms: int) -> RunInfo | None:
        runs = await self.runs_of_flow(flow_id, since_ms)  # (one runs.list, newest first)
        return runs[0] if runs else None

    # -- Query Service (exporter.aep.queries.QueryApi) -------------------------------------

    async def submit_query(self, body: Mapping[str, Any]) -> QueryInfo:
        """A query that ends `query_duration_s` later with `query_outcome`; a successful one
        makes its table (a dataset id) when it ends."""
        failure = self._begin("queries.create")
        target = body.get("ctasParameters") or body.get("insertIntoParameters") or {}
        now = self.clock.time()
        query = FakeQuery(
            id=str(uuid.uuid4()),
            name=str(body.get("name", "")),
            table=str(target.get("datasetName", "")),
            created=now,
            complete_at=now + self.query_duration_s,
            outcome=self.query_outcome,
            rows=self.output[1],
        )
        self.queries[query.id] = query
        if failure is not None:
            raise failure.make()
        return query.info(now)

    def _query_info(self, query: FakeQuery) -> QueryInfo:
        info = query.info(self.clock.time())
        if info.succeeded and query.table:
            self.tables.setdefault(query.table, f"ds-{query.table}")
        return info

    async def get_query(self, query_id: str) -> QueryInfo | None:
        self._begin("queries.get")
        query = self.queries.get(query_id)
        return None if query is None else self._query_info(query)

    async def queries_named(self, name: str, since_ms: int) -> list[QueryInfo]:
        self._begin("queries.list")
        found = [self._query_info(q) for q in self.queries.values() if q.name == name]
        return sorted((q for q in found if q.created_ms >= since_ms), key=lambda q: q.created_ms)

    async def cancel_query(self, query_id: str) -> None:
        self._begin("queries.patch")
        query = self.queries.get(query_id)
        if query is not None and not query.info(self.clock.time()).terminal:
            query.killed = True

    async def dataset_of_table(self, table: str) -> str | None:
        self._begin("connectionSpecs.configs")
        return self.tables.get(table)
