"""Ad hoc dataset export runs over HTTP, driven by the fake clock: readiness, refusals, the run
life cycle, failures, incremental exports, the runs API and its paging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from aep_emulator.settings import Knobs
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    NOT_ENABLED_PHRASE,
    NOT_READY_MESSAGE,
    STORAGE_SPECS,
    StorageType,
)
from tests.conftest import Answer, Emulator, default_knobs

WINDOW = 60.0  # default_knobs: emulated seconds a new flow answers "not ready"
RUN_SECONDS = 5.0  # default_knobs: every run takes 5 emulated seconds
FULL = "DAILY_FULL_EXPORT"
INCREMENTAL = "FIRST_FULL_THEN_INCREMENTAL"
S3_AUTH = {
    "specName": "Access Key",
    "params": {
        "s3AccessKey": "AKIAIOSFODNN7EXAMPLE",
        "s3SecretKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    },
}


async def created(emulator: Emulator, what: str, body: dict[str, Any]) -> str:
    answer = await emulator.fs("POST", f"/{what}", json_body=body)
    assert answer.status == 201, answer.body
    assert isinstance(answer.body["id"], str)
    return answer.body["id"]


async def make_flow(
    emulator: Emulator,
    dataset_ids: list[str],
    *,
    mode: str = FULL,
    path: str = "exports",
    storage: StorageType = StorageType.DLZ,
) -> str:
    """Base, source and target connection and a flow exporting `dataset_ids` as Parquet."""
    spec = STORAGE_SPECS[storage]
    ref = {"id": spec.connection_spec_id, "version": "1.0"}
    base: dict[str, Any] = {"name": "base", "connectionSpec": ref}
    location: dict[str, str] = {"path": path}
    if storage == StorageType.S3:
        base["auth"] = S3_AUTH
        location["bucketName"] = "runs-bucket"
    base_id = await created(emulator, "connections", base)
    source_id = await created(
        emulator,
        "sourceConnections",
        {
            "name": "source",
            "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
            "params": {"datasets": [{"dataSetId": d} for d in dataset_ids]},
        },
    )
    target_id = await created(
        emulator,
        "targetConnections",
        {
            "name": "target",
            "baseConnectionId": base_id,
            "connectionSpec": ref,
            "params": {**location, "datasetFileType": "PARQUET", "compression": "NONE"},
        },
    )
    daily = mode == INCREMENTAL
    return await created(
        emulator,
        "flows",
        {
            "name": "flow",
            "flowSpec": {"id": spec.dataset_flow_spec_id, "version": "1.0"},
            "sourceConnectionIds": [source_id],
            "targetConnectionIds": [target_id],
            "scheduleParams": {
                "exportMode": mode,
                "timeUnit": "day",
                "interval": 1 if daily else 0,
                "startTime": int(emulator.clock.time()),
            },
        },
    )


async def trigger(emulator: Emulator, flow_id: str, *dataset_ids: str) -> Answer:
    return await emulator.request(
        "POST",
        ADHOC_PATH,
        json_body={
            "activationInfo": {
                "destinations": [{"flowId": flow_id, "datasets": [{"id": d} for d in dataset_ids]}]
            }
        },
        headers={"Accept": ADHOC_DATASET_ACCEPT},
    )


def run_ids(answer: Answer) -> list[str]:
    assert answer.status == 200, answer.body
    return [
        d["statusURL"].rsplit("/", 1)[-1]
        for dest in answer.body["destinations"]
        for d in dest["datasets"]
    ]


async def start(emulator: Emulator, flow_id: str, dataset_id: str) -> str:
    (run_id,) = run_ids(await trigger(emulator, flow_id, dataset_id))
    return run_id


async def get_run(emulator: Emulator, run_id: str) -> dict[str, Any]:
    answer = await emulator.fs("GET", f"/runs/{run_id}")
    assert answer.status == 200, answer.body
    (run,) = answer.body["items"]
    assert run["id"] == run_id
    return dict(run)


async def finished(emulator: Emulator, run_id: str) -> dict[str, Any]:
    await emulator.clock.advance(RUN_SECONDS)
    run = await get_run(emulator, run_id)
    assert run["metrics"]["statusSummary"]["status"] != "processing"
    return run


def status(run: dict[str, Any]) -> str:
    value: str = run["metrics"]["statusSummary"]["status"]
    return value


async def files_of(emulator: Emulator, run_id: str) -> list[Path]:
    where = await emulator.control("GET", f"/runs/{run_id}")
    return [Path(f) for f in where["files"]]


def exported_ids(files: list[Path]) -> list[str]:
    return [pid for f in files for pid in pq.read_table(f).column("person_id").to_pylist()]


def batch_ids(emulator: Emulator, dataset_id: str, batches: slice = slice(None)) -> list[str]:
    """person_id of the dataset's rows, from its own Parquet batches (`batches` picks some)."""
    dataset = emulator.state.lake.get("prod", dataset_id)
    assert dataset is not None
    return [
        pid
        for b in dataset.batches[batches]
        for pid in pq.read_table(b.path).column("person_id").to_pylist()
    ]


