"""Ad hoc dataset export runs: triggering, the run life cycle and the runs API.

A run's outcome and duration are drawn when it is triggered. It reads `processing` until the
emulated clock passes its completion time; the first read after that performs the export
(in a worker thread) and only then reports `success`, so files exist whenever a client sees
success. Terminal runs never change, so their JSON is rendered once and reused.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from aiohttp import web

from aep_emulator.common import dumps, new_id, read_json, state_of
from aep_emulator.encryption import EncryptionError, encrypt_files
from aep_emulator.errors import AdhocError, FlowError, not_found
from aep_emulator.exporting import ExportResult, export_batches, render_folder
from aep_emulator.facts import (
    ADHOC_DATASET_ACCEPT,
    ALREADY_RUNNING_PHRASE,
    FLOW_SERVICE_PATH,
    NOT_ENABLED_PHRASE,
    NOT_READY_MESSAGE,
    SPEC_BY_CONNECTION_ID,
    Compression,
    FileType,
    StorageType,
)
from aep_emulator.gateway import caller
from aep_emulator.query import parse_list_query
from aep_emulator.state import EmulatorState, Run, Sandbox
from aep_emulator.storage import DestinationError, remote_for

log = structlog.get_logger("aep_emulator")
FAILED_ERRORS = [{"code": "ACTIVATION_BATCH-0000-FAILED", "message": "Job aborted."}]
DAY_S, HOUR_S = 86_400, 3_600
MAX_CATCH_UP_SLOTS = 48  # slots a flow fires at most when the clock has jumped over many
PARTIAL_ERRORS = [
    {
        "code": "EXPORT-0002-200",  # Info.code must match ABC-123-400 (destinations.yaml)
        "type": "Warning",
        "count": 1,
        "message": "Export completed with warnings: one file write was retried.",
    }
]


def _wants_dataset_export(accept: str) -> bool:
    want_type, _, want_params = ADHOC_DATASET_ACCEPT.partition(";")
    for media in accept.split(","):
        kind, _, params = media.partition(";")
        if kind.strip().lower() == want_type and params.replace(" ", "") == want_params.replace(
            " ", ""
        ):
            return True
    return False


def _bad(text: str) -> AdhocError:
    return AdhocError(400, f"Invalid parameter: {text}")


def _requests(body: Any) -> list[tuple[str, list[str]]]:
    info = body.get("activationInfo") if isinstance(body, dict) else None
    dests = info.get("destinations") if isinstance(info, dict) else None
    if not isinstance(dests, list) or not dests:
        raise _bad("activationInfo.destinations must be a non-empty list")
    out = []
    for i, dest in enumerate(dests):
        where = f"activationInfo.destinations[{i}]"
        if not isinstance(dest, dict) or not isinstance(dest.get("flowId"), str):
            raise _bad(f"{where}.flowId must be a string")
        datasets = dest.get("datasets")
        if (
            not isinstance(datasets, list)
            or not datasets
            or not all(isinstance(d, dict) and isinstance(d.get("id"), str) for d in datasets)
        ):
            raise _bad(f'{where}.datasets must be a non-empty list of {{"id": ...}}')
        out.append((dest["flowId"], [d["id"] for d in datasets]))
    # One run per flow and dataset at a time, within a request as across requests.
    seen: set[tuple[str, str]] = set()
    for flow_id, dataset_ids in out:
        for dataset_id in dataset_ids:
            if (flow_id, dataset_id) in seen:
                raise _bad(f"Dataset {dataset_id} is asked more than once for flow {flow_id}.")
            seen.add((flow_id, dataset_id))
    return out


def destination_dir(state: EmulatorState, box: Sandbox, flow: dict[str, Any]) -> Path:
    """The local folder standing for the flow's bucket, container, SFTP root or DLZ."""
    target = box.target_connections[flow["targetConnectionIds"][0]]
    params = target["params"]
    storage = SPEC_BY_CONNECTION_ID[target["connectionSpec"]["id"]].storage
    secret = box.secrets.get(target["baseConnectionId"], {})
    root = state.destinations_dir / storage.value
    if storage in (StorageType.S3, StorageType.GCS):
        root = root / params["bucketName"]
    elif storage == StorageType.AZURE_BLOB:
        parts = dict(p.split("=", 1) for p in secret["connectionString"].split(";") if "=" in p)
        root = root / parts["AccountName"] / params["container"]
    elif storage == StorageType.ADLS_GEN2:
        url = secret["url"]
        if url.startswith("abfss://"):  # abfss://<container>@<account>.dfs.core.windows.net/…
            container, _, rest = url.removeprefix("abfss://").partition("@")
            account, _, url_folder = rest.partition("/")
            root = root / account.split(".", 1)[0] / container / url_folder.strip("/")
        else:
            root = root / url.removeprefix("https://").split(".", 1)[0]
    elif storage == StorageType.SFTP:
        root = root / secret["domain"]
    else:
        root = root / box.name / "dlz-destination"
    folder: str = params.get("remotePath", params.get("path", ""))
    return root / folder.strip("/")


