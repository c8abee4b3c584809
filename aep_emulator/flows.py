"""Flow Service: dataflows — create, JSON Patch under `If-Match`, enable and disable."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from aep_emulator.common import (
    json_ok,
    new_id,
    read_json,
    require_object,
    stamp,
    state_of,
    touch,
)
from aep_emulator.connections import Collection, invalid
from aep_emulator.errors import FlowError
from aep_emulator.exporting import validate_template
from aep_emulator.facts import DATALAKE_SOURCE_SPEC_ID, SPEC_BY_FLOW_SPEC_ID
from aep_emulator.gateway import caller
from aep_emulator.runs import catch_up, forget_flow, join_datasets, schedule_flow
from aep_emulator.state import Sandbox

TEMPLATE_KEYS = ("foldernameTemplate", "folderNameTemplate")
SCHEDULE_KEYS = {"exportMode", "timeUnit", "interval", "startTime", "endTime", *TEMPLATE_KEYS}
HOURLY = {3, 6, 9, 12}
FLOW_LIMIT_PHRASE = "Maximum number of destinations reached"
FLOW_LIMIT_CODE = 1400  # Adobe documents no code for this refusal (docs/aep-notes.md)
MS_THRESHOLD = 100_000_000_000  # epoch seconds reach this in the year 5138


def six_months_after(epoch_s: int) -> int:
    start = datetime.fromtimestamp(epoch_s, UTC)
    month = start.month + 6
    year, month = start.year + (month - 1) // 12, (month - 1) % 12 + 1
    day = min(start.day, 28)
    return int(start.replace(year=year, month=month, day=day).timestamp())


def _epoch(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"scheduleParams.{name} must be an integer of epoch seconds, got {value!r}")
    if value >= MS_THRESHOLD:
        raise invalid(
            f"scheduleParams.{name}={value} looks like milliseconds; AEP expects epoch seconds"
        )
    if value < 0:
        raise invalid(f"scheduleParams.{name} must not be negative")
    return value


def validate_schedule(value: Any, now_s: int) -> dict[str, Any]:
    """The schedule normalised (enums canonical, default `exportMode` and `endTime`)."""
    if not isinstance(value, dict):
        raise invalid("scheduleParams must be an object")
    unknown = set(value) - SCHEDULE_KEYS
    if unknown:
        raise invalid(
            f"scheduleParams has unknown fields {sorted(unknown)}; allowed: {sorted(SCHEDULE_KEYS)}"
        )
    unit = value.get("timeUnit")
    if not isinstance(unit, str) or unit.lower() not in ("hour", "day"):
        raise invalid(f"scheduleParams.timeUnit must be 'hour' or 'day', got {unit!r}")
    interval = value.get("interval")
    if isinstance(interval, str) and interval.isdigit():
        interval = int(interval)
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise invalid(f"scheduleParams.interval must be an integer, got {interval!r}")
    mode = value.get("exportMode", "FIRST_FULL_THEN_INCREMENTAL")
    if not isinstance(mode, str) or mode.upper() not in (
        "DAILY_FULL_EXPORT",
        "FIRST_FULL_THEN_INCREMENTAL",
    ):
        raise invalid(
            "scheduleParams.exportMode must be DAILY_FULL_EXPORT or "
            f"FIRST_FULL_THEN_INCREMENTAL, got {mode!r}"
        )
    unit, mode = unit.lower(), mode.upper()
    ok = (
        (mode == "DAILY_FULL_EXPORT" and unit == "day" and interval == 0)
        or (mode == "FIRST_FULL_THEN_INCREMENTAL" and unit == "day" and interval == 1)
        or (mode == "FIRST_FULL_THEN_INCREMENTAL" and unit == "hour" and interval in HOURLY)
    )
    if not ok:
        raise invalid(
            f"Unsupported schedule exportMode={mode}, timeUnit={unit}, interval={interval}. "
            "Supported: one-time full export (DAILY_FULL_EXPORT, day, 0), daily incremental "
            "(FIRST_FULL_THEN_INCREMENTAL, day, 1), hourly incremental "
            "(FIRST_FULL_THEN_INCREMENTAL, hour, 3|6|9|12)"
        )
    start = _epoch(value.get("startTime"), "startTime")
    schedule: dict[str, Any] = {
        "exportMode": mode,
        "timeUnit": unit,
        "interval": interval,
        "startTime": start,
    }
    if "endTime" in value:
        schedule["endTime"] = _epoch(value["endTime"], "endTime")
        if schedule["endTime"] <= start:
            raise invalid("scheduleParams.endTime must be after startTime")
    else:
        schedule["endTime"] = six_months_after(now_s)
    for key in TEMPLATE_KEYS:
        if key in value:
            template = value[key]
            if not isinstance(template, str):
                raise invalid(f"scheduleParams.{key} must be a string")
            try:
                validate_template(template)
            except ValueError as exc:
                raise invalid(f"scheduleParams.{key}: {exc}") from None
            schedule[key] = template
    return schedule


def _one_id(body: dict[str, Any], key: str) -> str:
    ids = body.get(key)
    if not isinstance(ids, list) or len(ids) != 1 or not isinstance(ids[0], str):
        raise invalid(f"'{key}' must be a list with exactly one connection id")
    return ids[0]


def _links(box: Sandbox, flow_spec_id: str, source_id: str, target_id: str) -> dict[str, Any]:
    source = box.source_connections.get(source_id)
    if source is None or source["connectionSpec"]["id"] != DATALAKE_SOURCE_SPEC_ID:
        raise invalid(f"Source connection {source_id} not found", 1416)
    target = box.target_connections.get(target_id)
    if target is None:
        raise invalid(f"Target connection {target_id} not found", 1416)
    storage = SPEC_BY_FLOW_SPEC_ID[flow_spec_id]
    if target["connectionSpec"]["id"] != storage.connection_spec_id:
        raise FlowError(
            400,
            1413,
            f"Target connection {target_id} does not belong to flow "
            f"spec {flow_spec_id} ({storage.name} dataset export)",
        )
    return {
        "properties": {"isDestinationFlow": True},
        "sourceConnections": [{"id": source_id, "connectionSpec": source["connectionSpec"]}],
        "targetConnections": [
            {
                "id": target_id,
                "connectionSpec": target["connectionSpec"],
                "baseConnection": target["inheritedAttributes"]["baseConnection"],
            }
        ],
    }


def _operation(now_ms: int, op: str) -> dict[str, Any]:
    return {
        "started": now_ms,
        "updated": now_ms,
        "percentCompleted": 100,
        "status": {"value": "completed", "errors": []},
        "ops": [],
        "operation": op,
    }


async def create_flow(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    if "state" in body:
        raise invalid("State is not allowed in the create flow request", 1410)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise invalid("'name' is required and must be a non-empty string")
    spec = body.get("flowSpec")
    if not isinstance(spec, dict) or spec.get("id") not in SPEC_BY_FLOW_SPEC_ID:
        raise FlowError(400, 1413, "flowSpec.id must be a dataset export flow spec id")
    if not isinstance(spec.get("version"), str):
        raise FlowError(422, 1412, "flowSpec.version is a required field")
    if not isinstance(body.get("description", ""), str):
        raise invalid("'description' must be a string")
    transformations = body.get("transformations", [])
    if not isinstance(transformations, list):
        raise invalid("'transformations' must be a list")
    who = caller(request)
    source_id, target_id = (
        _one_id(body, "sourceConnectionIds"),
        _one_id(body, "targetConnectionIds"),
    )
    inherited = _links(who.sandbox, spec["id"], source_id, target_id)
    now_ms = state_of(request).clock.now_ms()
    if "scheduleParams" not in body:
        raise invalid("'scheduleParams' is required for dataset export flows")
    schedule = validate_schedule(body["scheduleParams"], now_ms // 1000)
    _within_flow_limit(who.sandbox, state_of(request).knobs.max_destination_flows)
    flow_id = new_id()
    flow = {
        "id": flow_id,
        **stamp(request, who),
        "name": name,
        "description": body.get("description", ""),
        "flowSpec": {"id": spec["id"], "version": spec["version"]},
        "state": "enabled",
        "sourceConnectionIds": [source_id],
        "targetConnectionIds": [target_id],
        "inheritedAttributes": inherited,
        "scheduleParams": schedule,
        "transformations": transformations,
        "runs": f"/runs?property=flowId=={flow_id}",
        "lastOperation": _operation(now_ms, "create"),
    }
    who.sandbox.flows[flow_id] = flow
    # Every dataset of the source connection joins the flow when it is created.
    join_datasets(who.sandbox, flow, now_ms / 1000)
    schedule_flow(who.sandbox, flow, now_ms / 1000)
    return json_ok({"id": flow_id, "etag": flow["etag"]}, status=201)


def _within_flow_limit(box: Sandbox, limit: int) -> None:
    """Adobe's destinations guardrail: at most `limit` destination dataflows per sandbox."""
    held = sum(1 for f in box.flows.values() if f["flowSpec"]["id"] in SPEC_BY_FLOW_SPEC_ID)
    if held >= limit:
        raise FlowError(
            400,
            FLOW_LIMIT_CODE,
            f"{FLOW_LIMIT_PHRASE}: sandbox {box.name} has {held} destination dataflows, "
            f"the limit is {limit}. Delete a dataflow before creating another one.",
        )


