"""What real AEP refuses, the emulator refuses too (issue 9): the per-sandbox limit on destination
dataflows, immutable source connections, per-dataset readiness, the dataset cap of one ad hoc
call, runs that name their dataset, scheduled runs in emulated time, and `count=false` lists."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from aep_emulator.settings import Knobs
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    NOT_READY_MESSAGE,
    STORAGE_SPECS,
    StorageType,
)
from tests.conftest import Answer, Emulator, default_knobs
from tests.workflow import base_connection, source_connection, target_connection

LONG_TOKENS = {"token_lifetime_s": 10**9}  # tests here run emulated days on one token


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs(**LONG_TOKENS)


def flow_error(answer: Answer, status: int, code: int) -> None:
    assert answer.status == status, answer.body
    assert answer.body["type"].endswith(f"FLOW-{code}-{status}"), answer.body
    assert answer.body["status"] == status


def flow_body(source_id: str, target_id: str, name: str = "flow") -> dict[str, Any]:
    return {
        "name": name,
        "flowSpec": {"id": STORAGE_SPECS[StorageType.DLZ].dataset_flow_spec_id, "version": "1.0"},
        "sourceConnectionIds": [source_id],
        "targetConnectionIds": [target_id],
        "scheduleParams": {
            "exportMode": "DAILY_FULL_EXPORT",
            "timeUnit": "day",
            "interval": 0,
            "startTime": 1_900_000_000,
        },
    }


async def links(emulator: Emulator, sandbox: str = "prod") -> tuple[str, str]:
    """A source and a target connection that any number of flows can share."""
    (dataset_id,) = await emulator.seed(rows=1, sandbox=sandbox)
    base = await emulator.fs(
        "POST", "/connections", json_body=base_connection(StorageType.DLZ), sandbox=sandbox
    )
    source = await emulator.fs(
        "POST", "/sourceConnections", json_body=source_connection(dataset_id), sandbox=sandbox
    )
    target = await emulator.fs(
        "POST",
        "/targetConnections",
        json_body=target_connection(StorageType.DLZ, base.body["id"]),
        sandbox=sandbox,
    )
    assert {base.status, source.status, target.status} == {201}
    return source.body["id"], target.body["id"]


async def new_flow(
    emulator: Emulator, source_id: str, target_id: str, sandbox: str = "prod"
) -> Answer:
    return await emulator.fs(
        "POST", "/flows", json_body=flow_body(source_id, target_id), sandbox=sandbox
    )


# -- the limit on destination dataflows ------------------------------------------------------------


async def test_a_sandbox_holds_at_most_100_destination_flows_by_default(
    emulator: Emulator,
) -> None:
    assert Knobs().max_destination_flows == 100
    source_id, target_id = await links(emulator)
    for _ in range(100):
        made = await new_flow(emulator, source_id, target_id)
        assert made.status == 201, made.body
    refused = await new_flow(emulator, source_id, target_id)
    flow_error(refused, 400, 1400)
    assert refused.body["errorMessage"].startswith(
        "Maximum number of destinations reached: sandbox prod has 100 destination dataflows, "
        "the limit is 100."
    )
    counted = await emulator.fs("GET", "/flows", params={"count": "true"})
    assert counted.body == {"count": 100}


class TestSmallFlowLimit:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(max_destination_flows=3, **LONG_TOKENS)

    async def test_deleting_a_flow_frees_a_place(self, emulator: Emulator) -> None:
        source_id, target_id = await links(emulator)
        made = [(await new_flow(emulator, source_id, target_id)).body["id"] for _ in range(3)]
        refused = await new_flow(emulator, source_id, target_id)
        flow_error(refused, 400, 1400)
        assert "the limit is 3" in refused.body["errorMessage"]
        assert (await emulator.fs("DELETE", f"/flows/{made[0]}")).status == 202
        assert (await new_flow(emulator, source_id, target_id)).status == 201
        flow_error(await new_flow(emulator, source_id, target_id), 400, 1400)

    async def test_each_sandbox_has_its_own_count(self, emulator: Emulator) -> None:
        prod = await links(emulator, "prod")
        dev = await links(emulator, "dev")
        for _ in range(3):
            assert (await new_flow(emulator, *prod, sandbox="prod")).status == 201
        flow_error(await new_flow(emulator, *prod, sandbox="prod"), 400, 1400)
        for _ in range(3):
            assert (await new_flow(emulator, *dev, sandbox="dev")).status == 201
        refused = await new_flow(emulator, *dev, sandbox="dev")
        assert "sandbox dev has 3" in refused.body["errorMessage"]

    async def test_the_limit_follows_the_knob_at_run_time(self, emulator: Emulator) -> None:
        source_id, target_id = await links(emulator)
        for _ in range(3):
            assert (await new_flow(emulator, source_id, target_id)).status == 201
        flow_error(await new_flow(emulator, source_id, target_id), 400, 1400)
        await emulator.control("PATCH", "/config", {"max_destination_flows": 4})
        assert (await new_flow(emulator, source_id, target_id)).status == 201
        flow_error(await new_flow(emulator, source_id, target_id), 400, 1400)


# -- count=false with limit ------------------------------------------------------------------------


async def test_count_false_with_limit_lists_on_every_collection(emulator: Emulator) -> None:
    source_id, target_id = await links(emulator)
    for _ in range(3):
        assert (await new_flow(emulator, source_id, target_id)).status == 201
    for path in ("/flows", "/runs", "/connections", "/sourceConnections", "/targetConnections"):
        for false in ("false", "False", "FALSE"):
            answer = await emulator.fs("GET", path, params={"count": false, "limit": "2"})
            assert answer.status == 200, (path, answer.body)
            assert "count" not in answer.body
            assert len(answer.body["items"]) <= 2
        for true in ("true", "True", "TRUE"):
            refused = await emulator.fs("GET", path, params={"count": true, "limit": "2"})
            flow_error(refused, 400, 1401)
    flows = await emulator.fs("GET", "/flows", params={"count": "False", "limit": "2"})
    assert len(flows.body["items"]) == 2
    assert "continuationToken=" in flows.body["_links"]["next"]["href"]


# -- shared helpers for flows with several datasets ------------------------------------------------

WINDOW = 60.0  # default_knobs: emulated seconds a dataset is "not ready" after joining a flow
RUN_SECONDS = 5.0  # default_knobs: every run takes 5 emulated seconds
DAY = 86_400
ONE_TIME = {"exportMode": "DAILY_FULL_EXPORT", "timeUnit": "day", "interval": 0}
DAILY = {"exportMode": "FIRST_FULL_THEN_INCREMENTAL", "timeUnit": "day", "interval": 1}


async def source_of(emulator: Emulator, dataset_ids: list[str]) -> str:
    body = {
        "name": "source",
        "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
        "params": {"datasets": [{"dataSetId": d} for d in dataset_ids]},
    }
    answer = await emulator.fs("POST", "/sourceConnections", json_body=body)
    assert answer.status == 201, answer.body
    return str(answer.body["id"])


async def flow_of(
    emulator: Emulator, dataset_ids: list[str], schedule: dict[str, Any] | None = None
) -> tuple[str, str]:
    """A DLZ flow (Parquet) exporting `dataset_ids`: its id and its source connection's."""
    base = await emulator.fs("POST", "/connections", json_body=base_connection(StorageType.DLZ))
    target = await emulator.fs(
        "POST",
        "/targetConnections",
        json_body=target_connection(StorageType.DLZ, base.body["id"], compression="NONE"),
    )
    source_id = await source_of(emulator, dataset_ids)
    body = flow_body(source_id, target.body["id"])
    body["scheduleParams"] = schedule or {**ONE_TIME, "startTime": int(emulator.clock.time())}
    made = await emulator.fs("POST", "/flows", json_body=body)
    assert made.status == 201, made.body
    return str(made.body["id"]), source_id