def _subfolder(
    box: Sandbox, flow: dict[str, Any], dataset_id: str, dataset_name: str, when: float
) -> str:
    """The export folder below the target's path, from the flow's folder template."""
    schedule = flow["scheduleParams"]
    template = schedule.get("foldernameTemplate", schedule.get("folderNameTemplate"))
    target = box.target_connections[flow["targetConnectionIds"][0]]
    base = box.connections[target["baseConnectionId"]]
    return render_folder(
        template,
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        export_time=datetime.fromtimestamp(when, UTC),
        destination_name=base["name"],
        destination_instance_id=flow["id"],
        destination_instance_name=flow["name"],
        sandbox_name=box.name,
        organization_name=box.org_id,
    )


def _folder(
    state: EmulatorState,
    box: Sandbox,
    flow: dict[str, Any],
    dataset_id: str,
    dataset_name: str,
    when: float,
) -> Path:
    sub = _subfolder(box, flow, dataset_id, dataset_name, when)
    folder = (destination_dir(state, box, flow) / sub).resolve()
    if not folder.is_relative_to(state.destinations_dir.resolve()):
        raise _bad(f"the folder template of flow {flow['id']} leaves the destination")
    return folder


def _check(state: EmulatorState, box: Sandbox, flow_id: str, dataset_ids: list[str]) -> None:
    flow = box.flows.get(flow_id)
    if flow is None:
        raise _bad(f"Flow for id {flow_id} is incorrect. Error is [Flow not found].")
    spec_id = flow["flowSpec"]["id"]
    if spec_id in state.knobs.adhoc_disabled_flow_specs:
        raise _bad(
            f"Flow for id {flow_id} is incorrect. Error is [{NOT_ENABLED_PHRASE}={spec_id}.]"
        )
    if flow["state"] != "enabled":
        raise _bad(f"Flow for id {flow_id} is incorrect. Error is [Flow is disabled.]")
    # Each dataset is "not ready" for a while after it joined the flow (at the flow's creation
    # or when a PATCH of sourceConnectionIds brought it in); one such dataset refuses the call.
    joined = box.joined.get(flow_id, {})
    window, now = state.knobs.scaled(state.knobs.not_ready_window_s), state.clock.now()
    for dataset_id in dataset_ids:
        since = joined.get(dataset_id)
        if since is None:
            raise _bad(f"Dataset {dataset_id} is not part of flow {flow_id}.")
        if now < since + window:
            raise _bad(NOT_READY_MESSAGE.removeprefix("Invalid parameter: "))
    for dataset_id in dataset_ids:
        if state.lake.get(box.name, dataset_id) is None:
            raise _bad(f"Dataset {dataset_id} no longer exists.")
        active = box.active_runs.get((flow_id, dataset_id))
        if active is not None and not active.terminal:
            raise _bad(
                f"{ALREADY_RUNNING_PHRASE} {dataset_id} for order {flow_id} with run id {active.id}"
            )