def destination_files(emulator: Emulator) -> list[Path]:
    root = emulator.data_dir / "destinations"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def ready_flow(
    emulator: Emulator, rows: int = 30, *, mode: str = FULL, path: str = "exports"
) -> tuple[str, str]:
    """A dataset and a flow exporting it, past the not-ready window."""
    (dataset_id,) = await emulator.seed(rows=rows)
    flow_id = await make_flow(emulator, [dataset_id], mode=mode, path=path)
    await emulator.clock.advance(WINDOW)
    return flow_id, dataset_id


# -- triggering --------------------------------------------------------------------------------


async def test_not_ready_until_the_window_has_passed_exactly(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=5)
    await emulator.clock.advance(12.5)  # the window counts from the flow's creation
    flow_id = await make_flow(emulator, [dataset_id])
    flow = (await emulator.fs("GET", f"/flows/{flow_id}")).body["items"][0]
    assert flow["createdAt"] == emulator.clock.time() * 1000
    for step in (0.0, 30.0, 29.5, 0.25):  # 0, 30, 59.5, 59.75 s after createdAt
        await emulator.clock.advance(step)
        answer = await trigger(emulator, flow_id, dataset_id)
        assert answer.status == 400
        assert answer.body == {"message": NOT_READY_MESSAGE}
    assert (await emulator.fs("GET", "/runs")).body["items"] == []
    await emulator.clock.advance(0.25)  # exactly createdAt + window
    assert emulator.clock.time() * 1000 == flow["createdAt"] + WINDOW * 1000
    answer = await trigger(emulator, flow_id, dataset_id)
    assert answer.status == 200, answer.body
    (started,) = answer.body["destinations"][0]["datasets"]
    assert started["id"] == dataset_id
    assert started["flowId"] == flow_id
    run_id = started["statusURL"].removeprefix(f"{emulator.url}{FLOW_SERVICE_PATH}/runs/")
    assert (await get_run(emulator, run_id))["flowId"] == flow_id


async def test_adhoc_refused_for_a_disabled_flow_spec_until_reenabled(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=5)
    dlz_flow = await make_flow(emulator, [dataset_id])
    s3_flow = await make_flow(emulator, [dataset_id], storage=StorageType.S3)
    await emulator.clock.advance(WINDOW)
    dlz_spec = STORAGE_SPECS[StorageType.DLZ].dataset_flow_spec_id
    config = await emulator.control("PATCH", "/config", {"adhoc_disabled_flow_specs": [dlz_spec]})
    assert config["adhoc_disabled_flow_specs"] == [dlz_spec]

    answer = await trigger(emulator, dlz_flow, dataset_id)
    assert answer.status == 400
    message = answer.body["message"]
    assert f"{NOT_ENABLED_PHRASE}={dlz_spec}" in message
    assert f"Flow for id {dlz_flow} is incorrect" in message
    # Only that spec is refused: the S3 flow of the same dataset runs.
    assert len(run_ids(await trigger(emulator, s3_flow, dataset_id))) == 1

    await emulator.control("PATCH", "/config", {"adhoc_disabled_flow_specs": []})
    assert len(run_ids(await trigger(emulator, dlz_flow, dataset_id))) == 1


