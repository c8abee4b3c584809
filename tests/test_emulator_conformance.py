"""Conformance of the emulator with Adobe's OpenAPI files, over real HTTP.

Every operation the emulator serves is driven here through :class:`Conformance`, which checks
the request the test sends (body, query and headers: the shapes the exporter's client reuses)
and the answer it gets (status and body) against the spec file(s) that describe that operation
best, as tests/openapi.py's author assessed them:

- ``destinations.yaml`` for creating, reading, listing and deleting connections, source and
  target connections and flows, for PATCH /flows and for GET /runs.  It only knows the S3 and
  SFTP variants of base and target connections, so other storages are checked against
  ``flow-service.yaml`` alone.  Its 200 schemas for connection reads are the bare item; the
  ``wrap_items`` deviations of :data:`tests.openapi.KNOWN_DEVIATIONS` apply them per item.
- ``flow-service.yaml`` for spec listings, flow actions and GET /runs/{id} (whose body is also
  checked against destinations.yaml's ``Flow_Runs``), for the repeated ``property`` filter and
  the ``/sourceConnectionIds`` patch (which destinations.yaml cannot express), and everywhere
  else as a second opinion where its looser schemas are usable.  It gives DELETE 204 while
  ``destinations.yaml`` says 202, so deletes follow ``destinations.yaml``.
- ``ad-hoc-activation.yaml`` for POST /adhocrun: it only describes audience bodies, so the
  dataset variant relies on the documented deviations; its 400 ``{message}`` is usable.

Where a ``oneOf`` overlaps, the message is also pinned to its component with ``validate_schema``.
Operations no spec file describes (the IMS token, the Data Landing Zone, the exportable-dataset
listing's 200 body) are checked by hand against the Adobe pages each scenario cites.  Error bodies
have no usable schemas besides ad hoc's 400: their status must be one the file lists, and
Flow Service envelopes are checked against docs/aep-notes.md#error-envelopes.

Adobe's own spec quirks are :data:`tests.openapi.KNOWN_DEVIATIONS`; where the emulator itself
deliberately differs (docs/aep-notes.md), :data:`EMULATOR_CHOICES` names the rule and the reason.
Validation is never loosened globally.  :func:`test_every_route_is_covered` proves that each route
the emulator registers answered a checked call here, and that no request bypassed the checks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from aep_emulator.app import create_app
from aep_emulator.connections import MASK
from aep_emulator.control import PREFIX as CONTROL_PREFIX
from aep_emulator.settings import DEFAULT_CLIENT_ID
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    DATALAKE_SOURCE_SPEC_NAME,
    FLOW_SERVICE_PATH,
    IMS_TOKEN_PATH,
    LANDING_ZONE_PATH,
    NOT_READY_MESSAGE,
    STORAGE_SPECS,
    StorageType,
)
from tests.conftest import EMULATOR_SECRET, Answer, Emulator, default_knobs
from tests.openapi import (
    KNOWN_DEVIATIONS,
    SCHEMAS_FILE,
    Deviation,
    operation_for,
    validate_request_body,
    validate_request_parameters,
    validate_response,
    validate_schema,
)
from tests.workflow import (
    base_connection,
    flow,
    source_connection,
    spec_ref,
    target_connection,
)

DEST = "destinations"
FS = "flow-service"
ADHOC = "ad-hoc-activation"
BOTH = (DEST, FS)

WINDOW = 60.0  # default_knobs: a new flow answers "not ready" for 60 emulated seconds
RUN_SECONDS = 5.0  # default_knobs: every run takes 5 emulated seconds

# destinations.yaml describes base and target connections of these storages only.
IN_DESTINATIONS_YAML = frozenset({StorageType.S3, StorageType.SFTP})

# Where the emulator itself deliberately differs from the spec; these apply to this test only.
EMULATOR_CHOICES: tuple[Deviation, ...] = (
    Deviation(
        api=DEST,
        rule="#/components/schemas/AmazonS3Auth/properties/params/properties/s3SecretKey/pattern",
        accept=(MASK,),
        reason=(
            "the emulator never echoes a secret: auth params its connection specs mark "
            "format=password read back as '****' (aep_emulator/specs.py, "
            "docs/aep-notes.md)"
        ),
    ),
)

# aepp sends Python's `count=False` with `limit` on every list call; the files declare `count` a
# boolean, whose query form is lowercase. The emulator accepts any case (docs/aep-notes.md).
LISTS = ("/flows", "/runs", "/connections", "/sourceConnections", "/targetConnections")
AEPP_COUNT: tuple[Deviation, ...] = tuple(
    Deviation(
        api=api,
        rule=f"GET {path} query#/properties/count/type",
        accept=("False",),
        reason="aepp sends count=False with limit; the emulator reads count case-insensitively "
        "(docs/aep-notes.md)",
    )
    for api in (DEST, FS)
    for path in LISTS
)

DEVIATIONS: tuple[Deviation, ...] = (*KNOWN_DEVIATIONS, *EMULATOR_CHOICES, *AEPP_COUNT)

Query = Mapping[str, str | Sequence[str]]


@cache
def _responses(api: str, method: str, template: str) -> frozenset[str]:
    with SCHEMAS_FILE.open(encoding="utf-8") as handle:
        paths: dict[str, Any] = json.load(handle)["apis"][api]["paths"]
    return frozenset(paths[template][method.lower()]["responses"])


def assert_status_documented(api: str, method: str, path: str, status: int) -> None:
    """validate_response passes unlisted statuses; a conformance test must not."""
    template = operation_for(api, method, path)
    listed = _responses(api, method, template)
    assert str(status) in listed or f"{str(status)[0]}XX" in listed, (
        f"{api}: {method} {template} does not list status {status} (lists {sorted(listed)})"
    )


def _pairs(query: Query | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in (query or {}).items():
        out += [(name, value)] if isinstance(value, str) else [(name, v) for v in value]
    return out


@dataclass
class Conformance:
    """Sends requests to the emulator and checks both directions against the spec files."""

    emulator: Emulator
    checked: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # method, path, status

    async def call(
        self,
        method: str,
        path: str,
        *,
        status: int,
        request: Sequence[str] = (),
        response: Sequence[str] = (),
        body: Any = None,
        query: Query | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One call. ``path`` is the full path; ``request``/``response`` name the spec files
        that check what is sent (body, query, headers) and what comes back (status, body)."""
        extra = dict(headers or {})
        if body is not None:
            extra.setdefault("Content-Type", "application/json")
        sent = {**await self.emulator.headers(), **extra}
        for api in request:
            validate_request_body(api, method, path, body, deviations=DEVIATIONS)
            validate_request_parameters(
                api, method, path, query=query or {}, headers=sent, deviations=DEVIATIONS
            )
        answer = await self.emulator.request(
            method, path, json_body=body, params=_pairs(query) or None, headers=extra
        )
        assert answer.status == status, (method, path, answer.status, answer.body)
        if answer.body is not None:
            assert answer.headers["Content-Type"].startswith("application/json"), answer.headers
        for api in response:
            assert_status_documented(api, method, path, answer.status)
            validate_response(api, method, path, answer.status, answer.body, deviations=DEVIATIONS)
        self.checked[method.upper(), URL(path).path, answer.status] += 1
        return answer

    async def fs(self, method: str, path: str, **kwargs: Any) -> Answer:
        return await self.call(method, FLOW_SERVICE_PATH + path, **kwargs)