async def the_flow(emulator: Emulator, flow_id: str) -> dict[str, Any]:
    answer = await emulator.fs("GET", f"/flows/{flow_id}")
    assert answer.status == 200, answer.body
    (item,) = answer.body["items"]
    return dict(item)


async def repoint(emulator: Emulator, flow_id: str, source_id: str) -> Answer:
    etag = (await the_flow(emulator, flow_id))["etag"]
    return await emulator.fs(
        "PATCH",
        f"/flows/{flow_id}",
        json_body=[{"op": "replace", "path": "/sourceConnectionIds", "value": [source_id]}],
        headers={"If-Match": etag},
    )


async def adhoc(emulator: Emulator, *asks: tuple[str, list[str]]) -> Answer:
    destinations = [{"flowId": f, "datasets": [{"id": d} for d in ds]} for f, ds in asks]
    return await emulator.request(
        "POST",
        ADHOC_PATH,
        json_body={"activationInfo": {"destinations": destinations}},
        headers={"Accept": ADHOC_DATASET_ACCEPT},
    )


async def all_runs(emulator: Emulator, *filters: str) -> list[dict[str, Any]]:
    answer = await emulator.fs("GET", "/runs", params=[("property", f) for f in filters])
    assert answer.status == 200, answer.body
    return list(answer.body["items"])