async def test_disabled_flow_cannot_be_triggered(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator)
    action = await emulator.fs("POST", f"/flows/{flow_id}/action?op=disable")
    assert action.status == 200, action.body
    answer = await trigger(emulator, flow_id, dataset_id)
    assert answer.status == 400
    assert flow_id in answer.body["message"]
    assert "disabled" in answer.body["message"]
    assert (await emulator.fs("GET", "/runs")).body["items"] == []
    assert (await emulator.fs("POST", f"/flows/{flow_id}/action?op=enable")).status == 200
    run_id = await start(emulator, flow_id, dataset_id)
    assert status(await finished(emulator, run_id)) == "success"


async def test_second_run_refused_while_the_first_is_processing(emulator: Emulator) -> None:
    (first_ds, other_ds) = await emulator.seed(rows=5, count=2)
    flow_id = await make_flow(emulator, [first_ds, other_ds])
    await emulator.clock.advance(WINDOW)
    first = await start(emulator, flow_id, first_ds)

    await emulator.clock.advance(RUN_SECONDS - 0.5)
    answer = await trigger(emulator, flow_id, first_ds)
    assert answer.status == 400
    assert answer.body["message"] == (
        f"Invalid parameter: Run already going on for dataset {first_ds} "
        f"for order {flow_id} with run id {first}"
    )
    # Another dataset of the same flow is not blocked.
    assert len(run_ids(await trigger(emulator, flow_id, other_ds))) == 1

    # Once the run's time is over a new run is allowed, whether or not anyone polled it.
    await emulator.clock.advance(0.5)
    second = await start(emulator, flow_id, first_ds)
    assert second != first
    assert status(await get_run(emulator, first)) == "success"
    assert status(await get_run(emulator, second)) == "processing"


async def test_one_request_cannot_start_two_runs_of_a_dataset(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator)
    same_entry = await trigger(emulator, flow_id, dataset_id, dataset_id)
    body = {
        "activationInfo": {
            "destinations": [
                {"flowId": flow_id, "datasets": [{"id": dataset_id}]},
                {"flowId": flow_id, "datasets": [{"id": dataset_id}]},
            ]
        }
    }
    two_entries = await emulator.request(
        "POST", ADHOC_PATH, json_body=body, headers={"Accept": ADHOC_DATASET_ACCEPT}
    )
    for answer in (same_entry, two_entries):
        assert answer.status == 400
        assert dataset_id in answer.body["message"]
    assert (await emulator.fs("GET", "/runs")).body["items"] == []


async def test_refusals_start_no_run_for_any_dataset_of_the_request(emulator: Emulator) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=5, count=2)
    flow_id = await make_flow(emulator, [ds_a, ds_b])
    await emulator.clock.advance(WINDOW)
    busy = await start(emulator, flow_id, ds_b)
    answer = await trigger(emulator, flow_id, ds_a, ds_b)
    assert answer.status == 400
    assert busy in answer.body["message"]
    listed = await emulator.fs("GET", "/runs")
    assert [r["id"] for r in listed.body["items"]] == [busy]


# -- the life cycle ------------------------------------------------------------------------------