async def _catch_up(request: web.Request) -> None:
    await catch_up(state_of(request), caller(request).sandbox)


FLOWS = Collection(
    "flows", lambda b: b.flows, lambda b, i: [], refresh=_catch_up, forget=forget_flow
)


def _apply_patch(box: Sandbox, flow: dict[str, Any], ops: Any, now_s: int) -> dict[str, Any]:
    if not isinstance(ops, list) or not ops:
        raise invalid("The body must be a non-empty JSON Patch array", 1455)
    updated = copy.deepcopy(flow)
    for op in ops:
        if (
            not isinstance(op, dict)
            or not isinstance(op.get("op"), str)
            or not isinstance(op.get("path"), str)
        ):
            raise invalid(f"Invalid patch instruction {op!r}", 1455)
        verb, path = op["op"].lower(), op["path"]
        if verb not in ("add", "replace", "remove"):
            raise invalid(f"Unsupported patch operation {op['op']!r}", 1434)
        parts = path.strip("/").split("/")
        if verb == "remove":
            if path != "/description":
                raise invalid(f"Path {path} cannot be removed", 1455)
            updated["description"] = ""
        elif parts[0] in ("name", "description") and len(parts) == 1:
            if not isinstance(op.get("value"), str) or (parts[0] == "name" and not op["value"]):
                raise invalid(f"{path} must be a non-empty string", 1455)
            updated[parts[0]] = op["value"]
        elif parts[0] == "scheduleParams" and len(parts) <= 2:
            if len(parts) == 1:
                updated["scheduleParams"] = op.get("value")
            elif isinstance(updated["scheduleParams"], dict):
                updated["scheduleParams"] = {**updated["scheduleParams"], parts[1]: op.get("value")}
            else:  # an earlier op of this patch replaced it with a non-object
                raise invalid("scheduleParams must be an object", 1455)
        elif parts == ["sourceConnectionIds"] or parts == ["targetConnectionIds"]:
            updated[parts[0]] = op.get("value")
        else:
            raise invalid(f"Invalid patch path {path}", 1455)
    updated["scheduleParams"] = validate_schedule(updated["scheduleParams"], now_s)
    source_id = _one_id(updated, "sourceConnectionIds")
    target_id = _one_id(updated, "targetConnectionIds")
    updated["inheritedAttributes"] = _links(box, updated["flowSpec"]["id"], source_id, target_id)
    return updated