def dataset_of(run: dict[str, Any]) -> str:
    (summary,) = run["metrics"]["recordSummary"]["sourceSummaries"]
    return str(summary["id"])


# -- source connections are immutable in their datasets ----------------------------------------


async def test_a_source_connection_cannot_be_patched_or_replaced(emulator: Emulator) -> None:
    (dataset_id, other) = await emulator.seed(rows=1, count=2)
    source_id = await source_of(emulator, [dataset_id])
    change = [{"op": "replace", "path": "/params/datasets", "value": [{"dataSetId": other}]}]
    for method in ("PATCH", "PUT"):
        answer = await emulator.fs(
            method, f"/sourceConnections/{source_id}", json_body=change, headers={"If-Match": "*"}
        )
        flow_error(answer, 405, 1100)
    stored = (await emulator.fs("GET", f"/sourceConnections/{source_id}")).body["items"][0]
    assert stored["params"]["datasets"] == [{"dataSetId": dataset_id}]


async def test_a_flow_changes_datasets_by_a_new_source_connection(emulator: Emulator) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=1, count=2)
    flow_id, first = await flow_of(emulator, [ds_a])
    second = await source_of(emulator, [ds_a, ds_b])
    before = await the_flow(emulator, flow_id)
    stale = before["etag"]
    moved = await repoint(emulator, flow_id, second)
    assert moved.status == 200, moved.body
    assert moved.body["etag"] != stale
    after = await the_flow(emulator, flow_id)
    assert after["sourceConnectionIds"] == [second]
    assert after["inheritedAttributes"]["sourceConnections"][0]["id"] == second
    assert set(after) == set(before)  # join times are the emulator's own, not in the JSON

    again = await emulator.fs(
        "PATCH",
        f"/flows/{flow_id}",
        json_body=[{"op": "replace", "path": "/sourceConnectionIds", "value": [first]}],
        headers={"If-Match": stale},
    )
    flow_error(again, 412, 1404)
    assert (await the_flow(emulator, flow_id))["sourceConnectionIds"] == [second]


async def test_a_source_connection_in_use_cannot_be_deleted(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=1)
    flow_id, first = await flow_of(emulator, [dataset_id])
    in_use = await emulator.fs("DELETE", f"/sourceConnections/{first}")
    flow_error(in_use, 400, 1418)
    assert flow_id in in_use.body["errorMessage"]
    second = await source_of(emulator, [dataset_id])
    assert (await repoint(emulator, flow_id, second)).status == 200
    assert (await emulator.fs("DELETE", f"/sourceConnections/{first}")).status == 202
    flow_error(await emulator.fs("DELETE", f"/sourceConnections/{second}"), 400, 1418)