def _start(
    state: EmulatorState,
    box: Sandbox,
    client_id: str,
    flow: dict[str, Any],
    dataset_id: str,
    *,
    at: float | None = None,
) -> Run:
    """A new run of the flow for one dataset, created now or at `at` (a scheduled slot that
    is being caught up: it sees only the batches that existed then)."""
    knobs, rng = state.knobs, state.rng
    now = state.clock.now() if at is None else at
    dataset = state.lake.get(box.name, dataset_id)
    if dataset is None:
        raise _bad(f"Dataset {dataset_id} no longer exists.")
    key = (flow["id"], dataset_id)
    batches = dataset.batches
    if at is not None:
        batches = tuple(b for b in batches if b.created_ms <= at * 1000)
    if flow["scheduleParams"]["exportMode"] == "FIRST_FULL_THEN_INCREMENTAL":
        done = box.exported_batches.get(key, set())
        batches = tuple(b for b in batches if b.id not in done)
    draw = rng.random()
    outcome: Literal["success", "failed", "partial"] = (
        "failed"
        if draw < knobs.run_failure_rate
        else "partial"
        if draw < knobs.run_failure_rate + knobs.run_partial_rate
        else "success"
    )
    target = box.target_connections[flow["targetConnectionIds"][0]]
    params = target["params"]
    storage = SPEC_BY_CONNECTION_ID[target["connectionSpec"]["id"]].storage
    try:
        remote = remote_for(
            knobs.endpoints(),
            storage,
            params,
            box.secrets.get(target["baseConnectionId"], {}),
            _subfolder(box, flow, dataset_id, dataset.name, now),
        )
    except DestinationError as exc:
        raise _bad(exc.message) from None
    run = Run(
        id=new_id(),
        client_id=client_id,
        flow_id=flow["id"],
        flow_spec=flow["flowSpec"],
        dataset_id=dataset_id,
        sandbox=box,
        created=now,
        complete_at=now + knobs.scaled(knobs.run_duration_s.draw(rng)),
        outcome=outcome,
        batches=batches,
        dest_dir=_folder(state, box, flow, dataset_id, dataset.name, now),
        file_type=params["datasetFileType"].upper(),
        compression=params["compression"].upper(),
        input_bytes=sum(b.path.stat().st_size for b in batches),
        remote=remote,
        public_key=box.encryption_keys.get(target["baseConnectionId"]),
    )
    box.runs[run.id] = run
    box.runs_by_flow.setdefault(run.flow_id, {})[run.id] = run
    box.active_runs[key] = run
    return run


async def adhoc_run(request: web.Request) -> web.Response:
    """`POST /data/core/activation/disflowprovider/adhocrun` for datasets."""
    if not _wants_dataset_export(request.headers.get("Accept", "")):
        raise _bad(
            "exportIds are required for an audience ad hoc activation; dataset exports "
            f"must send 'Accept: {ADHOC_DATASET_ACCEPT}'"
        )
    try:
        body = await read_json(request)
    except FlowError as exc:  # the ad hoc service answers in its own `{message}` envelope
        raise _bad(exc.message) from None
    wanted = _requests(body)
    state, who = state_of(request), caller(request)
    cap = state.knobs.adhoc_max_datasets_per_call
    asked = sum(len(dataset_ids) for _, dataset_ids in wanted)
    if asked > cap:
        raise _bad(
            f"activationInfo.destinations names {asked} datasets; one ad hoc call may export "
            f"at most {cap} datasets. Split the datasets over several calls."
        )
    await catch_up(state, who.sandbox)
    # Runs end on their own: one whose time is over must neither block this trigger nor hide
    # the batches it exported from an incremental run, whether or not anyone polled it.
    active = (who.sandbox.active_runs.get((f, d)) for f, ds in wanted for d in ds)
    await settle(state, [r for r in active if r is not None])
    for flow_id, dataset_ids in wanted:
        _check(state, who.sandbox, flow_id, dataset_ids)
    base = f"{request.scheme}://{request.host}{FLOW_SERVICE_PATH}/runs/"
    destinations = []
    for flow_id, dataset_ids in wanted:
        flow = who.sandbox.flows[flow_id]
        started = [_start(state, who.sandbox, who.client_id, flow, d) for d in dataset_ids]
        for run in started:
            run.request_id = request.headers.get("x-request-id", "")
        destinations.append(
            {
                "datasets": [
                    {"id": r.dataset_id, "flowId": flow_id, "statusURL": base + r.id}
                    for r in started
                ]
            }
        )
    return web.Response(body=dumps({"destinations": destinations}), content_type="application/json")