async def patch_flow(request: web.Request) -> web.Response:
    await _catch_up(request)  # slots due under the old schedule fire first
    flow = FLOWS.lookup(request)
    if_match = request.headers.get("If-Match")
    if not if_match:
        raise invalid("If-Match header is required to update a flow", 1403)
    if if_match != flow["etag"]:
        raise FlowError(
            412,
            1404,
            f"Supplied version=[{if_match}] does not match the current version on entity=[flows]",
            entity_id=flow["id"],
            entity_type="flows",
        )
    ops = await read_json(request)
    who = caller(request)
    now_ms = state_of(request).clock.now_ms()
    updated = _apply_patch(who.sandbox, flow, ops, now_ms // 1000)
    updated["lastOperation"] = _operation(now_ms, "update")
    flow.clear()
    flow.update(updated)
    # Datasets new to the flow join now; those that stay keep their time; those gone leave.
    join_datasets(who.sandbox, flow, now_ms / 1000)
    schedule_flow(who.sandbox, flow, now_ms / 1000)
    etag = touch(request, who, flow)
    return json_ok({"id": flow["id"], "etag": etag})


async def flow_action(request: web.Request) -> web.Response:
    await _catch_up(request)  # slots due before the change fire first
    flow = FLOWS.lookup(request)
    op = request.query.get("op", "")
    target = {"enable": "enabled", "disable": "disabled"}.get(op.lower())
    if target is None:
        raise invalid(f"Unsupported action op={op!r}: use enable or disable", 1436)
    if flow["state"] == target:
        raise invalid(
            f"The action {op.lower()} cannot be applied on the current state {flow['state']}", 1422
        )
    flow["state"] = target
    now_ms = state_of(request).clock.now_ms()
    flow["lastOperation"] = _operation(now_ms, op.lower())
    # Slots missed while the flow was disabled are not fired when it is enabled again.
    schedule_flow(caller(request).sandbox, flow, now_ms / 1000)
    etag = touch(request, caller(request), flow)
    return json_ok({"id": flow["id"], "etag": etag})