# -- per-dataset join time and "not ready" --------------------------------------------------------


async def test_a_dataset_that_joins_later_is_not_ready_for_its_own_window(
    emulator: Emulator,
) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=3, count=2)
    flow_id, _ = await flow_of(emulator, [ds_a])
    await emulator.clock.advance(WINDOW)
    assert (await repoint(emulator, flow_id, await source_of(emulator, [ds_a, ds_b]))).status == 200

    await emulator.clock.advance(WINDOW - 1)
    late = await adhoc(emulator, (flow_id, [ds_b]))
    assert late.status == 400
    assert late.body == {"message": NOT_READY_MESSAGE}
    # The whole call is refused: the dataset that stayed (and is ready) gets no run either.
    both = await adhoc(emulator, (flow_id, [ds_a, ds_b]))
    assert both.body == {"message": NOT_READY_MESSAGE}
    assert await all_runs(emulator) == []
    stayed = await adhoc(emulator, (flow_id, [ds_a]))
    assert stayed.status == 200, stayed.body

    await emulator.clock.advance(1)  # exactly the window after the PATCH
    joined = await adhoc(emulator, (flow_id, [ds_b]))
    assert joined.status == 200, joined.body


async def test_runs_of_a_dataset_that_left_finish_and_it_rejoins_afresh(
    emulator: Emulator,
) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=4, count=2)
    both = await source_of(emulator, [ds_a, ds_b])
    schedule = {**DAILY, "startTime": int(emulator.clock.time()) + 10 * DAY}
    flow_id, _ = await flow_of(emulator, [ds_a, ds_b], schedule)
    assert (await repoint(emulator, flow_id, both)).status == 200  # same datasets: no new join
    await emulator.clock.advance(WINDOW)
    answer = await adhoc(emulator, (flow_id, [ds_b]))
    assert answer.status == 200, answer.body
    (leaving,) = [
        d["statusURL"].rsplit("/", 1)[1] for d in answer.body["destinations"][0]["datasets"]
    ]

    assert (await repoint(emulator, flow_id, await source_of(emulator, [ds_a]))).status == 200
    refused = await adhoc(emulator, (flow_id, [ds_b]))
    assert refused.body == {
        "message": f"Invalid parameter: Dataset {ds_b} is not part of flow {flow_id}."
    }
    await emulator.clock.advance(RUN_SECONDS)
    run = (await emulator.fs("GET", f"/runs/{leaving}")).body["items"][0]
    assert run["metrics"]["statusSummary"]["status"] == "success"
    assert run["metrics"]["recordSummary"]["outputRecordCount"] == 4
    files = (await emulator.control("GET", f"/runs/{leaving}"))["files"]
    assert len(files) == 1

    # Rejoining is a new join: a new window, and the incremental flow exports it in full again.
    assert (await repoint(emulator, flow_id, both)).status == 200
    assert (await adhoc(emulator, (flow_id, [ds_b]))).body == {"message": NOT_READY_MESSAGE}
    await emulator.clock.advance(WINDOW)
    again = await adhoc(emulator, (flow_id, [ds_b]))
    (run_id,) = [
        d["statusURL"].rsplit("/", 1)[1] for d in again.body["destinations"][0]["datasets"]
    ]
    await emulator.clock.advance(RUN_SECONDS)
    rerun = (await emulator.fs("GET", f"/runs/{run_id}")).body["items"][0]
    assert rerun["metrics"]["recordSummary"]["outputRecordCount"] == 4


# -- several datasets per call, with a cap --------------------------------------------------------