async def test_run_processing_until_its_time_then_success(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator, rows=30)
    started_ms = emulator.clock.time() * 1000
    run_id = await start(emulator, flow_id, dataset_id)
    for step in (0.0, 2.5, 2.0):  # 0, 2.5 and 4.5 s into a 5 s run
        await emulator.clock.advance(step)
        run = await get_run(emulator, run_id)
        metrics = run["metrics"]
        assert status(run) == "processing"
        assert metrics["durationSummary"] == {"startedAtUTC": started_ms}
        assert "outputBytes" not in metrics["sizeSummary"]
        assert "outputRecordCount" not in metrics["recordSummary"]
        assert "outputFileCount" not in metrics["fileSummary"]
        assert metrics["recordSummary"]["inputRecordCount"] == 30
        assert destination_files(emulator) == []
        listed = await emulator.fs("GET", f"/runs?property=id=={run_id}")
        assert [status(r) for r in listed.body["items"]] == ["processing"]

    await emulator.clock.advance(0.5)
    run = await get_run(emulator, run_id)
    metrics = run["metrics"]
    assert status(run) == "success"
    assert metrics["statusSummary"]["errors"] == []
    assert metrics["durationSummary"] == {
        "startedAtUTC": started_ms,
        "completedAtUTC": started_ms + RUN_SECONDS * 1000,
    }
    files = await files_of(emulator, run_id)
    assert sorted(files) == sorted(destination_files(emulator))
    assert metrics["recordSummary"]["outputRecordCount"] == 30
    assert metrics["fileSummary"]["outputFileCount"] == len(files) == 1
    assert metrics["sizeSummary"]["outputBytes"] == sum(f.stat().st_size for f in files)
    # A terminal run does not change any more.
    await emulator.clock.advance(3600)
    assert await get_run(emulator, run_id) == run


async def test_flow_last_run_details_follow_the_run(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator)
    before = (await emulator.fs("GET", f"/flows/{flow_id}")).body["items"][0]
    assert "lastRunDetails" not in before
    run_id = await start(emulator, flow_id, dataset_id)
    run = await finished(emulator, run_id)
    flow = (await emulator.fs("GET", f"/flows/{flow_id}")).body["items"][0]
    duration = run["metrics"]["durationSummary"]
    assert flow["lastRunDetails"] == {
        "id": run_id,
        "state": "success",
        "startedAtUTC": duration["startedAtUTC"],
        "completedAtUTC": duration["completedAtUTC"],
    }
    second = await start(emulator, flow_id, dataset_id)
    await finished(emulator, second)
    flow = (await emulator.fs("GET", f"/flows/{flow_id}")).body["items"][0]
    assert flow["lastRunDetails"]["id"] == second


class TestFailingRuns:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(run_failure_rate=1.0)

    async def test_failed_runs_are_shaped_like_aeps(self, emulator: Emulator) -> None:
        flow_id, dataset_id = await ready_flow(emulator, mode=INCREMENTAL)
        run_id = await start(emulator, flow_id, dataset_id)
        assert status(await get_run(emulator, run_id)) == "processing"
        run = await finished(emulator, run_id)
        metrics = run["metrics"]
        assert status(run) == "failed"
        duration = metrics["durationSummary"]
        assert duration["completedAtUTC"] == duration["startedAtUTC"] + RUN_SECONDS * 1000
        assert "outputBytes" not in metrics["sizeSummary"]
        assert "outputFileCount" not in metrics["fileSummary"]
        assert "outputRecordCount" not in metrics["recordSummary"]
        errors = metrics["statusSummary"]["errors"]
        assert errors
        for error in errors:
            assert isinstance(error["code"], str)
            assert error["code"]
            assert isinstance(error["message"], str)
            assert error["message"]
        assert await files_of(emulator, run_id) == []
        assert destination_files(emulator) == []
        flow = (await emulator.fs("GET", f"/flows/{flow_id}")).body["items"][0]
        assert flow["lastRunDetails"]["state"] == "failed"
        listed = await emulator.fs(
            "GET", "/runs", params={"property": "metrics.statusSummary.status==failed"}
        )
        assert [r["id"] for r in listed.body["items"]] == [run_id]

        # A failed incremental run exported nothing, so the next one exports everything.
        await emulator.control("PATCH", "/config", {"run_failure_rate": 0.0})
        retry = await finished(emulator, await start(emulator, flow_id, dataset_id))
        assert status(retry) == "success"
        assert retry["metrics"]["recordSummary"]["outputRecordCount"] == 30