def _finish(state: EmulatorState, run: Run, rng: random.Random) -> None:
    """Blocking part of completion: write the files (in a worker thread): into the local
    folder, or into a staging folder and from there to the storage server; encrypted first
    when the base connection asks for it."""
    if run.outcome == "failed":
        return
    staging = None if run.remote is None else Path(tempfile.mkdtemp(prefix="aep-emulator-run-"))
    try:
        written = export_batches(
            run.batches,
            run.dest_dir if staging is None else staging,
            file_type=FileType(run.file_type),
            compression=Compression(run.compression),
            rng=rng,
            max_rows_per_file=state.knobs.max_rows_per_file,
        )
        files = written.files
        if run.public_key is not None and files:
            try:
                files = encrypt_files(files, run.public_key)
            except BaseException:
                for path in files:
                    path.unlink(missing_ok=True)
                raise
        size = sum(p.stat().st_size for p in files)
        if run.remote is not None:
            files = tuple(Path(key) for key in run.remote.upload(files))
        run.result = ExportResult(files, written.records, size)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


async def _complete(state: EmulatorState, run: Run) -> None:
    rng = random.Random(state.rng.random())
    try:
        await asyncio.to_thread(_finish, state, run, rng)
    except DestinationError as exc:
        run.outcome = "failed"
        # A refused credential fails the run as AEP's failed runs read (docs/aep-notes.md).
        run.errors = [
            {"code": "ACTIVATION_BATCH-0000-FAILED", "message": f"Job aborted: {exc.message}"}
            if exc.refused
            else {
                "code": "CONNECTOR-1005-500",
                "message": f"Writing to the destination failed: {exc.message}",
            }
        ]
    except EncryptionError as exc:
        run.outcome = "failed"
        run.errors = [
            {"code": "CONNECTOR-1005-500", "message": f"Encrypting the files failed: {exc}"}
        ]
    except (OSError, ValueError) as exc:
        run.outcome = "failed"
        run.errors = [
            {"code": "CONNECTOR-1005-500", "message": f"Writing to the destination failed: {exc}"}
        ]
    except Exception as exc:  # a bug must fail the run, not wedge it in processing
        log.exception("emulator_run_failed", run_id=run.id)
        run.outcome = "failed"
        run.errors = [{"code": "ACTIVATION_BATCH-0000-FAILED", "message": f"Job aborted: {exc}"}]
    box = run.sandbox
    if run.outcome == "failed":
        run.status = "failed"
        run.errors = run.errors or list(FAILED_ERRORS)
    else:
        run.status = "success"
        run.errors = list(PARTIAL_ERRORS) if run.outcome == "partial" else []
        # A dataset that left the flow since (or left and joined again) starts afresh.
        since = box.joined.get(run.flow_id, {}).get(run.dataset_id)
        if since is not None and since <= run.created:
            box.exported_batches.setdefault((run.flow_id, run.dataset_id), set()).update(
                b.id for b in run.batches
            )
    run.view = run.view_bytes = None
    if box.active_runs.get((run.flow_id, run.dataset_id)) is run:
        del box.active_runs[(run.flow_id, run.dataset_id)]
    flow = box.flows.get(run.flow_id)
    if flow is not None:
        flow["lastRunDetails"] = {
            "id": run.id,
            "state": run.status,
            "startedAtUTC": int(run.created * 1000),
            "completedAtUTC": int(run.complete_at * 1000),
        }


async def settle(state: EmulatorState, runs: Iterable[Run]) -> None:
    """Complete every run whose time has come; wait until their files are written."""
    now = state.clock.now()
    pending = []
    for run in runs:
        if run.status == "processing" and now >= run.complete_at:
            if run.finishing is None:
                run.finishing = asyncio.create_task(
                    _complete(state, run), name=f"emulator-run-{run.id}"
                )
            pending.append(run.finishing)
    if pending:
        await asyncio.shield(asyncio.gather(*pending))


