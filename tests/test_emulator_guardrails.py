"""What real AEP refuses, the emulator refuses too (issue 9): the per-sandbox limit on destination
dataflows, immutable source connections, per-dataset readiness, the dataset cap of one ad hoc
call, runs that name their dataset, scheduled runs in emulated time, and `count=false` lists."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.aep import STORAGE_SPECS, StorageType
from exporter.emulator.settings import Knobs
from tests.conftest import Answer, Emulator, default_knobs
from tests.workflow import base_connection, source_connection, target_connection


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
        return default_knobs(max_destination_flows=3)

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
