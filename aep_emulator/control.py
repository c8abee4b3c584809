"""The emulator's own API under `/_emulator` (a path AEP does not use): knobs, journal,
clock, scripted faults, datasets, reset. Not part of AEP; documented in the README."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, deque
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from aep_emulator.common import json_ok, state_of
from aep_emulator.runs import settle
from aep_emulator.settings import Knobs
from aep_emulator.state import ScriptedFault

PREFIX = "/_emulator"
_FAULT = TypeAdapter(ScriptedFault)


class ControlError(web.HTTPBadRequest):
    def __init__(self, message: str, details: Any = None) -> None:
        body = {"error": message, "details": details}
        super().__init__(text=json_dumps(body), content_type="application/json")


def json_dumps(body: Any) -> str:
    return json.dumps(body, default=str)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError("body must be a JSON object")
    return body


def public_knobs(knobs: Knobs) -> dict[str, Any]:
    return knobs.model_dump(mode="json", exclude={"client_secret"})


async def get_config(request: web.Request) -> web.Response:
    return json_ok(public_knobs(state_of(request).knobs))


async def patch_config(request: web.Request) -> web.Response:
    state = state_of(request)
    changes = await _body(request)
    try:
        knobs = Knobs.model_validate({**state.knobs.model_dump(), **changes})
    except ValidationError as exc:
        raise ControlError("invalid knob values", exc.errors(include_url=False)) from None
    if "seed" in changes:
        state.rng = random.Random(knobs.seed)
    if knobs.journal_size != state.knobs.journal_size:
        state.journal = deque(state.journal, maxlen=knobs.journal_size)
    state.knobs = knobs
    return json_ok(public_knobs(knobs))


async def get_journal(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise ControlError("since must be an integer") from None
    op = request.query.get("op")
    entries = [e._asdict() for e in state.journal if e.seq > since and (op is None or e.op == op)]
    return json_ok({"entries": entries, "last_seq": state.journal_seq})


async def get_stats(request: web.Request) -> web.Response:
    """Counts of served requests by operation and status: what benchmarks report."""
    counts: Counter[tuple[str, int]] = Counter((e.op, e.status) for e in state_of(request).journal)
    ops: dict[str, dict[str, int]] = {}
    for (op, status), n in sorted(counts.items()):
        ops.setdefault(op, {})[str(status)] = n
    return json_ok({"ops": ops, "requests": sum(counts.values())})


async def reset(request: web.Request) -> web.Response:
    body = await _body(request)
    state_of(request).reset(datasets=bool(body.get("datasets", False)))
    return json_ok({"reset": True})


async def get_clock(request: web.Request) -> web.Response:
    clock = state_of(request).clock
    return json_ok({"now": clock.now(), "offset": clock.offset})


async def advance_clock(request: web.Request) -> web.Response:
    body = await _body(request)
    seconds = body.get("advance")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ControlError("advance must be a non-negative number of seconds")
    clock = state_of(request).clock
    clock.offset += seconds
    return json_ok({"now": clock.now(), "offset": clock.offset})


async def add_fault(request: web.Request) -> web.Response:
    try:
        fault = _FAULT.validate_python(await _body(request))
    except ValidationError as exc:
        raise ControlError("invalid fault", exc.errors(include_url=False)) from None
    state_of(request).faults.append(fault)
    return json_ok({"faults": len(state_of(request).faults)}, status=201)


async def list_faults(request: web.Request) -> web.Response:
    return json_ok({"faults": _FAULT_LIST.dump_python(state_of(request).faults, mode="json")})


_FAULT_LIST = TypeAdapter(list[ScriptedFault])


async def clear_faults(request: web.Request) -> web.Response:
    state_of(request).faults.clear()
    return json_ok({"faults": 0})


class SeedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sandbox: str = "prod"
    name: str = "features"
    rows: int = Field(default=1_000, ge=0, le=50_000_000)
    count: int = Field(default=1, ge=1, le=10_000)
    seed: int | None = None


class AppendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sandbox: str = "prod"
    rows: int = Field(default=100, ge=1, le=50_000_000)
    seed: int | None = None


async def seed_datasets(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        ask = SeedRequest.model_validate(await _body(request))
    except ValidationError as exc:
        raise ControlError("invalid seed request", exc.errors(include_url=False)) from None
    rng = random.Random(ask.seed if ask.seed is not None else state.rng.random())
    now = state.clock.now_ms()

    def create() -> list[dict[str, Any]]:
        made = []
        for i in range(ask.count):
            name = ask.name if ask.count == 1 else f"{ask.name}_{i + 1:04d}"
            ds = state.lake.create_dataset(ask.sandbox, name, ask.rows, rng=rng, now_ms=now)
            made.append({"id": ds.id, "name": ds.name, "rows": ds.rows, "sandbox": ask.sandbox})
        return made

    return json_ok({"datasets": await asyncio.to_thread(create)}, status=201)


async def append_rows(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        ask = AppendRequest.model_validate(await _body(request))
    except ValidationError as exc:
        raise ControlError("invalid append request", exc.errors(include_url=False)) from None
    dataset_id = request.match_info["id"]
    if state.lake.get(ask.sandbox, dataset_id) is None:
        raise web.HTTPNotFound(
            text=json_dumps({"error": f"no dataset {dataset_id}"}), content_type="application/json"
        )
    rng = random.Random(ask.seed if ask.seed is not None else state.rng.random())
    batch = await asyncio.to_thread(
        state.lake.append_rows,
        ask.sandbox,
        dataset_id,
        ask.rows,
        rng=rng,
        now_ms=state.clock.now_ms(),
    )
    return json_ok({"batch": batch.id, "rows": batch.rows}, status=201)


async def run_files(request: web.Request) -> web.Response:
    """Where a run's files are on this machine: the emulator's stand-in for the bucket."""
    state = state_of(request)
    run_id = request.match_info["id"]
    run = next((r for r in state.all_runs() if r.id == run_id), None)
    if run is None:
        raise web.HTTPNotFound(
            text=json_dumps({"error": f"no run {run_id}"}), content_type="application/json"
        )
    await settle(state, [run])
    files = [] if run.result is None else [str(f) for f in run.result.files]
    # `location`: where the export folder is, the storage server's URI when the run wrote to
    # one (storage_endpoints), else the local folder; `files` are keys there.
    location = str(run.dest_dir) if run.remote is None else run.remote.uri
    return json_ok(
        {
            "id": run.id,
            "status": run.status,
            "folder": str(run.dest_dir),
            "location": location,
            "files": files,
        }
    )


async def health(request: web.Request) -> web.Response:
    return json_ok({"status": "ok"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(f"{PREFIX}/health", health, name="control.health")
    r.add_get(f"{PREFIX}/config", get_config, name="control.config.get")
    r.add_patch(f"{PREFIX}/config", patch_config, name="control.config.patch")
    r.add_get(f"{PREFIX}/journal", get_journal, name="control.journal")
    r.add_get(f"{PREFIX}/stats", get_stats, name="control.stats")
    r.add_post(f"{PREFIX}/reset", reset, name="control.reset")
    r.add_get(f"{PREFIX}/clock", get_clock, name="control.clock.get")
    r.add_post(f"{PREFIX}/clock", advance_clock, name="control.clock.advance")
    r.add_get(f"{PREFIX}/faults", list_faults, name="control.faults.list")
    r.add_post(f"{PREFIX}/faults", add_fault, name="control.faults.add")
    r.add_delete(f"{PREFIX}/faults", clear_faults, name="control.faults.clear")
    r.add_post(f"{PREFIX}/datasets", seed_datasets, name="control.datasets.seed")
    r.add_post(f"{PREFIX}/datasets/{{id}}/batches", append_rows, name="control.datasets.append")
    r.add_get(f"{PREFIX}/runs/{{id}}", run_files, name="control.runs.files")
