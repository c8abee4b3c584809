"""Flow Service entities on the emulator: specs, connections and flows, over real HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from aep_emulator.flows import six_months_after
from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, STORAGE_SPECS, StorageType
from exporter.clock import FakeClock
from tests.conftest import Answer, Emulator
from tests.workflow import (
    AUTH,
    base_connection,
    flow,
    source_connection,
    spec_ref,
    target_connection,
)

ALL_STORAGE = list(StorageType)


def flow_error(answer: Answer, status: int, code: int) -> None:
    assert answer.status == status, answer.body
    assert answer.body["type"].endswith(f"FLOW-{code}-{status}"), answer.body
    assert answer.body["status"] == status


async def created(emulator: Emulator, path: str, body: dict[str, Any]) -> str:
    answer = await emulator.fs("POST", path, json_body=body)
    assert answer.status == 201, answer.body
    assert answer.body["etag"].startswith('"')
    assert answer.body["etag"].endswith('"')
    return str(answer.body["id"])


async def make_flow(
    emulator: Emulator, storage: StorageType = StorageType.DLZ, **kwargs: Any
) -> tuple[str, str, str]:
    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(storage))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(storage, base))
    flow_id = await created(emulator, "/flows", flow(storage, source, target, **kwargs))
    return flow_id, base, target


async def the_flow(emulator: Emulator, flow_id: str) -> dict[str, Any]:
    answer = await emulator.fs("GET", f"/flows/{flow_id}")
    assert answer.status == 200
    (item,) = answer.body["items"]
    return dict(item)


# -- specs ------------------------------------------------------------------------------------


async def test_connection_specs_name_the_data_lake_source_as_clients_look_it_up(
    emulator: Emulator,
) -> None:
    answer = await emulator.fs("GET", "/connectionSpecs")
    by_name = {s["name"]: s["id"] for s in answer.body["items"]}
    assert by_name["activation-datalake"] == DATALAKE_SOURCE_SPEC_ID
    for spec in STORAGE_SPECS.values():
        assert by_name[spec.name] == spec.connection_spec_id

    one = await emulator.fs("GET", f"/connectionSpecs/{spec_ref(StorageType.S3)['id']}")
    (s3,) = one.body["items"]
    assert {a["name"] for a in s3["authSpec"]} == {"Access Key", "Assumed Role"}
    dlz = await emulator.fs("GET", f"/connectionSpecs/{spec_ref(StorageType.DLZ)['id']}")
    assert dlz.body["items"][0]["authSpec"] == []


async def test_flow_specs_link_each_destination_to_the_data_lake(emulator: Emulator) -> None:
    answer = await emulator.fs("GET", "/flowSpecs")
    specs = {s["id"]: s for s in answer.body["items"]}
    for storage in STORAGE_SPECS.values():
        spec = specs[storage.dataset_flow_spec_id]
        assert spec["sourceConnectionSpecIds"] == [DATALAKE_SOURCE_SPEC_ID]
        assert spec["targetConnectionSpecIds"] == [storage.connection_spec_id]
    flow_error(await emulator.fs("GET", "/flowSpecs/nope"), 404, 1101)


async def test_exportable_datasets_are_paged_by_start_and_limit(emulator: Emulator) -> None:
    ids = await emulator.seed(rows=5, count=5)
    path = f"/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs"
    params = {"outputType": "activationDatasets", "outputField": "datasets", "limit": "2"}
    seen: list[str] = []
    start = 0
    while True:
        page = await emulator.fs("GET", path, params={**params, "start": str(start)})
        assert page.status == 200, page.body
        seen += [d["id"] for d in page.body["items"]]
        info = page.body["pageInfo"]
        assert info["total"] == 5
        if not info["hasNext"]:
            break
        start += 2
    assert sorted(seen) == sorted(ids)
    projected = await emulator.fs("GET", path, params={**params, "properties": "name"})
    assert set(projected.body["items"][0]) == {"id", "name"}
    wrong = await emulator.fs(
        "GET", f"/connectionSpecs/{spec_ref(StorageType.DLZ)['id']}/configs", params=params
    )
    flow_error(wrong, 400, 1413)
    flow_error(await emulator.fs("GET", path), 400, 1400)


# -- base connections ------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ALL_STORAGE)
async def test_base_connections_keep_secrets_to_themselves(
    emulator: Emulator, storage: StorageType
) -> None:
    conn_id = await created(emulator, "/connections", base_connection(storage))
    answer = await emulator.fs("GET", f"/connections/{conn_id}")
    (item,) = answer.body["items"]
    assert item["connectionSpec"] == spec_ref(storage)
    assert item["state"] == "enabled"
    auth = AUTH[storage]
    if auth is None:
        assert "auth" not in item
        return
    secrets = {
        "s3SecretKey",
        "connectionString",
        "servicePrincipalKey",
        "secretAccessKey",
        "password",
    }
    for key, value in auth["params"].items():
        shown = item["auth"]["params"][key]
        assert (shown != value) if key in secrets else (shown == value), key


@pytest.mark.parametrize(
    ("body_change", "status", "code", "words"),
    [
        (
            {
                "auth": {
                    "specName": "Access Key",
                    "params": {"s3AccessKey": "lower", "s3SecretKey": "a" * 40},
                }
            },
            400,
            1400,
            "auth.params.s3AccessKey",
        ),
        (
            {"auth": {"specName": "Access Key", "params": {"s3AccessKey": "ABCDEFGHIJKLMNOPQRST"}}},
            400,
            1400,
            "s3SecretKey",
        ),
        ({"auth": {"specName": "Password", "params": {}}}, 400, 1400, "Access Key"),
        ({"auth": None}, 400, 1400, "specName"),
        ({"connectionSpec": {"id": spec_ref(StorageType.S3)["id"]}}, 422, 1412, "version"),
        (
            {"connectionSpec": {"id": "4890fc95-5a1f-4983-94bb-e060c08e3f81", "version": "1.0"}},
            400,
            1413,
            "valid spec id",
        ),
        ({"name": ""}, 400, 1400, "name"),
    ],
)
async def test_base_connection_validation_says_what_is_wrong(
    emulator: Emulator, body_change: dict[str, Any], status: int, code: int, words: str
) -> None:
    body = {**base_connection(StorageType.S3), **body_change}
    answer = await emulator.fs("POST", "/connections", json_body=body)
    flow_error(answer, status, code)
    assert words in answer.body["errorMessage"]


async def test_assumed_role_and_ssh_key_auth_are_accepted(emulator: Emulator) -> None:
    role = {
        **base_connection(StorageType.S3),
        "auth": {
            "specName": "assumed role",
            "params": {"s3Role": "arn:aws:iam::123456789012:role/x"},
        },
    }
    await created(emulator, "/connections", role)
    ssh = {
        **base_connection(StorageType.SFTP),
        "auth": {
            "specName": "SFTP with SSH Key",
            "params": {"domain": "h.example.com", "username": "u", "sshKey": "c3NoLWtleQ=="},
        },
    }
    await created(emulator, "/connections", ssh)


async def test_dlz_base_connection_takes_auth_null_as_aepp_sends_it(emulator: Emulator) -> None:
    await created(emulator, "/connections", {**base_connection(StorageType.DLZ), "auth": None})
    answer = await emulator.fs(
        "POST",
        "/connections",
        json_body={**base_connection(StorageType.DLZ), "auth": {"specName": "x", "params": {}}},
    )
    flow_error(answer, 400, 1400)


# -- source and target connections -----------------------------------------------------------


async def test_source_connection_must_name_existing_datasets(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed()
    await created(emulator, "/sourceConnections", source_connection(dataset))
    aepp_style = source_connection(dataset)
    aepp_style["params"]["datasets"] = [{"dataSetId": dataset}]
    aepp_style["data"] = {"format": "parquet"}
    await created(emulator, "/sourceConnections", aepp_style)
    unknown = await emulator.fs("POST", "/sourceConnections", json_body=source_connection("0" * 24))
    flow_error(unknown, 400, 1415)
    wrong_spec = {**source_connection(dataset), "connectionSpec": spec_ref(StorageType.DLZ)}
    flow_error(await emulator.fs("POST", "/sourceConnections", json_body=wrong_spec), 400, 1413)
    empty = source_connection(dataset)
    empty["params"]["datasets"] = []
    flow_error(await emulator.fs("POST", "/sourceConnections", json_body=empty), 400, 1400)


@pytest.mark.parametrize(
    ("file_type", "compression", "ok"),
    [
        ("PARQUET", "NONE", True),
        ("PARQUET", "GZIP", True),
        ("JSON", "GZIP", True),
        ("parquet", "gzip", True),
        ("Json", "Gzip", True),
        ("JSON", "NONE", False),
        ("CSV", "NONE", False),
        ("PARQUET", "SNAPPY", False),
    ],
)
async def test_target_format_and_compression_combinations(
    emulator: Emulator, file_type: str, compression: str, ok: bool
) -> None:
    base = await created(emulator, "/connections", base_connection(StorageType.S3))
    body = target_connection(StorageType.S3, base, file_type=file_type, compression=compression)
    answer = await emulator.fs("POST", "/targetConnections", json_body=body)
    if ok:
        assert answer.status == 201, answer.body
        stored = await emulator.fs("GET", f"/targetConnections/{answer.body['id']}")
        assert stored.body["items"][0]["params"]["datasetFileType"] == file_type
    else:
        flow_error(answer, 400, 1400)


@pytest.mark.parametrize(
    ("storage", "params", "words"),
    [
        (StorageType.S3, {"bucketName": "Bad_Bucket"}, "bucketName"),
        (StorageType.S3, {"bucketName": "192.168.1.1"}, "bucketName"),
        (StorageType.GCS, {"bucketName": "google-stuff"}, "bucketName"),
        (StorageType.AZURE_BLOB, {"container": "a--b"}, "container"),
        (StorageType.DLZ, {"path": "../../etc"}, "'..'"),
        (StorageType.SFTP, {"remotePath": "up/../../out"}, "'..'"),
        (StorageType.S3, {"path": None}, "path"),
    ],
)
async def test_target_location_params_are_validated_per_storage(
    emulator: Emulator, storage: StorageType, params: dict[str, Any], words: str
) -> None:
    base = await created(emulator, "/connections", base_connection(storage))
    body = target_connection(storage, base)
    body["params"].update(params)
    body["params"] = {k: v for k, v in body["params"].items() if v is not None}
    answer = await emulator.fs("POST", "/targetConnections", json_body=body)
    flow_error(answer, 400, 1400)
    assert words in answer.body["errorMessage"]


async def test_target_must_match_its_base_connection(emulator: Emulator) -> None:
    base = await created(emulator, "/connections", base_connection(StorageType.S3))
    answer = await emulator.fs(
        "POST", "/targetConnections", json_body=target_connection(StorageType.GCS, base)
    )
    flow_error(answer, 400, 1413)
    missing = target_connection(StorageType.S3, "no-such-base")
    flow_error(await emulator.fs("POST", "/targetConnections", json_body=missing), 400, 1416)


# -- flows ------------------------------------------------------------------------------------

NOW = int(FakeClock().time())  # the emulator fixture runs on this clock


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [
        ({"exportMode": "DAILY_FULL_EXPORT", "timeUnit": "day", "interval": 0}, True),
        ({"exportMode": "FIRST_FULL_THEN_INCREMENTAL", "timeUnit": "day", "interval": 1}, True),
        ({"exportMode": "first_full_then_incremental", "timeUnit": "Hour", "interval": 9}, True),
        ({"timeUnit": "hour", "interval": 3}, True),  # aepp: no exportMode
        ({"timeUnit": "day", "interval": "1"}, True),  # aepp's generic helper sends a string
        ({"exportMode": "DAILY_FULL_EXPORT", "timeUnit": "day", "interval": 1}, False),
        ({"exportMode": "FIRST_FULL_THEN_INCREMENTAL", "timeUnit": "hour", "interval": 8}, False),
        ({"exportMode": "FIRST_FULL_THEN_INCREMENTAL", "timeUnit": "hour", "interval": 24}, False),
        ({"timeUnit": "week", "interval": 1}, False),
        ({"timeUnit": "day", "interval": 1, "frequency": "daily"}, False),
    ],
)
async def test_schedule_combinations(
    emulator: Emulator, schedule: dict[str, Any], ok: bool
) -> None:
    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.DLZ, base))
    body = flow(StorageType.DLZ, source, target, schedule={**schedule, "startTime": NOW})
    answer = await emulator.fs("POST", "/flows", json_body=body)
    if ok:
        assert answer.status == 201, answer.body
        stored = (await the_flow(emulator, answer.body["id"]))["scheduleParams"]
        assert stored["startTime"] == NOW
        assert stored["exportMode"] in ("DAILY_FULL_EXPORT", "FIRST_FULL_THEN_INCREMENTAL")
        assert stored["timeUnit"] in ("hour", "day")
    else:
        flow_error(answer, 400, 1400)
        assert "schedule" in answer.body["errorMessage"].lower()


async def test_flow_times_are_epoch_seconds_with_a_six_month_default_end(
    emulator: Emulator,
) -> None:
    flow_id, _, _ = await make_flow(emulator)
    stored = await the_flow(emulator, flow_id)
    created_s = stored["createdAt"] // 1000
    assert stored["scheduleParams"]["endTime"] == six_months_after(created_s)
    assert 180 * 86400 <= stored["scheduleParams"]["endTime"] - created_s <= 184 * 86400

    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.DLZ, base))
    in_ms = flow(
        StorageType.DLZ,
        source,
        target,
        schedule={"timeUnit": "day", "interval": 1, "startTime": NOW * 1000},
    )
    answer = await emulator.fs("POST", "/flows", json_body=in_ms)
    flow_error(answer, 400, 1400)
    assert "milliseconds" in answer.body["errorMessage"]
    backwards = flow(
        StorageType.DLZ,
        source,
        target,
        schedule={"timeUnit": "day", "interval": 1, "startTime": NOW, "endTime": NOW - 1},
    )
    flow_error(await emulator.fs("POST", "/flows", json_body=backwards), 400, 1400)


@pytest.mark.parametrize("key", ["foldernameTemplate", "folderNameTemplate"])
async def test_both_spellings_of_the_folder_template_are_kept(emulator: Emulator, key: str) -> None:
    schedule = {
        "timeUnit": "day",
        "interval": 1,
        "startTime": NOW,
        key: "%DESTINATION_INSTANCE_NAME%_%DATASET_ID%_%DATETIME(YYYYMMdd_HHmmss)%",
    }
    flow_id, _, _ = await make_flow(emulator, schedule=schedule)
    assert (await the_flow(emulator, flow_id))["scheduleParams"][key] == schedule[key]

    bad = {**schedule, key: "%NOT_A_MACRO%"}
    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.DLZ, base))
    answer = await emulator.fs(
        "POST", "/flows", json_body=flow(StorageType.DLZ, source, target, schedule=bad)
    )
    flow_error(answer, 400, 1400)
    assert "NOT_A_MACRO" in answer.body["errorMessage"]


async def test_flow_create_rejects_state_and_mismatched_connections(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(StorageType.S3))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.S3, base))
    with_state = {**flow(StorageType.S3, source, target), "state": "enabled"}
    flow_error(await emulator.fs("POST", "/flows", json_body=with_state), 400, 1410)
    other_spec = flow(StorageType.GCS, source, target)
    flow_error(await emulator.fs("POST", "/flows", json_body=other_spec), 400, 1413)
    swapped = flow(StorageType.S3, target, source)
    flow_error(await emulator.fs("POST", "/flows", json_body=swapped), 400, 1416)
    no_schedule = flow(StorageType.S3, source, target)
    del no_schedule["scheduleParams"]
    flow_error(await emulator.fs("POST", "/flows", json_body=no_schedule), 400, 1400)


async def test_flow_shows_what_it_links(emulator: Emulator) -> None:
    flow_id, base, target = await make_flow(emulator, StorageType.SFTP)
    stored = await the_flow(emulator, flow_id)
    assert stored["state"] == "enabled"
    assert stored["inheritedAttributes"]["properties"]["isDestinationFlow"] is True
    (linked,) = stored["inheritedAttributes"]["targetConnections"]
    assert linked["id"] == target
    assert linked["baseConnection"]["id"] == base
    assert stored["runs"] == f"/runs?property=flowId=={flow_id}"
    assert stored["version"] == stored["etag"]


# -- PATCH and actions ------------------------------------------------------------------------


async def test_patch_needs_the_current_etag_and_returns_a_new_one(emulator: Emulator) -> None:
    flow_id, _, _ = await make_flow(emulator)
    etag = (await the_flow(emulator, flow_id))["etag"]
    promote = [
        {
            "op": "replace",
            "path": "/scheduleParams",
            "value": {
                "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
                "timeUnit": "hour",
                "interval": 6,
                "startTime": NOW + 3600,
                "endTime": NOW + 86400 * 30,
            },
        }
    ]

    missing = await emulator.fs("PATCH", f"/flows/{flow_id}", json_body=promote)
    flow_error(missing, 400, 1403)
    stale = await emulator.fs(
        "PATCH", f"/flows/{flow_id}", json_body=promote, headers={"If-Match": '"stale"'}
    )
    flow_error(stale, 412, 1404)
    assert "does not match the current version" in stale.body["errorMessage"]

    ok = await emulator.fs(
        "PATCH", f"/flows/{flow_id}", json_body=promote, headers={"If-Match": etag}
    )
    assert ok.status == 200, ok.body
    assert ok.body["id"] == flow_id
    assert ok.body["etag"] != etag
    stored = await the_flow(emulator, flow_id)
    assert stored["etag"] == ok.body["etag"]
    assert stored["scheduleParams"]["interval"] == 6
    again = await emulator.fs(
        "PATCH", f"/flows/{flow_id}", json_body=promote, headers={"If-Match": etag}
    )
    flow_error(again, 412, 1404)


async def test_patch_validates_the_resulting_flow(emulator: Emulator) -> None:
    flow_id, _, _ = await make_flow(emulator)
    etag = (await the_flow(emulator, flow_id))["etag"]

    async def patch(ops: Any) -> Answer:
        return await emulator.fs(
            "PATCH", f"/flows/{flow_id}", json_body=ops, headers={"If-Match": etag}
        )

    # aepp replaces the whole schedule with a start time only: that drops interval and unit.
    aepp = await patch(
        [{"op": "Replace", "path": "/scheduleParams", "value": {"startTime": NOW + 86400}}]
    )
    flow_error(aepp, 400, 1400)
    flow_error(await patch([{"op": "move", "path": "/name", "from": "/x"}]), 400, 1434)
    flow_error(await patch([{"op": "replace", "path": "/flowSpec", "value": {}}]), 400, 1455)
    flow_error(await patch([]), 400, 1455)
    unchanged = await the_flow(emulator, flow_id)
    assert unchanged["etag"] == etag

    one_field = await patch(
        [
            {"op": "replace", "path": "/scheduleParams/startTime", "value": NOW + 7200},
            {"op": "replace", "path": "/name", "value": "renamed"},
        ]
    )
    assert one_field.status == 200, one_field.body
    stored = await the_flow(emulator, flow_id)
    assert stored["scheduleParams"]["startTime"] == NOW + 7200
    assert stored["scheduleParams"]["interval"] == 0
    assert stored["name"] == "renamed"


@pytest.mark.parametrize(("disable", "enable"), [("disable", "enable"), ("DISABLE", "ENABLE")])
async def test_enable_and_disable_in_either_case(
    emulator: Emulator, disable: str, enable: str
) -> None:
    flow_id, _, _ = await make_flow(emulator)
    etag = (await the_flow(emulator, flow_id))["etag"]
    off = await emulator.fs("POST", f"/flows/{flow_id}/action", params={"op": disable})
    assert off.status == 200, off.body
    assert off.body["etag"] != etag
    assert (await the_flow(emulator, flow_id))["state"] == "disabled"
    twice = await emulator.fs("POST", f"/flows/{flow_id}/action", params={"op": disable})
    flow_error(twice, 400, 1422)
    on = await emulator.fs("POST", f"/flows/{flow_id}/action", params={"op": enable})
    assert on.status == 200
    assert (await the_flow(emulator, flow_id))["state"] == "enabled"
    bogus = await emulator.fs("POST", f"/flows/{flow_id}/action", params={"op": "pause"})
    flow_error(bogus, 400, 1436)


# -- delete -----------------------------------------------------------------------------------


async def test_a_base_connection_in_use_cannot_be_deleted(emulator: Emulator) -> None:
    flow_id, base, target = await make_flow(emulator)
    in_use = await emulator.fs("DELETE", f"/connections/{base}")
    flow_error(in_use, 400, 1418)
    assert flow_id in in_use.body["errorMessage"]
    flow_error(await emulator.fs("DELETE", f"/targetConnections/{target}"), 400, 1418)

    gone = await emulator.fs("DELETE", f"/flows/{flow_id}")
    assert gone.status == 202
    assert gone.body is None
    flow_error(await emulator.fs("GET", f"/flows/{flow_id}"), 404, 1101)
    assert (await emulator.fs("DELETE", f"/targetConnections/{target}")).status == 202
    assert (await emulator.fs("DELETE", f"/connections/{base}")).status == 202
    flow_error(await emulator.fs("DELETE", f"/connections/{base}"), 404, 1101)


# -- lists ------------------------------------------------------------------------------------


async def test_flow_lists_filter_count_and_page(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed()
    base = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.DLZ, base))
    ids = [
        await created(
            emulator, "/flows", flow(StorageType.DLZ, source, target, name=f"flow-{i:03d}")
        )
        for i in range(7)
    ]
    await emulator.fs("POST", f"/flows/{ids[0]}/action", params={"op": "disable"})

    async def listed(*props: str, **params: str) -> Answer:
        query = [("property", p) for p in props] + list(params.items())
        answer = await emulator.fs("GET", "/flows", params=query)
        assert answer.status == 200, answer.body
        return answer

    assert [f["id"] for f in (await listed("name==flow-003")).body["items"]] == [ids[3]]
    assert {f["id"] for f in (await listed("name==flow-001,flow-002")).body["items"]} == {
        ids[1],
        ids[2],
    }
    assert [f["id"] for f in (await listed("state==disabled")).body["items"]] == [ids[0]]
    assert (await listed("state==enabled", count="true")).body == {"count": 6}
    assert (
        await listed(f"sourceConnectionIds[]=={source}", "state!=disabled", count="true")
    ).body == {"count": 6}
    dlz_spec = STORAGE_SPECS[StorageType.DLZ].dataset_flow_spec_id
    assert (await listed(f"flowSpec.id=={dlz_spec}", count="true")).body == {"count": 7}
    newest_first = [f["id"] for f in (await listed()).body["items"]]
    assert set(newest_first) == set(ids)

    seen: list[str] = []
    page = await listed(limit="3", orderby="name")
    while True:
        seen += [f["id"] for f in page.body["items"]]
        nxt = page.body.get("_links", {}).get("next")
        if nxt is None:
            break
        answer = await emulator.request(
            "GET",
            "/data/foundation/flowservice" + nxt["href"]
            if nxt["href"].startswith("/flows")
            else nxt["href"],
        )
        assert answer.status == 200, answer.body
        page = answer
    assert seen == ids