@pytest.fixture
def aep(emulator: Emulator) -> Conformance:
    return Conformance(emulator)


def only(answer: Answer) -> dict[str, Any]:
    (item,) = answer.body["items"]
    assert isinstance(item, dict)
    return item


def flow_error(answer: Answer, code: int) -> None:
    """Flow Service's error envelope (docs/aep-notes.md#error-envelopes; no schema in the files)."""
    assert answer.body["type"].endswith(f"/FLOW-{code}-{answer.status}"), answer.body
    assert answer.body["status"] == answer.status
    assert isinstance(answer.body["report"]["detailed-message"], str)


def created_id(answer: Answer) -> str:
    assert set(answer.body) == {"id", "etag"}, answer.body
    etag = answer.body["etag"]
    assert etag.startswith('"'), etag
    assert etag.endswith('"'), etag
    return str(answer.body["id"])


# -- IMS -------------------------------------------------------------------------------------


async def scenario_ims_token(aep: Conformance) -> None:
    """No spec file covers IMS; Adobe's IMS guide is the reference:
    https://developer.adobe.com/developer-console/docs/guides/authentication/ServerToServerAuthentication/ims
    """
    form = {
        "grant_type": "client_credentials",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": EMULATOR_SECRET,
        "scope": "openid,AdobeID,read_organizations",
    }
    answer = await aep.emulator.request("POST", IMS_TOKEN_PATH, form=form, auth=False)
    assert answer.status == 200, answer.body
    aep.checked["POST", IMS_TOKEN_PATH, answer.status] += 1
    assert answer.headers["Content-Type"].startswith("application/json")
    assert set(answer.body) == {"access_token", "token_type", "expires_in"}
    assert isinstance(answer.body["access_token"], str)
    assert answer.body["token_type"] == "bearer"
    expires_in = answer.body["expires_in"]
    assert isinstance(expires_in, int)
    assert 0 < expires_in <= 86400, "expires_in is in seconds"


# -- connection specs, flow specs, exportable datasets ----------------------------------------