def render(run: Run) -> dict[str, Any]:
    started = int(run.created * 1000)
    input_records = sum(b.rows for b in run.batches)
    status: dict[str, Any] = {"status": run.status, "errors": run.errors}
    metrics: dict[str, Any] = {
        "durationSummary": {"startedAtUTC": started},
        "sizeSummary": {"inputBytes": run.input_bytes},
        "recordSummary": {
            "inputRecordCount": input_records,
            "sourceSummaries": [{"id": run.dataset_id, "inputRecordCount": input_records}],
        },
        "fileSummary": {"inputFileCount": len(run.batches)},
        "statusSummary": status,
    }
    updated = started
    if run.terminal:
        completed = int(run.complete_at * 1000)
        updated = completed
        metrics["durationSummary"]["completedAtUTC"] = completed
    if run.status == "success" and run.result is not None:
        metrics["sizeSummary"]["outputBytes"] = run.result.bytes
        metrics["recordSummary"].update(
            outputRecordCount=run.result.records, skippedRecordCount=0, failedRecordCount=0
        )
        metrics["fileSummary"]["outputFileCount"] = len(run.result.files)
    user = f"{run.client_id}@AdobeID"
    box = run.sandbox
    return {
        "id": run.id,
        "createdAt": started,
        "updatedAt": updated,
        "createdBy": user,
        "updatedBy": user,
        "createdClient": run.client_id,
        "updatedClient": run.client_id,
        "sandboxId": box.id,
        "sandboxName": box.name,
        "imsOrgId": box.org_id,
        "flowId": run.flow_id,
        "flowSpec": run.flow_spec,
        "providerRefId": run.id,
        "etag": f'"{run.id[:8]}-{run.status}"',
        "metrics": metrics,
        "activities": [
            {
                "id": f"{run.id}-export",
                "name": "dataset-export",
                "updatedAtUTC": updated,
                "durationSummary": metrics["durationSummary"],
                "statusSummary": {"status": run.status},
            }
        ],
    }


def run_view(run: Run) -> dict[str, Any]:
    """The run as AEP shows it, rendered once per status."""
    if run.view is None:
        run.view = render(run)
        run.view_bytes = dumps(run.view)
    return run.view


def run_bytes(run: Run) -> bytes:
    if run.view_bytes is None:
        run_view(run)
    assert run.view_bytes is not None
    return run.view_bytes


async def get_run(request: web.Request) -> web.Response:
    run_id = request.match_info["id"]
    box = caller(request).sandbox
    await catch_up(state_of(request), box)
    run = box.runs.get(run_id)
    if run is None:
        raise not_found("runs", run_id)
    await settle(state_of(request), [run])
    return web.Response(
        body=b'{"items":[' + run_bytes(run) + b"]}", content_type="application/json"
    )


async def list_runs(request: web.Request) -> web.Response:
    query = parse_list_query(request.query)
    box = caller(request).sandbox
    await catch_up(state_of(request), box)
    ids, flows = query.id_candidates(), query.candidates("flowId")
    stored = box.runs
    if ids is not None:
        runs = [run for i in ids if (run := stored.get(i)) is not None]  # one lookup per id
    elif flows is not None:  # a flow's runs, not every run of the sandbox
        runs = [run for f in flows for run in box.runs_by_flow.get(f, {}).values()]
    else:
        runs = list(stored.values())
    await settle(state_of(request), runs)
    by_id = {r.id: r for r in runs}
    body = query.apply((run_view(r) for r in runs), base_path="/runs")  # as list_response
    if "items" not in body:
        return web.Response(body=dumps(body), content_type="application/json")
    # Splice the cached JSON of each run rather than serialising the page again.
    page = b",".join(run_bytes(by_id[item["id"]]) for item in body["items"])
    links = b"" if "_links" not in body else b',"_links":' + dumps(body["_links"])
    # One join: each `+` would copy the whole page (100 runs: over 100 kB) once more.
    return web.Response(
        body=b"".join((b'{"items":[', page, b"]", links, b"}")), content_type="application/json"
    )


# -- the datasets of a flow, and its scheduled runs --------------------------------------------