class TestPartialRuns:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(run_partial_rate=1.0)

    async def test_partial_runs_succeed_with_errors(self, emulator: Emulator) -> None:
        flow_id, dataset_id = await ready_flow(emulator, rows=12)
        run_id = await start(emulator, flow_id, dataset_id)
        run = await finished(emulator, run_id)
        metrics = run["metrics"]
        assert status(run) == "success"
        errors = metrics["statusSummary"]["errors"]
        assert errors
        assert all(e["code"] and e["message"] for e in errors)
        files = await files_of(emulator, run_id)
        assert sorted(exported_ids(files)) == sorted(batch_ids(emulator, dataset_id))
        assert metrics["recordSummary"]["outputRecordCount"] == 12
        assert metrics["fileSummary"]["outputFileCount"] == len(files)


async def test_unwritable_destination_fails_the_run(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator, path="blocked")
    # The folder the DLZ target writes into is a file: the export cannot create its folders.
    blocker = emulator.data_dir / "destinations" / "dlz" / "prod" / "dlz-destination" / "blocked"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    run_id = await start(emulator, flow_id, dataset_id)
    run = await finished(emulator, run_id)
    metrics = run["metrics"]
    assert status(run) == "failed"
    assert "completedAtUTC" in metrics["durationSummary"]
    assert "outputBytes" not in metrics["sizeSummary"]
    assert "outputFileCount" not in metrics["fileSummary"]
    (error,) = metrics["statusSummary"]["errors"]
    assert error["code"]
    assert "destination" in error["message"]
    assert blocker.read_text() == "not a folder"
    assert destination_files(emulator) == [blocker]

    # The emulator keeps serving, and once the destination is fixed the next run succeeds.
    blocker.unlink()
    again = await start(emulator, flow_id, dataset_id)
    assert status(await finished(emulator, again)) == "success"
    assert len(await files_of(emulator, again)) == 1


# -- what each run exports -----------------------------------------------------------------------


async def test_incremental_runs_export_only_new_batches(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator, rows=25, mode=INCREMENTAL)
    first = await finished(emulator, await start(emulator, flow_id, dataset_id))
    assert first["metrics"]["recordSummary"]["outputRecordCount"] == 25

    await emulator.control("POST", f"/datasets/{dataset_id}/batches", {"rows": 9})
    await emulator.control("POST", f"/datasets/{dataset_id}/batches", {"rows": 4})
    second_id = await start(emulator, flow_id, dataset_id)
    second = await finished(emulator, second_id)
    assert second["metrics"]["recordSummary"]["outputRecordCount"] == 13
    files = await files_of(emulator, second_id)
    assert sorted(exported_ids(files)) == sorted(batch_ids(emulator, dataset_id, slice(1, None)))

    third_id = await start(emulator, flow_id, dataset_id)
    third = await finished(emulator, third_id)
    metrics = third["metrics"]
    assert status(third) == "success"
    assert metrics["recordSummary"]["outputRecordCount"] == 0
    assert metrics["fileSummary"]["outputFileCount"] == 0
    assert metrics["sizeSummary"]["outputBytes"] == 0
    assert await files_of(emulator, third_id) == []
    assert len(destination_files(emulator)) == 2


async def test_incremental_without_polling_in_between(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator, rows=25, mode=INCREMENTAL)
    first_id = await start(emulator, flow_id, dataset_id)
    await emulator.clock.advance(RUN_SECONDS)
    await emulator.control("POST", f"/datasets/{dataset_id}/batches", {"rows": 6})
    second_id = await start(emulator, flow_id, dataset_id)  # nobody read the first run's end
    second = await finished(emulator, second_id)
    assert second["metrics"]["recordSummary"]["outputRecordCount"] == 6
    first = await get_run(emulator, first_id)
    assert first["metrics"]["recordSummary"]["outputRecordCount"] == 25


async def test_full_export_exports_everything_every_time(emulator: Emulator) -> None:
    flow_id, dataset_id = await ready_flow(emulator, rows=25, mode=FULL)
    counts = []
    for appended in (0, 9, 0):
        if appended:
            await emulator.control("POST", f"/datasets/{dataset_id}/batches", {"rows": appended})
        run_id = await start(emulator, flow_id, dataset_id)
        run = await finished(emulator, run_id)
        counts.append(run["metrics"]["recordSummary"]["outputRecordCount"])
        files = await files_of(emulator, run_id)
        assert sorted(exported_ids(files)) == sorted(batch_ids(emulator, dataset_id))
    assert counts == [25, 34, 34]