async def test_one_call_exports_up_to_80_datasets_over_several_flows(emulator: Emulator) -> None:
    assert Knobs().adhoc_max_datasets_per_call == 80
    dataset_ids = await emulator.seed(rows=0, count=81)
    flow_1, _ = await flow_of(emulator, dataset_ids[:41])
    flow_2, _ = await flow_of(emulator, dataset_ids[41:])
    await emulator.clock.advance(WINDOW)

    too_many = await adhoc(emulator, (flow_1, dataset_ids[:41]), (flow_2, dataset_ids[41:]))
    assert too_many.status == 400
    message = too_many.body["message"]
    assert message.startswith("Invalid parameter: ")
    assert "81 datasets" in message
    assert "at most 80 datasets" in message
    assert await all_runs(emulator) == []

    answer = await adhoc(emulator, (flow_1, dataset_ids[:41]), (flow_2, dataset_ids[41:80]))
    assert answer.status == 200, answer.body
    first, second = answer.body["destinations"]
    assert [(d["flowId"], d["id"]) for d in first["datasets"]] == [
        (flow_1, d) for d in dataset_ids[:41]
    ]
    assert [(d["flowId"], d["id"]) for d in second["datasets"]] == [
        (flow_2, d) for d in dataset_ids[41:80]
    ]
    urls = [d["statusURL"] for dest in (first, second) for d in dest["datasets"]]
    assert len(set(urls)) == 80
    runs = {r["id"]: r for r in await all_runs(emulator)}
    for dest in (first, second):
        for started in dest["datasets"]:
            run = runs[started["statusURL"].rsplit("/", 1)[1]]
            assert run["flowId"] == started["flowId"]
            assert dataset_of(run) == started["id"]


class TestSmallCap:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(adhoc_max_datasets_per_call=2, **LONG_TOKENS)

    async def test_the_cap_counts_datasets_over_all_flows_of_a_call(
        self, emulator: Emulator
    ) -> None:
        (ds_a, ds_b) = await emulator.seed(rows=1, count=2)
        flow_1, _ = await flow_of(emulator, [ds_a, ds_b])
        flow_2, _ = await flow_of(emulator, [ds_a])
        await emulator.clock.advance(WINDOW)
        refused = await adhoc(emulator, (flow_1, [ds_a, ds_b]), (flow_2, [ds_a]))
        assert refused.status == 400
        assert "at most 2 datasets" in refused.body["message"]
        assert (await adhoc(emulator, (flow_1, [ds_b]), (flow_2, [ds_a]))).status == 200


async def test_a_busy_dataset_refuses_the_whole_call_over_all_flows(emulator: Emulator) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=1, count=2)
    flow_1, _ = await flow_of(emulator, [ds_a, ds_b])
    flow_2, _ = await flow_of(emulator, [ds_a, ds_b])
    await emulator.clock.advance(WINDOW)
    busy = await adhoc(emulator, (flow_2, [ds_b]))
    (busy_id,) = [
        d["statusURL"].rsplit("/", 1)[1] for d in busy.body["destinations"][0]["datasets"]
    ]
    # The busy dataset is asked last, in the second flow: nothing of the first flow starts.
    answer = await adhoc(emulator, (flow_1, [ds_a, ds_b]), (flow_2, [ds_a, ds_b]))
    assert answer.status == 400
    assert answer.body == {
        "message": f"Invalid parameter: Run already going on for dataset {ds_b} "
        f"for order {flow_2} with run id {busy_id}"
    }
    assert [r["id"] for r in await all_runs(emulator)] == [busy_id]


# -- runs name the dataset they export ------------------------------------------------------------