async def scenario_specs(aep: Conformance) -> None:
    listed = await aep.fs("GET", "/connectionSpecs", status=200, request=[FS], response=[FS])
    names = {s["name"]: s["id"] for s in listed.body["items"]}
    assert names[DATALAKE_SOURCE_SPEC_NAME] == DATALAKE_SOURCE_SPEC_ID
    filtered = await aep.fs(
        "GET",
        "/connectionSpecs",
        query={"property": f"id=={spec_ref(StorageType.S3)['id']},{DATALAKE_SOURCE_SPEC_ID}"},
        status=200,
        request=[FS],
        response=[FS],
    )
    assert len(filtered.body["items"]) == 2
    for storage in StorageType:
        one = await aep.fs(
            "GET",
            f"/connectionSpecs/{spec_ref(storage)['id']}",
            status=200,
            request=[FS],
            response=[FS],
        )
        assert only(one)["name"] == STORAGE_SPECS[storage].name
    unknown = await aep.fs(
        "GET", "/connectionSpecs/00000000-0000-0000-0000-000000000000", status=404, request=[FS]
    )
    flow_error(unknown, 1101)

    flow_specs = await aep.fs("GET", "/flowSpecs", status=200, request=[FS], response=[FS])
    ids = {s["id"] for s in flow_specs.body["items"]}
    for spec in STORAGE_SPECS.values():
        assert spec.dataset_flow_spec_id in ids
        one = await aep.fs(
            "GET",
            f"/flowSpecs/{spec.dataset_flow_spec_id}",
            status=200,
            request=[FS],
            response=[FS],
        )
        assert only(one)["id"] == spec.dataset_flow_spec_id


async def scenario_exportable_datasets(aep: Conformance) -> None:
    """destinations.yaml has the query rules but no 200 schema; flow-service.yaml's 200 schema
    (an array of explore entries) does not describe this listing; the dataset export guide does:
    https://experienceleague.adobe.com/en/docs/experience-platform/destinations/api/export-datasets
    """
    dataset_ids = await aep.emulator.seed(rows=5, count=3)
    path = f"/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs"
    query = {"outputType": "activationDatasets", "outputField": "datasets", "limit": "2"}
    seen: list[str] = []
    start = 0
    while True:
        page = await aep.fs(
            "GET", path, query={**query, "start": str(start)}, status=200, request=[DEST]
        )
        assert set(page.body) == {"items", "pageInfo"}
        info = page.body["pageInfo"]
        assert set(info) == {"start", "end", "total", "hasNext"}
        assert info["start"] == start
        assert info["end"] == start + len(page.body["items"]) - 1
        for dataset in page.body["items"]:
            assert {"id", "name", "state"} <= set(dataset), dataset
        seen += [d["id"] for d in page.body["items"]]
        if not info["hasNext"]:
            break
        start += len(page.body["items"])
    assert set(dataset_ids) <= set(seen)
    assert len(seen) == info["total"]
    projected = await aep.fs(
        "GET", path, query={**query, "properties": "name,state"}, status=200, request=[DEST]
    )
    assert all(set(d) == {"id", "name", "state"} for d in projected.body["items"])


# -- connections and flows ---------------------------------------------------------------------


@dataclass
class Entities:
    storage: StorageType
    dataset_id: str
    base_id: str
    source_id: str
    target_id: str
    flow_id: str


def in_destinations(storage: StorageType) -> tuple[str, ...]:
    return BOTH if storage in IN_DESTINATIONS_YAML else (FS,)


async def create_entities(
    aep: Conformance,
    storage: StorageType,
    *,
    schedule: dict[str, Any] | None = None,
    name: str = "conformance",
) -> Entities:
    """Base, source and target connection and a dataset flow, each request checked."""
    (dataset_id,) = await aep.emulator.seed(rows=10)
    specs = in_destinations(storage)
    base = await aep.fs(
        "POST",
        "/connections",
        body=base_connection(storage, name=f"{name}-base"),
        status=201,
        request=specs,
        response=BOTH,
    )
    base_id = created_id(base)
    source_body = source_connection(dataset_id, name=f"{name}-source")
    # oneOf(generic, data lake) overlaps: pin the alternative this body is meant to be.
    validate_schema(
        DEST,
        "Create_Data_Lake_Source_Connection_Request",
        source_body,
        direction="request",
        deviations=DEVIATIONS,
    )
    source = await aep.fs(
        "POST", "/sourceConnections", body=source_body, status=201, request=BOTH, response=BOTH
    )
    source_id = created_id(source)
    target = await aep.fs(
        "POST",
        "/targetConnections",
        body=target_connection(storage, base_id, name=f"{name}-target"),
        status=201,
        request=specs,
        response=BOTH,
    )
    target_id = created_id(target)
    body = flow(storage, source_id, target_id, name=name, schedule=schedule)
    # The flow-request oneOf overlaps too: pin the dataset-flow request.
    validate_schema(
        DEST,
        "Create_Batch_Destination_Flow_Request_Dataset_V2",
        body,
        direction="request",
        deviations=DEVIATIONS,
    )
    made = await aep.fs("POST", "/flows", body=body, status=201, request=BOTH, response=BOTH)
    return Entities(storage, dataset_id, base_id, source_id, target_id, created_id(made))