# -- the runs API --------------------------------------------------------------------------------


async def test_runs_by_id_and_by_flow(emulator: Emulator) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=3, count=2)
    flow_1 = await make_flow(emulator, [ds_a, ds_b])
    flow_2 = await make_flow(emulator, [ds_a])
    await emulator.clock.advance(WINDOW)
    r1, r2 = run_ids(await trigger(emulator, flow_1, ds_a, ds_b))
    (r3,) = run_ids(await trigger(emulator, flow_2, ds_a))
    await emulator.clock.advance(RUN_SECONDS)
    (r4,) = run_ids(await trigger(emulator, flow_2, ds_a))

    async def listed(*params: tuple[str, str]) -> set[str]:
        answer = await emulator.fs("GET", "/runs", params=list(params))
        assert answer.status == 200, answer.body
        assert "_links" not in answer.body
        ids = [r["id"] for r in answer.body["items"]]
        assert len(ids) == len(set(ids))
        return set(ids)

    assert await listed() == {r1, r2, r3, r4}
    assert await listed(("property", f"id=={r1},{r3},{r4}")) == {r1, r3, r4}
    assert await listed(("property", f"id=={r2},not-a-run")) == {r2}
    assert await listed(("property", f"flowId=={flow_1}")) == {r1, r2}
    assert await listed(("property", f"flowId=={flow_2}")) == {r3, r4}
    assert await listed(("property", f"flowId=={flow_2}"), ("property", f"id=={r1},{r4}")) == {r4}
    assert await listed(("property", "metrics.statusSummary.status==processing")) == {r4}
    got = await emulator.fs("GET", "/runs", params={"property": f"flowId=={flow_2}"})
    # Newest first.
    assert [r["id"] for r in got.body["items"]] == [r4, r3]


async def test_paging_through_more_than_a_hundred_runs(emulator: Emulator) -> None:
    dataset_ids = await emulator.seed(rows=0, count=105)
    big_flow = await make_flow(emulator, dataset_ids)
    small_flow = await make_flow(emulator, dataset_ids[:3])
    await emulator.clock.advance(WINDOW)
    big_runs = run_ids(await trigger(emulator, big_flow, *dataset_ids[:60]))
    await emulator.clock.advance(1)
    big_runs += run_ids(await trigger(emulator, big_flow, *dataset_ids[60:]))
    small_runs = run_ids(await trigger(emulator, small_flow, *dataset_ids[:3]))
    assert len(set(big_runs)) == 105

    async def walk(path: str) -> list[list[str]]:
        pages = []
        while True:
            answer = await emulator.request("GET", path)
            assert answer.status == 200, answer.body
            pages.append([r["id"] for r in answer.body["items"]])
            nxt = answer.body.get("_links", {}).get("next")
            if nxt is None:
                return pages
            assert "continuationToken=" in nxt["href"]
            path = FLOW_SERVICE_PATH + nxt["href"]  # relative to the service root

    pages = await walk(f"{FLOW_SERVICE_PATH}/runs")
    assert [len(p) for p in pages] == [100, 8]
    everything = [i for p in pages for i in p]
    assert sorted(everything) == sorted(big_runs + small_runs)

    # The filter and the page size travel in the next link.
    pages = await walk(f"{FLOW_SERVICE_PATH}/runs?property=flowId=={big_flow}&limit=40")
    assert [len(p) for p in pages] == [40, 40, 25]
    everything = [i for p in pages for i in p]
    assert sorted(everything) == sorted(big_runs)
    # Newest first across pages: the 45 runs triggered a second later lead.
    assert set(everything[:45]) == set(big_runs[60:])

    # Runs with nothing to export end as empty successes; paging still holds after they end.
    await emulator.clock.advance(RUN_SECONDS)
    pages = await walk(f"{FLOW_SERVICE_PATH}/runs?property=metrics.statusSummary.status==success")
    assert sorted(i for p in pages for i in p) == sorted(big_runs + small_runs)