async def test_runs_name_their_dataset_and_can_be_filtered_by_it(emulator: Emulator) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=3, count=2)
    flow_1, _ = await flow_of(emulator, [ds_a, ds_b])
    flow_2, _ = await flow_of(emulator, [ds_a])
    await emulator.clock.advance(WINDOW)
    await adhoc(emulator, (flow_1, [ds_a, ds_b]), (flow_2, [ds_a]))
    await emulator.clock.advance(RUN_SECONDS)
    since_ms = int(emulator.clock.time() * 1000)
    later = await adhoc(emulator, (flow_1, [ds_a]))
    (late_id,) = [
        d["statusURL"].rsplit("/", 1)[1] for d in later.body["destinations"][0]["datasets"]
    ]

    runs = await all_runs(emulator)
    assert len(runs) == 4
    for run in runs:
        summary = run["metrics"]["recordSummary"]
        assert summary["sourceSummaries"] == [
            {"id": dataset_of(run), "inputRecordCount": summary["inputRecordCount"]}
        ]
    field = "metrics.recordSummary.sourceSummaries[].id"
    of_a = await all_runs(emulator, f"{field}=={ds_a}")
    assert len(of_a) == 3
    assert {dataset_of(r) for r in of_a} == {ds_a}
    of_a_in_1 = await all_runs(emulator, f"{field}=={ds_a}", f"flowId=={flow_1}")
    assert len(of_a_in_1) == 2
    recent = await all_runs(
        emulator, f"{field}=={ds_a}", f"flowId=={flow_1}", f"createdAt>={since_ms}"
    )
    assert [r["id"] for r in recent] == [late_id]
    assert await all_runs(emulator, f"{field}=={ds_b}", f"flowId=={flow_2}") == []


# -- scheduled flows fire in emulated time ---------------------------------------------------


def hourly(hours: int) -> dict[str, Any]:
    return {"exportMode": "FIRST_FULL_THEN_INCREMENTAL", "timeUnit": "hour", "interval": hours}


def records(run: dict[str, Any]) -> int:
    return int(run["metrics"]["recordSummary"]["outputRecordCount"])


def created_s(runs: list[dict[str, Any]]) -> list[float]:
    return sorted(r["createdAt"] / 1000 for r in runs)


async def test_a_daily_flow_fires_each_slot_incrementally_until_its_end(
    emulator: Emulator,
) -> None:
    (ds_a, ds_b) = await emulator.seed(rows=10, count=2)
    t0 = int(emulator.clock.time())
    start = t0 + 3600
    schedule = {**DAILY, "startTime": start, "endTime": start + 2 * DAY}
    flow_id, _ = await flow_of(emulator, [ds_a, ds_b], schedule)
    await emulator.clock.advance(start - t0 - 1)
    assert await all_runs(emulator) == []

    await emulator.clock.advance(DAY)  # past the first slot, not the second
    first = await all_runs(emulator, f"flowId=={flow_id}")
    assert sorted(dataset_of(r) for r in first) == sorted([ds_a, ds_b])
    assert created_s(first) == [start, start]  # created at the slot's time, not at the read
    folder = (await emulator.control("GET", f"/runs/{first[0]['id']}"))["folder"]
    assert folder.endswith(f"exportTime={datetime.fromtimestamp(start, UTC):%Y%m%d%H%M}")
    assert {records(r) for r in first} == {10}  # the slot's runs ended long ago: full exports

    await emulator.control("POST", f"/datasets/{ds_a}/batches", {"rows": 7})
    await emulator.clock.advance(DAY)
    second = [
        r for r in await all_runs(emulator, f"flowId=={flow_id}") if r["createdAt"] > start * 1000
    ]
    assert created_s(second) == [start + DAY, start + DAY]
    assert {dataset_of(r): records(r) for r in second} == {ds_a: 7, ds_b: 0}

    await emulator.clock.advance(5 * DAY)  # the third slot would be at endTime: none
    assert len(await all_runs(emulator)) == 4


async def test_a_flow_read_fires_due_slots(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=2)
    t0 = int(emulator.clock.time())
    flow_id, _ = await flow_of(emulator, [dataset_id], {**hourly(3), "startTime": t0 + 600})
    await emulator.clock.advance(600)
    box = emulator.state.sandbox(emulator.knobs.org_id, "prod")
    assert box.runs == {}
    await the_flow(emulator, flow_id)
    assert [r.created for r in box.runs.values()] == [t0 + 600]