async def scenario_entities(aep: Conformance, storage: StorageType) -> None:
    made = await create_entities(aep, storage, name=f"entities-{storage.value}")
    specs = in_destinations(storage)
    spec_filter = {"property": f"connectionSpec.id=={spec_ref(storage)['id']}"}

    base = only(
        await aep.fs(
            "GET", f"/connections/{made.base_id}", status=200, request=BOTH, response=specs
        )
    )
    assert base["connectionSpec"] == spec_ref(storage)
    bases = await aep.fs(
        "GET", "/connections", query=spec_filter, status=200, request=BOTH, response=specs
    )
    assert made.base_id in {c["id"] for c in bases.body["items"]}

    source = only(
        await aep.fs(
            "GET",
            f"/sourceConnections/{made.source_id}",
            status=200,
            request=BOTH,
            response=BOTH,
        )
    )
    assert source["params"]["datasets"][0]["dataSetId"] == made.dataset_id
    sources = await aep.fs(
        "GET",
        "/sourceConnections",
        query={"property": f"id=={made.source_id}"},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    assert [s["id"] for s in sources.body["items"]] == [made.source_id]

    target = only(
        await aep.fs(
            "GET",
            f"/targetConnections/{made.target_id}",
            status=200,
            request=BOTH,
            response=specs,
        )
    )
    assert target["baseConnectionId"] == made.base_id
    targets = await aep.fs(
        "GET", "/targetConnections", query=spec_filter, status=200, request=BOTH, response=specs
    )
    assert made.target_id in {t["id"] for t in targets.body["items"]}

    the_flow = only(
        await aep.fs("GET", f"/flows/{made.flow_id}", status=200, request=BOTH, response=BOTH)
    )
    # oneOf(Batch_Flow, Streaming_Flow) overlaps: pin the alternative a dataset flow is.
    validate_schema(DEST, "Batch_Flow", {"items": [the_flow]}, deviations=DEVIATIONS)
    flows = await aep.fs(
        "GET",
        "/flows",
        query={"property": f"flowSpec.id=={STORAGE_SPECS[storage].dataset_flow_spec_id}"},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    assert made.flow_id in {f["id"] for f in flows.body["items"]}
    validate_schema(DEST, "Batch_Flow", flows.body, deviations=DEVIATIONS)

    # Deleting in dependency order; each entity is gone afterwards.
    for collection, entity_id in (
        ("flows", made.flow_id),
        ("targetConnections", made.target_id),
        ("sourceConnections", made.source_id),
        ("connections", made.base_id),
    ):
        deleted = await aep.fs(
            "DELETE", f"/{collection}/{entity_id}", status=202, request=[DEST], response=[DEST]
        )
        assert deleted.body is None
        # Only destinations.yaml lists 404 for reads.
        gone = await aep.fs(
            "GET", f"/{collection}/{entity_id}", status=404, request=BOTH, response=[DEST]
        )
        flow_error(gone, 1101)


async def scenario_flow_updates(aep: Conformance) -> None:
    made = await create_entities(aep, StorageType.S3, name="updates")
    path = f"/flows/{made.flow_id}"
    etag = only(await aep.fs("GET", path, status=200, request=BOTH, response=BOTH))["etag"]

    schedule = {
        "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
        "timeUnit": "hour",
        "interval": 3,
        "startTime": 1_900_000_000,
        "endTime": 1_910_000_000,
        "folderNameTemplate": "%DATASET_ID%/%DATETIME(YYYYMMdd_HHmmss)%",
    }
    # PatchFlowItem.value's oneOf overlaps: pin the schedule itself.
    validate_schema(
        DEST, "DatasetScheduleParams_V2", schedule, direction="request", deviations=DEVIATIONS
    )
    patch = [{"op": "replace", "path": "/scheduleParams", "value": schedule}]
    patched = await aep.fs(
        "PATCH",
        path,
        body=patch,
        headers={"If-Match": etag},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    assert created_id(patched) == made.flow_id
    etag = patched.body["etag"]
    stale = await aep.fs(
        "PATCH",
        path,
        body=patch,
        headers={"If-Match": '"stale"'},
        status=412,
        request=BOTH,
        response=[DEST],
    )
    flow_error(stale, 1404)

    # Repoint the flow at a new source connection: flow-service.yaml describes this patch,
    # destinations.yaml's PatchFlowItem only has object values.
    second = await aep.fs(
        "POST",
        "/sourceConnections",
        body=source_connection(made.dataset_id, name="updates-source-2"),
        status=201,
        request=BOTH,
        response=BOTH,
    )
    repoint = [{"op": "replace", "path": "/sourceConnectionIds", "value": [created_id(second)]}]
    patched = await aep.fs(
        "PATCH",
        path,
        body=repoint,
        headers={"If-Match": etag},
        status=200,
        request=[FS],
        response=BOTH,
    )
    current = only(await aep.fs("GET", path, status=200, request=BOTH, response=BOTH))
    assert current["sourceConnectionIds"] == [created_id(second)]
    assert current["scheduleParams"]["interval"] == 3

    for op, state in (("disable", "disabled"), ("enable", "enabled")):
        acted = await aep.fs(
            "POST",
            f"{path}/action",
            query={"op": op},
            status=200,
            request=[FS],
            response=[FS],
        )
        assert created_id(acted) == made.flow_id
        current = only(await aep.fs("GET", path, status=200, request=BOTH, response=BOTH))
        assert current["state"] == state


# -- ad hoc runs and the runs API ---------------------------------------------------------------


def adhoc_body(flow_id: str, *dataset_ids: str) -> dict[str, Any]:
    datasets = [{"id": d} for d in dataset_ids]
    return {"activationInfo": {"destinations": [{"flowId": flow_id, "datasets": datasets}]}}


async def adhoc(aep: Conformance, flow_id: str, *dataset_ids: str, status: int) -> Answer:
    return await aep.call(
        "POST",
        ADHOC_PATH,
        body=adhoc_body(flow_id, *dataset_ids),
        headers={"Accept": ADHOC_DATASET_ACCEPT},
        status=status,
        request=[ADHOC],
        response=[ADHOC],
    )


async def trigger(aep: Conformance, flow_id: str, dataset_id: str) -> str:
    """A ready flow's ad hoc run; the answer's shape: docs/aep-notes.md#ad-hoc-dataset-exports."""
    answer = await adhoc(aep, flow_id, dataset_id, status=200)
    (destination,) = answer.body["destinations"]
    (started,) = destination["datasets"]
    assert started["id"] == dataset_id
    assert started["flowId"] == flow_id
    status_url = URL(started["statusURL"])
    assert status_url.path.startswith(f"{FLOW_SERVICE_PATH}/runs/")
    return status_url.name


async def get_run(aep: Conformance, run_id: str) -> dict[str, Any]:
    """flow-service.yaml alone has GET /runs/{id}; its body is the envelope of GET /runs
    (https://developer.adobe.com/experience-platform-apis/references/flow-service/), so
    destinations.yaml's Flow_Runs describes it as well."""
    answer = await aep.fs("GET", f"/runs/{run_id}", status=200, request=[FS], response=[FS])
    validate_schema(DEST, "Flow_Runs", answer.body, deviations=DEVIATIONS)
    return only(answer)


def run_status(run: dict[str, Any]) -> str:
    return str(run["metrics"]["statusSummary"]["status"])


async def scenario_runs(aep: Conformance) -> None:
    made = await create_entities(aep, StorageType.DLZ, name="runs")
    not_ready = await adhoc(aep, made.flow_id, made.dataset_id, status=400)
    assert not_ready.body == {"message": NOT_READY_MESSAGE}
    await aep.emulator.clock.advance(WINDOW)

    run_id = await trigger(aep, made.flow_id, made.dataset_id)
    running = await get_run(aep, run_id)
    assert run_status(running) == "processing"
    assert "completedAtUTC" not in running["metrics"]["durationSummary"]
    busy = await adhoc(aep, made.flow_id, made.dataset_id, status=400)
    assert run_id in busy.body["message"]

    await aep.emulator.clock.advance(RUN_SECONDS)
    done = await get_run(aep, run_id)
    assert run_status(done) == "success"
    metrics = done["metrics"]
    assert (
        metrics["durationSummary"]["completedAtUTC"] >= metrics["durationSummary"]["startedAtUTC"]
    )
    assert metrics["recordSummary"]["outputRecordCount"] == 10
    assert metrics["fileSummary"]["outputFileCount"] >= 1
    assert metrics["statusSummary"]["errors"] == []

    await aep.emulator.control("PATCH", "/config", {"run_failure_rate": 1.0})
    try:
        failed_id = await trigger(aep, made.flow_id, made.dataset_id)
    finally:
        await aep.emulator.control("PATCH", "/config", {"run_failure_rate": 0.0})
    await aep.emulator.clock.advance(RUN_SECONDS)
    failed = await get_run(aep, failed_id)
    assert run_status(failed) == "failed"
    assert "outputFileCount" not in failed["metrics"]["fileSummary"]
    assert failed["metrics"]["statusSummary"]["errors"][0]["code"] == "ACTIVATION_BATCH-0000-FAILED"

    # A partial export succeeds with warnings in statusSummary.errors.
    await aep.emulator.control("PATCH", "/config", {"run_partial_rate": 1.0})
    try:
        partial_id = await trigger(aep, made.flow_id, made.dataset_id)
    finally:
        await aep.emulator.control("PATCH", "/config", {"run_partial_rate": 0.0})
    await aep.emulator.clock.advance(RUN_SECONDS)
    partial = await get_run(aep, partial_id)
    assert run_status(partial) == "success"
    assert [e["type"] for e in partial["metrics"]["statusSummary"]["errors"]] == ["Warning"]

    runs = await aep.fs(
        "GET",
        "/runs",
        query={"property": f"flowId=={made.flow_id}"},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    by_id = {r["id"]: run_status(r) for r in runs.body["items"]}
    assert by_id == {run_id: "success", failed_id: "failed", partial_id: "success"}
    only_failed = await aep.fs(
        "GET",
        "/runs",
        query={"property": [f"flowId=={made.flow_id}", "metrics.statusSummary.status==failed"]},
        status=200,
        # A repeated `property` (filters ANDed, as the sorting and filtering guide says:
        # https://experienceleague.adobe.com/en/docs/experience-platform/dataflows/api/sort-and-filter):
        # flow-service.yaml declares it an array, destinations.yaml a single string.
        request=[FS],
        response=BOTH,
    )
    assert [r["id"] for r in only_failed.body["items"]] == [failed_id]
    flow_error(await aep.fs("GET", "/runs/not-a-run", status=404, request=[FS]), 1101)


# -- guardrails (issue 9) ------------------------------------------------------------------------


SUMMARIES = "metrics.recordSummary.sourceSummaries[].id"


async def scenario_guardrails(aep: Conformance) -> None:
    """What issue 9 added: a dataset joining a flow through a new source connection, one ad hoc
    call for several datasets of several flows (refused whole while one is not ready), runs
    naming their dataset and filtered by it, `count=false` with `limit`, the flow limit."""
    first = await create_entities(aep, StorageType.DLZ, name="guard-1")
    second = await create_entities(aep, StorageType.S3, name="guard-2")
    body = source_connection(first.dataset_id, name="guard-1-source-2")
    body["params"]["datasets"].append({"dataSetId": second.dataset_id, "name": "features"})
    validate_schema(
        DEST,
        "Create_Data_Lake_Source_Connection_Request",
        body,
        direction="request",
        deviations=DEVIATIONS,
    )
    source = await aep.fs(
        "POST", "/sourceConnections", body=body, status=201, request=BOTH, response=BOTH
    )
    source_id = created_id(source)
    path = f"/flows/{first.flow_id}"
    etag = only(await aep.fs("GET", path, status=200, request=BOTH, response=BOTH))["etag"]
    await aep.emulator.clock.advance(WINDOW)
    repoint = [{"op": "replace", "path": "/sourceConnectionIds", "value": [source_id]}]
    await aep.fs(
        "PATCH",
        path,
        body=repoint,
        headers={"If-Match": etag},
        status=200,
        request=[FS],  # destinations.yaml's PatchFlowItem only has object values
        response=BOTH,
    )

    asked = [
        (first.flow_id, first.dataset_id),
        (first.flow_id, second.dataset_id),
        (second.flow_id, second.dataset_id),
    ]
    call = {
        "activationInfo": {
            "destinations": [
                {"flowId": flow_id, "datasets": [{"id": d} for f, d in asked if f == flow_id]}
                for flow_id in (first.flow_id, second.flow_id)
            ]
        }
    }
    accept = {"Accept": ADHOC_DATASET_ACCEPT}
    refused = await aep.call(
        "POST",
        ADHOC_PATH,
        body=call,
        headers=accept,
        status=400,
        request=[ADHOC],
        response=[ADHOC],
    )
    assert refused.body == {"message": NOT_READY_MESSAGE}  # the dataset that just joined
    await aep.emulator.clock.advance(WINDOW)
    answer = await aep.call(
        "POST",
        ADHOC_PATH,
        body=call,
        headers=accept,
        status=200,
        request=[ADHOC],
        response=[ADHOC],
    )
    started = [d for dest in answer.body["destinations"] for d in dest["datasets"]]
    assert [(d["flowId"], d["id"]) for d in started] == asked
    run_ids = [URL(d["statusURL"]).name for d in started]
    assert len(set(run_ids)) == 3
    await aep.emulator.clock.advance(RUN_SECONDS)
    for (_, dataset_id), run_id in zip(asked, run_ids, strict=True):
        summary = (await get_run(aep, run_id))["metrics"]["recordSummary"]
        assert summary["sourceSummaries"] == [{"id": dataset_id, "inputRecordCount": 10}]
    of_second = await aep.fs(
        "GET",
        "/runs",
        query={"property": f"{SUMMARIES}=={second.dataset_id}"},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    assert sorted(r["id"] for r in of_second.body["items"]) == sorted(run_ids[1:])
    in_first = await aep.fs(
        "GET",
        "/runs",
        query={"property": [f"{SUMMARIES}=={second.dataset_id}", f"flowId=={first.flow_id}"]},
        status=200,
        request=[FS],  # a repeated `property`: flow-service.yaml declares it an array
        response=BOTH,
    )
    assert [r["id"] for r in in_first.body["items"]] == [run_ids[1]]

    # aepp's `count=False` with `limit`, on every list.
    # Base and target connections of the S3 flow: destinations.yaml knows S3, not the DLZ.
    s3 = f"connectionSpec.id=={spec_ref(StorageType.S3)['id']}"
    for collection in LISTS:
        narrow = {"property": s3} if collection in ("/connections", "/targetConnections") else {}
        for false in ("false", "False"):
            listed = await aep.fs(
                "GET",
                collection,
                query={**narrow, "count": false, "limit": "1"},
                status=200,
                request=BOTH,
                response=BOTH,
            )
            assert len(listed.body["items"]) == 1

    # The limit on destination dataflows, at the number this sandbox holds now.
    counted = await aep.fs(
        "GET", "/flows", query={"count": "true"}, status=200, request=BOTH, response=BOTH
    )
    held = counted.body["count"]
    await aep.emulator.control("PATCH", "/config", {"max_destination_flows": held})
    try:
        over = await aep.fs(
            "POST",
            "/flows",
            body=flow(StorageType.DLZ, source_id, first.target_id, name="guard-over"),
            status=400,
            request=BOTH,
            # Neither file lists 400 for POST /flows: flow_error checks the envelope below.
        )
    finally:
        await aep.emulator.control("PATCH", "/config", {"max_destination_flows": 100})
    flow_error(over, 1400)
    assert over.body["report"]["detailed-message"].startswith(
        f"Maximum number of destinations reached: sandbox prod has {held} destination "
        f"dataflows, the limit is {held}."
    )


# -- Data Landing Zone ----------------------------------------------------------------------------


async def scenario_landing_zone(aep: Conformance) -> None:
    """No spec file covers the landing zone: docs/aep-notes.md#data-landing-zone (Azure-hosted)."""
    query = {"type": "dlz_destination"}
    info = await aep.call("GET", LANDING_ZONE_PATH, query=query, status=200)
    assert info.body == {"containerName": "dlz-destination", "containerTTL": "7"}
    keys = {"containerName", "SASToken", "storageAccountName", "SASUri"}
    credentials = await aep.call("GET", f"{LANDING_ZONE_PATH}/credentials", query=query, status=200)
    assert set(credentials.body) == keys
    account = credentials.body["storageAccountName"]
    uri = URL(credentials.body["SASUri"])
    assert uri.host == f"{account}.blob.core.windows.net"
    assert uri.path == "/dlz-destination"
    assert uri.query_string == credentials.body["SASToken"]
    refreshed = await aep.call(
        "POST",
        f"{LANDING_ZONE_PATH}/credentials",
        query={**query, "action": "refresh"},
        status=200,
    )
    assert set(refreshed.body) == keys
    assert refreshed.body["SASToken"] != credentials.body["SASToken"]


# -- Query Service -----------------------------------------------------------------------------


async def scenario_query_service(aep: Conformance) -> None:
    """No spec file here covers Query Service: docs/aep-notes.md#query-service-data-distiller
    (the queries endpoint guide's request and answer shapes)."""
    base = "/data/foundation/query/queries"
    await aep.emulator.seed(rows=5)
    body = {
        "dbName": "prod:all",
        "sql": "SELECT country, count(*) AS n FROM features WHERE country = $c GROUP BY 1",
        "name": "conformance",
        "description": "a CTAS",
        "queryParameters": {"c": "US"},
        "ctasParameters": {"datasetName": "conformance_ctas"},
    }
    made = await aep.call("POST", base, body=body, status=202)
    shape = {"isInsertInto", "request", "state", "rowCount", "errors", "isCTAS", "version", "id"}
    assert shape <= set(made.body)
    assert made.body["state"] == "SUBMITTED"
    assert (made.body["isCTAS"], made.body["isInsertInto"]) == (True, False)
    assert made.body["_links"]["cancel"]["method"] == "PATCH"
    query_id = made.body["id"]
    got = await aep.call("GET", f"{base}/{query_id}", status=200)
    assert got.body["id"] == query_id
    listed = await aep.call("GET", base, query={"property": f"id=={query_id}"}, status=200)
    assert [q["id"] for q in listed.body["queries"]] == [query_id]
    cancelled = await aep.call("PATCH", f"{base}/{query_id}", body={"op": "cancel"}, status=202)
    assert cancelled.body == {"message": "Query cancel request received", "statusCode": 202}
    killed = await aep.call("GET", f"{base}/{query_id}", status=200)
    assert killed.body["state"] == "KILLED"
    refused = await aep.call("POST", base, body={**body, "queryParameters": {}}, status=400)
    assert set(refused.body) == {"message", "statusCode"}


# -- list paging -------------------------------------------------------------------------------


async def walk(
    aep: Conformance, path: str, query: dict[str, str], apis: Sequence[str]
) -> list[list[str]]:
    """Every page of a list, following `_links.next`; each page checked."""
    pages: list[list[str]] = []
    target, params = FLOW_SERVICE_PATH + path, query
    while True:
        page = await aep.call("GET", target, query=params, status=200, request=apis, response=apis)
        pages.append([item["id"] for item in page.body["items"]])
        link = page.body.get("_links", {}).get("next")
        if link is None:
            return pages
        # Relative to the service root, as in Adobe's examples: /flows?continuationToken=...
        href = URL(link["href"])
        assert href.path == path, link
        assert "continuationToken" in href.query
        target = FLOW_SERVICE_PATH + href.path
        params = {name: href.query[name] for name in href.query}


async def scenario_paging(aep: Conformance) -> None:
    made = [await create_entities(aep, StorageType.SFTP, name=f"paging-{i}") for i in range(3)]
    await aep.emulator.clock.advance(WINDOW)
    for entities in made:
        await trigger(aep, entities.flow_id, entities.dataset_id)
    sftp = spec_ref(StorageType.SFTP)["id"]
    sftp_flows = STORAGE_SPECS[StorageType.SFTP].dataset_flow_spec_id
    flow_ids = ",".join(m.flow_id for m in made)
    for path, query, apis, expected in (
        ("/connections", {"property": f"connectionSpec.id=={sftp}"}, BOTH, "base_id"),
        (
            "/sourceConnections",
            {"property": "name==paging-0-source,paging-1-source,paging-2-source"},
            BOTH,
            "source_id",
        ),
        ("/targetConnections", {"property": f"connectionSpec.id=={sftp}"}, BOTH, "target_id"),
        ("/flows", {"property": f"flowSpec.id=={sftp_flows}"}, BOTH, "flow_id"),
        ("/runs", {"property": f"flowId=={flow_ids}"}, BOTH, None),
        ("/connectionSpecs", {}, (FS,), None),
        ("/flowSpecs", {}, (FS,), None),
    ):
        whole = await aep.call(
            "GET", FLOW_SERVICE_PATH + path, query=query, status=200, request=apis, response=apis
        )
        everything = [item["id"] for item in whole.body["items"]]
        assert "_links" not in whole.body
        assert len(everything) >= 3
        pages = await walk(aep, path, {**query, "limit": "2"}, apis)
        assert [len(p) for p in pages[:-1]] == [2] * (len(pages) - 1)
        assert sorted(i for p in pages for i in p) == sorted(everything)
        if expected is not None:
            assert {getattr(m, expected) for m in made} <= set(everything)
    counted = await aep.fs(
        "GET",
        "/flows",
        query={"property": f"name=={','.join(f'paging-{i}' for i in range(3))}", "count": "true"},
        status=200,
        request=BOTH,
        response=BOTH,
    )
    assert counted.body == {"count": 3}


# -- the tests ---------------------------------------------------------------------------------


async def test_ims_token(aep: Conformance) -> None:
    await scenario_ims_token(aep)


async def test_connection_and_flow_specs(aep: Conformance) -> None:
    await scenario_specs(aep)


async def test_exportable_datasets(aep: Conformance) -> None:
    await scenario_exportable_datasets(aep)


@pytest.mark.parametrize("storage", list(StorageType))
async def test_entities_create_get_list_delete(aep: Conformance, storage: StorageType) -> None:
    await scenario_entities(aep, storage)


async def test_flow_patch_and_actions(aep: Conformance) -> None:
    await scenario_flow_updates(aep)


async def test_adhoc_and_runs(aep: Conformance) -> None:
    await scenario_runs(aep)


async def test_guardrails(aep: Conformance) -> None:
    await scenario_guardrails(aep)


async def test_landing_zone(aep: Conformance) -> None:
    await scenario_landing_zone(aep)


async def test_query_service(aep: Conformance) -> None:
    await scenario_query_service(aep)


async def test_list_paging(aep: Conformance) -> None:
    await scenario_paging(aep)


Scenario = Callable[[Conformance], Awaitable[None]]


def every_scenario() -> list[Scenario]:
    def entities(storage: StorageType) -> Scenario:
        return lambda aep: scenario_entities(aep, storage)

    return [
        scenario_ims_token,
        scenario_specs,
        scenario_exportable_datasets,
        *(entities(storage) for storage in StorageType),
        scenario_flow_updates,
        scenario_runs,
        scenario_guardrails,
        scenario_landing_zone,
        scenario_query_service,
        scenario_paging,
    ]


def platform_routes(tmp: Path) -> dict[str, str]:
    """op name (as the journal records it) -> "METHOD path" for every AEP route."""
    app = create_app(default_knobs(), tmp)
    out: dict[str, str] = {}
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if resource.canonical.startswith(CONTROL_PREFIX) or route.method == "HEAD":
            continue  # the emulator's own API; aiohttp's implicit HEAD twin of each GET
        op = route.name or resource.canonical
        assert op not in out, f"two routes share the journal name {op}"
        out[op] = f"{route.method} {resource.canonical}"
    return out


async def test_every_route_is_covered(aep: Conformance, tmp_path: Path) -> None:
    """Every AEP route the app registers answered a checked call with success, and no request
    of the scenario bypassed the checks: a new route cannot ship without conformance."""
    for scenario in every_scenario():
        await scenario(aep)
    journal = await aep.emulator.control("GET", "/journal")
    entries = journal["entries"]
    succeeded = {e["op"] for e in entries if 200 <= e["status"] < 300}
    routes = platform_routes(tmp_path / "routes")
    missing = {op: route for op, route in routes.items() if op not in succeeded}
    assert not missing, f"routes without a successful conformance call: {missing}"
    # Request by request; the fixture's own token requests aside (scenario_ims_token checks one).
    assert aep.checked["POST", IMS_TOKEN_PATH, 200] >= 1
    served = Counter(
        (e["method"], e["path"], e["status"]) for e in entries if e["path"] != IMS_TOKEN_PATH
    )
    checked = Counter({key: n for key, n in aep.checked.items() if key[1] != IMS_TOKEN_PATH})
    assert served == checked, f"requests that bypassed the checks: {served - checked}"