def flow_datasets(box: Sandbox, flow: dict[str, Any]) -> list[str]:
    """The datasets the flow exports: those of its source connection, in their order."""
    source = box.source_connections[flow["sourceConnectionIds"][0]]
    return list(dict.fromkeys(d["dataSetId"] for d in source["params"]["datasets"]))


def join_datasets(box: Sandbox, flow: dict[str, Any], when: float) -> None:
    """Record when each dataset of the flow joined it: datasets that stay keep their time, new
    ones join at `when`, those that left are forgotten, with what their runs exported."""
    before = box.joined.get(flow["id"], {})
    after = {d: before.get(d, when) for d in flow_datasets(box, flow)}
    for gone in before.keys() - after.keys():
        box.exported_batches.pop((flow["id"], gone), None)
    box.joined[flow["id"]] = after


def forget_flow(box: Sandbox, flow_id: str) -> None:
    """A deleted flow: no more slots, no join times (its runs stay readable)."""
    box.joined.pop(flow_id, None)
    box.next_slot.pop(flow_id, None)


def _interval_s(schedule: dict[str, Any]) -> int:
    unit = DAY_S if schedule["timeUnit"] == "day" else HOUR_S
    return unit * int(schedule["interval"])


def schedule_flow(box: Sandbox, flow: dict[str, Any], after: float) -> None:
    """Set the flow's next slot: the first `startTime + k * interval` after `after` (the moment
    its schedule took effect: creation, a PATCH, enabling) and before `endTime`. One-time
    exports (interval 0) and disabled flows have none."""
    box.next_slot.pop(flow["id"], None)
    schedule = flow["scheduleParams"]
    every = _interval_s(schedule)
    if flow["state"] != "enabled" or every <= 0:
        return
    start, end = schedule["startTime"], schedule["endTime"]
    slot = start if after < start else start + (math.floor((after - start) / every) + 1) * every
    if slot < end:
        box.next_slot[flow["id"]] = slot
        heapq.heappush(box.slots, (slot, flow["id"]))


async def catch_up(state: EmulatorState, box: Sandbox) -> None:
    """Start the runs of every scheduled slot that is due. Called whenever runs or flows are
    read or triggered, so slots fire deterministically in emulated time; a flow whose clock
    jumped over many slots fires only the last MAX_CATCH_UP_SLOTS of them."""
    if not box.slot_lock.locked() and (not box.slots or box.slots[0][0] > state.clock.now()):
        return
    async with box.slot_lock:
        now = state.clock.now()
        while box.slots and box.slots[0][0] <= now:
            slot, flow_id = heapq.heappop(box.slots)
            flow = box.flows.get(flow_id)
            if box.next_slot.get(flow_id) != slot or flow is None:
                continue  # rescheduled, disabled or deleted since
            schedule = flow["scheduleParams"]
            every, end = _interval_s(schedule), schedule["endTime"]
            due = min(math.floor((now - slot) / every) + 1, math.ceil((end - slot) / every))
            following = slot + due * every
            if following < end:
                box.next_slot[flow_id] = following
                heapq.heappush(box.slots, (following, flow_id))
            else:
                del box.next_slot[flow_id]
            for k in range(max(0, due - MAX_CATCH_UP_SLOTS), due):
                await _fire(state, box, flow, slot + k * every)


async def _fire(state: EmulatorState, box: Sandbox, flow: dict[str, Any], slot: float) -> None:
    """One slot: a run per dataset of the flow, created at the slot's time. A dataset whose
    run is still in progress, that is not ready yet or that no longer exists is skipped."""
    active = (box.active_runs.get((flow["id"], d)) for d in box.joined.get(flow["id"], {}))
    # Runs over by now record what they exported before an incremental run looks.
    await settle(state, [r for r in active if r is not None])
    window = state.knobs.scaled(state.knobs.not_ready_window_s)
    for dataset_id, since in box.joined.get(flow["id"], {}).items():
        running = box.active_runs.get((flow["id"], dataset_id))
        if running is not None and not running.terminal:
            continue
        if slot < since + window or state.lake.get(box.name, dataset_id) is None:
            continue
        _start(state, box, flow["createdClient"], flow, dataset_id, at=slot)