async def test_a_busy_or_unready_dataset_is_skipped_for_a_slot(emulator: Emulator) -> None:
    (ds_a, ds_b, ds_c) = await emulator.seed(rows=1, count=3)
    t0 = int(emulator.clock.time())
    flow_id, _ = await flow_of(emulator, [ds_a, ds_b], {**hourly(3), "startTime": t0 + 600})
    await emulator.clock.advance(WINDOW)
    await emulator.control("PATCH", "/config", {"run_duration_s": {"min": DAY, "max": DAY}})
    busy = await adhoc(emulator, (flow_id, [ds_a]))
    assert busy.status == 200, busy.body
    await emulator.control("PATCH", "/config", {"run_duration_s": {"min": 5, "max": 5}})
    # ds_c joins 10 s before the slot: still inside its not-ready window then.
    await emulator.clock.advance(600 - WINDOW - 10)
    assert (await repoint(emulator, flow_id, await source_of(emulator, [ds_a, ds_b, ds_c]))).status
    await emulator.clock.advance(10)
    fired = [r for r in await all_runs(emulator) if r["createdAt"] == (t0 + 600) * 1000]
    assert [dataset_of(r) for r in fired] == [ds_b]
    await emulator.clock.advance(3 * 3600)  # ds_a still busy; ds_c ready by now
    fired = [r for r in await all_runs(emulator) if r["createdAt"] == (t0 + 600 + 3 * 3600) * 1000]
    assert sorted(dataset_of(r) for r in fired) == sorted([ds_b, ds_c])


async def test_catching_up_fires_at_most_the_last_48_slots(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=1)
    t0 = int(emulator.clock.time())
    start = t0 + 3 * 3600
    await flow_of(emulator, [dataset_id], {**hourly(3), "startTime": start})
    await emulator.clock.advance(30 * DAY)  # 240 slots went by unobserved
    runs = await all_runs(emulator)
    last = start + 239 * 3 * 3600
    assert created_s(runs) == [last - k * 3 * 3600 for k in range(47, -1, -1)]
    await emulator.clock.advance(RUN_SECONDS)
    runs = await all_runs(emulator)
    assert sum(records(r) for r in runs) == 1  # incremental: the first of them exports the row
    await emulator.clock.advance(3 * 3600)
    assert len(await all_runs(emulator)) == 49


async def test_one_time_and_disabled_flows_do_not_fire(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=1)
    t0 = int(emulator.clock.time())
    await flow_of(emulator, [dataset_id], {**ONE_TIME, "startTime": t0 + 600})
    daily, _ = await flow_of(emulator, [dataset_id], {**DAILY, "startTime": t0 + 600})
    off = await emulator.fs("POST", f"/flows/{daily}/action", params={"op": "disable"})
    assert off.status == 200
    await emulator.clock.advance(3 * DAY)
    assert await all_runs(emulator) == []
    # Enabling does not fire the slots missed while disabled; the next one fires.
    on = await emulator.fs("POST", f"/flows/{daily}/action", params={"op": "enable"})
    assert on.status == 200
    assert await all_runs(emulator) == []
    await emulator.clock.advance(DAY)
    assert created_s(await all_runs(emulator)) == [t0 + 600 + 3 * DAY]


async def test_a_new_schedule_recomputes_the_next_slot(emulator: Emulator) -> None:
    (dataset_id,) = await emulator.seed(rows=1)
    t0 = int(emulator.clock.time())
    flow_id, _ = await flow_of(emulator, [dataset_id], {**DAILY, "startTime": t0 + DAY})
    await emulator.clock.advance(100)
    etag = (await the_flow(emulator, flow_id))["etag"]
    patched = await emulator.fs(
        "PATCH",
        f"/flows/{flow_id}",
        json_body=[
            {"op": "replace", "path": "/scheduleParams", "value": {**hourly(6), "startTime": t0}}
        ],
        headers={"If-Match": etag},
    )
    assert patched.status == 200, patched.body
    await emulator.clock.advance(DAY - 100)
    assert created_s(await all_runs(emulator)) == [t0 + h * 3600 for h in (6, 12, 18, 24)]
