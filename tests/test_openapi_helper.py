"""Tests of tests/openapi.py and of the derived tests/aep_schemas.json it reads."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests import openapi
from tests.openapi import (
    KNOWN_DEVIATIONS,
    Deviation,
    operation_for,
    response_schema,
    validate_request_body,
    validate_request_parameters,
    validate_response,
    validate_schema,
)

REPO = Path(__file__).resolve().parent.parent
DERIVE_SCRIPT = REPO / "scripts" / "derive_aep_schemas.py"
SOURCE_DIR = REPO.parent / "shared" / "aep-openapi"

DATA_LAKE = "23598e46-f560-407b-88d5-ea6207e49db0"
S3 = "4fce964d-3f37-408f-9778-e597338a21ee"
S3_DATASET_FLOW = "269ba276-16fc-47db-92b0-c1049a3c131f"

# Sample values for the few patterned strings the generated samples meet.
PATTERN_SAMPLES = {"([A-Z]{3,6})-([0-9]{3,6})-([1-5]{1}[0-9]{2})": "ABC-123-400"}


def load_derive_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("derive_aep_schemas", DERIVE_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def derived() -> dict[str, Any]:
    with openapi.SCHEMAS_FILE.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


# --------------------------------------------------------------------------------------------
# A sample generator: the first enum value, one array item, every declared property.
# --------------------------------------------------------------------------------------------


def sample(api: str, schema: Any) -> Any:
    components = derived()["apis"][api]["components"]["schemas"]

    def build(node: Any) -> Any:
        if "$ref" in node:
            return build(components[node["$ref"].rsplit("/", 1)[1]])
        if "enum" in node:
            return node["enum"][0]
        if "allOf" in node:
            merged: dict[str, Any] = {}
            for part in node["allOf"]:
                merged.update(build(part))
            return merged
        if "oneOf" in node or "anyOf" in node:
            return build((node.get("oneOf") or node["anyOf"])[0])
        kind = node.get("type", "object" if "properties" in node else "string")
        if kind == "object":
            out = {name: build(sub) for name, sub in node.get("properties", {}).items()}
            if isinstance(node.get("additionalProperties"), dict):
                out["key"] = build(node["additionalProperties"])
            return out
        if kind == "array":
            return [build(node.get("items", {}))]
        if kind == "integer":
            return int(node.get("minimum", 1))
        if kind == "number":
            return 1.5
        if kind == "boolean":
            return True
        if "pattern" in node:
            return PATTERN_SAMPLES[node["pattern"]]
        return "x"

    return build(schema)


def runs_body() -> Any:
    return sample("destinations", response_schema("destinations", "get", "/runs", 200))


# --------------------------------------------------------------------------------------------
# Valid samples pass, wrong ones fail naming the field and the rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "method", "path", "status"),
    [
        ("destinations", "get", "/runs", 200),
        ("destinations", "post", "/targetConnections", 201),
        ("flow-service", "get", "/flows/{FLOW_ID}", 200),
        ("flow-service", "get", "/runs/{RUN_ID}", 200),
        ("flow-service", "get", "/connectionSpecs", 200),
        ("flow-service", "get", "/flowSpecs", 200),
        ("ad-hoc-activation", "post", "/adhocrun", 200),
    ],
)
def test_sample_built_from_the_response_schema_passes(
    api: str, method: str, path: str, status: int
) -> None:
    schema = response_schema(api, method, path, status)
    assert schema is not None
    validate_response(api, method, path, status, sample(api, schema), deviations=())


@pytest.mark.parametrize(
    "component",
    [
        "Create_Batch_Destination_Flow_Request_Dataset_V2",
        "Create_Data_Lake_Source_Connection_Request",
        "DatasetScheduleParams_V2",
        "Flow_Run",
    ],
)
def test_sample_built_from_a_component_passes(component: str) -> None:
    body = sample("destinations", {"$ref": f"#/components/schemas/{component}"})
    validate_schema("destinations", component, body, direction="request", deviations=())


def test_generated_run_sample_uses_the_spec_field_names() -> None:
    body = runs_body()
    run = body["items"][0]
    assert run["metrics"]["statusSummary"]["status"] == "Success"
    assert run["metrics"]["durationSummary"]["stoppedAtUTC"] == 1


@pytest.mark.parametrize(
    ("mutate", "field", "rule"),
    [
        pytest.param(
            lambda run: run.update(sandboxId=3),
            "items[0].sandboxId: 3 is not of type 'string'",
            "#/components/schemas/Flow_Run/properties/sandboxId/type",
            id="wrong-type",
        ),
        pytest.param(
            lambda run: run.pop("flowId"),
            "items[0].flowId: missing required field 'flowId'",
            "#/components/schemas/Flow_Run/required",
            id="missing-required",
        ),
        pytest.param(
            lambda run: run["metrics"]["statusSummary"].update(status="Bogus"),
            "items[0].metrics.statusSummary.status: 'Bogus' is not one of",
            "#/components/schemas/StatusSummary/properties/status/enum",
            id="bad-enum",
        ),
        pytest.param(
            lambda run: run["metrics"]["durationSummary"].update(startedAtUTC=1.5),
            "items[0].metrics.durationSummary.startedAtUTC: 1.5 is not of type 'integer'",
            "#/components/schemas/DurationSummary/properties/startedAtUTC/type",
            id="float-for-integer",
        ),
        pytest.param(
            lambda run: run.update(imsOrgId=None),
            "items[0].imsOrgId: None is not of type 'string'",
            "#/components/schemas/Flow_Run/properties/imsOrgId/type",
            id="null-without-nullable",
        ),
    ],
)
def test_invalid_response_names_field_and_rule(
    mutate: Callable[[dict[str, Any]], object], field: str, rule: str
) -> None:
    body = runs_body()
    mutate(body["items"][0])
    with pytest.raises(AssertionError) as failure:
        validate_response("destinations", "GET", "/runs", 200, body)
    message = str(failure.value)
    assert "destinations GET /runs response 200 does not match" in message
    assert field in message
    assert f"[rule at {rule}]" in message


def test_every_error_is_reported_not_only_the_first() -> None:
    body = runs_body()
    body["items"][0].pop("flowId")
    body["items"][0]["sandboxName"] = 7
    with pytest.raises(AssertionError) as failure:
        validate_response("destinations", "get", "/runs", 200, body)
    assert "items[0].flowId" in str(failure.value)
    assert "items[0].sandboxName" in str(failure.value)


def test_request_body_missing_required_and_bad_enum() -> None:
    flow = dataset_flow()
    del flow["scheduleParams"]["timeUnit"]
    flow["scheduleParams"]["exportMode"] = "WEEKLY"
    component = "Create_Batch_Destination_Flow_Request_Dataset_V2"
    with pytest.raises(AssertionError) as failure:
        validate_schema("destinations", component, flow, direction="request")
    message = str(failure.value)
    assert "scheduleParams.timeUnit: missing required field 'timeUnit'" in message
    assert "scheduleParams.exportMode: 'WEEKLY' is not one of" in message


def test_oneof_failure_points_at_the_closest_alternative() -> None:
    body = dataset_target_connection()
    body["params"]["compression"] = "ZIP"
    with pytest.raises(AssertionError) as failure:
        validate_request_body("destinations", "POST", "/targetConnections", body)
    message = str(failure.value)
    assert "<body>: matches none of the 4 alternatives" in message
    assert "closest alternative fails at params" in message
    assert "params.compression: 'ZIP' is not one of ['NONE', 'GZIP']" in message


def test_int64_format_is_range_checked() -> None:
    item = {"createdAt": 2**63}
    with pytest.raises(AssertionError, match=r"items\[0\]\.createdAt: .* is not a 'int64'"):
        validate_response("flow-service", "GET", "/flows", 200, {"items": [item]})


# --------------------------------------------------------------------------------------------
# Statuses, bodies and parameters
# --------------------------------------------------------------------------------------------


def test_status_without_schema_or_unlisted_passes() -> None:
    assert response_schema("flow-service", "get", "/flows/{FLOW_ID}", 403) is None
    validate_response("flow-service", "GET", "/flows/{FLOW_ID}", 403, "anything")
    validate_response("flow-service", "GET", "/flows/{FLOW_ID}", 418, ["anything"])
    validate_response("destinations", "DELETE", "/flows/{id}", 202, None)


def test_request_body_presence() -> None:
    validate_request_body("destinations", "GET", "/flows", None)
    with pytest.raises(AssertionError, match="takes no request body"):
        validate_request_body("destinations", "GET", "/flows", {})
    with pytest.raises(AssertionError, match="requires a request body"):
        validate_request_body("destinations", "POST", "/flows", None)
    validate_request_body("flow-service", "POST", "/flows/{FLOW_ID}/action", None)


def test_query_parameters_are_converted_and_checked() -> None:
    validate_request_parameters(
        "destinations",
        "GET",
        "/connectionSpecs/x/configs",
        query={"outputType": "activationDatasets", "outputField": "datasets", "limit": "100"},
    )
    with pytest.raises(AssertionError) as failure:
        validate_request_parameters(
            "destinations",
            "GET",
            "/connectionSpecs/x/configs",
            query={"outputType": "activationDatasets", "limit": "500", "start": "first"},
        )
    message = str(failure.value)
    assert "outputField: missing required field 'outputField'" in message
    assert "limit: 500 is greater than the maximum of 100" in message
    assert "start: 'first' is not of type 'integer'" in message
    validate_request_parameters(
        "flow-service",
        "GET",
        "/runs",
        query={"property": "flowId==a,b", "count": "true", "limit": "10"},
    )
    with pytest.raises(AssertionError, match="count: 'yes' is not of type 'boolean'"):
        validate_request_parameters("flow-service", "GET", "/runs", query={"count": "yes"})


def test_headers_are_case_insensitive_and_required() -> None:
    headers = {
        "authorization": "Bearer t",
        "X-Api-Key": "k",
        "x-gw-ims-org-id": "o@AdobeOrg",
        "x-sandbox-name": "prod",
    }
    validate_request_parameters("destinations", "GET", "/flows", headers=headers)
    del headers["x-sandbox-name"]
    with pytest.raises(AssertionError, match="x-sandbox-name: missing required field"):
        validate_request_parameters("destinations", "GET", "/flows", headers=headers)


# --------------------------------------------------------------------------------------------
# Path templates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "method", "concrete", "template"),
    [
        ("flow-service", "GET", "/flows/123", "/flows/{FLOW_ID}"),
        ("destinations", "get", "/flows/123", "/flows/{id}"),
        ("destinations", "GET", "/data/foundation/flowservice/flows/123?x=1", "/flows/{id}"),
        (
            "flow-service",
            "POST",
            "https://platform.adobe.io/data/foundation/flowservice/flows/1/action?op=enable",
            "/flows/{FLOW_ID}/action",
        ),
        ("flow-service", "POST", "/flows/search", "/flows/search"),
        ("flow-service", "GET", "/flows", "/flows"),
        ("flow-service", "GET", "/runs/abc", "/runs/{RUN_ID}"),
        ("flow-service", "DELETE", "/connections/abc", "/connections/{BASE_CONNECTION_ID}/"),
        ("flow-service", "GET", "/connections/abc", "/connections/{BASE_CONNECTION_ID}"),
        (
            "flow-service",
            "GET",
            "/connectionSpecs/23598e46/configs",
            "/connectionSpecs/{CONNECTION_SPEC_ID}/configs",
        ),
        ("destinations", "GET", "/connectionSpecs/x/configs", "/connectionSpecs/{id}/configs"),
        (
            "ad-hoc-activation",
            "POST",
            "/data/core/activation/disflowprovider/adhocrun",
            "/adhocrun",
        ),
    ],
)
def test_operation_for_maps_concrete_paths(
    api: str, method: str, concrete: str, template: str
) -> None:
    assert operation_for(api, method, concrete) == template


def test_operation_for_rejects_unknown_operations() -> None:
    with pytest.raises(AssertionError, match="the path exists for DELETE, GET, PATCH"):
        operation_for("flow-service", "PUT", "/flows/abc")
    with pytest.raises(AssertionError, match="no GET operation"):
        operation_for("destinations", "GET", "/flowSpecs")
    with pytest.raises(AssertionError, match="unknown API"):
        operation_for("catalog", "GET", "/dataSets")


def test_validators_accept_concrete_paths() -> None:
    validate_response("destinations", "GET", "/runs?property=flowId==f", 200, runs_body())


# --------------------------------------------------------------------------------------------
# OpenAPI 3.0 specifics
# --------------------------------------------------------------------------------------------


def test_nullable_adds_null_type_and_enum_member() -> None:
    converted = openapi._to_json_schema(
        {"type": "string", "enum": ["a"], "nullable": True}, "response"
    )
    assert converted == {"type": ["string", "null"], "enum": ["a", None]}
    untyped = openapi._to_json_schema({"nullable": True, "minLength": 1}, "response")
    assert untyped == {"anyOf": [{"type": "null"}, {"minLength": 1}]}
    both = openapi._to_json_schema({"nullable": True, "enum": [1]}, "request")
    assert both == {"anyOf": [{"type": "null"}, {"enum": [1, None]}]}


def test_read_only_and_write_only_properties_follow_direction() -> None:
    schema = {
        "type": "object",
        "required": ["id", "secret"],
        "properties": {"id": {"readOnly": True}, "secret": {"writeOnly": True}},
    }
    assert openapi._to_json_schema(schema, "request")["required"] == ["secret"]
    assert openapi._to_json_schema(schema, "response")["required"] == ["id"]


def test_all_of_combines_component_requirements() -> None:
    body = dataset_target_connection()
    del body["baseConnectionId"]
    with pytest.raises(AssertionError, match="baseConnectionId: missing required field"):
        validate_schema(
            "destinations", "Create_S3_Target_Connection_Request_V2", body, direction="request"
        )


def test_unknown_component_is_reported() -> None:
    with pytest.raises(AssertionError, match="no component schema 'Nope'"):
        validate_schema("destinations", "Nope", {})


# --------------------------------------------------------------------------------------------
# Known deviations: each one is needed, narrow, and points at a real rule
# --------------------------------------------------------------------------------------------


def dataset_flow() -> dict[str, Any]:
    return {
        "name": "export",
        "flowSpec": {"id": S3_DATASET_FLOW, "version": "1.0"},
        "sourceConnectionIds": ["source"],
        "targetConnectionIds": ["target"],
        "transformations": [],
        "scheduleParams": {
            "exportMode": "FIRST_FULL_THEN_INCREMENTAL",
            "timeUnit": "hour",
            "interval": 3,
            "startTime": 1700000000,
            "endTime": 1730000000,
        },
    }


def dataset_target_connection() -> dict[str, Any]:
    return {
        "name": "target",
        "baseConnectionId": "base",
        "connectionSpec": {"id": S3, "version": "1.0"},
        "params": {
            "mode": "Server-to-server",
            "bucketName": "my-bucket",
            "path": "exports",
            "compression": "GZIP",
            "datasetFileType": "JSON",
        },
    }


AUDIT = {
    "createdAt": 1,
    "updatedAt": 2,
    "createdBy": "user@AdobeID",
    "updatedBy": "user@AdobeID",
    "createdClient": "client",
    "updatedClient": "client",
    "sandboxId": "sandbox",
    "sandboxName": "prod",
    "imsOrgId": "org@AdobeOrg",
    "version": '"etag"',
    "etag": '"etag"',
    "state": "enabled",
}


def flow_item() -> dict[str, Any]:
    flow = dataset_flow()
    spec = {"id": S3, "version": "1.0"}
    return {
        **AUDIT,
        **flow,
        "id": "flow",
        "description": "",
        "inheritedAttributes": {
            "properties": {"isDestinationFlow": True},
            "sourceConnections": [
                {"id": "source", "connectionSpec": {"id": DATA_LAKE, "version": "1.0"}}
            ],
            "targetConnections": [
                {
                    "id": "target",
                    "connectionSpec": spec,
                    "baseConnection": {"id": "base", "connectionSpec": spec},
                }
            ],
        },
    }


def source_item() -> dict[str, Any]:
    return {
        **AUDIT,
        "id": "source",
        "name": "source",
        "connectionSpec": {"id": DATA_LAKE, "version": "1.0"},
        "params": {"datasets": [{"dataSetId": "ds", "name": "Dataset"}]},
        "inheritedAttributes": {},
    }


def target_item() -> dict[str, Any]:
    body = dataset_target_connection()
    return {
        **AUDIT,
        **body,
        "id": "target",
        "inheritedAttributes": {
            "baseConnection": {"id": "base", "connectionSpec": body["connectionSpec"]}
        },
    }


def run_item(status: str, **metrics: Any) -> dict[str, Any]:
    return {
        **AUDIT,
        "id": "run",
        "flowId": "flow",
        "metrics": {
            "durationSummary": {"startedAtUTC": 1, "completedAtUTC": 2},
            "statusSummary": {"status": status},
            **metrics,
        },
    }


Check = Callable[[tuple[Deviation, ...]], None]


def evidence() -> Iterator[tuple[str, Check]]:
    """(rule, check) pairs: each check fails strictly and passes with the deviations."""
    flow_once = dataset_flow()
    flow_once["scheduleParams"].update(exportMode="DAILY_FULL_EXPORT", timeUnit="day", interval=0)
    failed_run = run_item(
        "failed",
        statusSummary={
            "status": "failed",
            "errors": [{"code": "ACTIVATION_BATCH-0000-FAILED", "message": "Job aborted."}],
        },
        recordSummary={"skippedInfo": [{"code": "ACTIVATION_BATCH-0000-SKIP", "count": 1}]},
    )
    schedule = dataset_flow()["scheduleParams"]
    flow_patch = [{"op": "replace", "path": "/scheduleParams", "value": schedule}]
    source_patch = [{"op": "replace", "path": "/sourceConnectionIds", "value": ["s2"]}]
    dataset_adhoc = {
        "activationInfo": {"destinations": [{"flowId": "flow", "datasets": [{"id": "ds"}]}]}
    }
    dataset_accept = "application/vnd.adobe.adhoc.dataset.activation+json; version=1"

    def response(api: str, method: str, path: str, body: Any) -> Check:
        return lambda devs: validate_response(api, method, path, 200, body, deviations=devs)

    def request(api: str, method: str, path: str, body: Any) -> Check:
        return lambda devs: validate_request_body(api, method, path, body, deviations=devs)

    def component(name: str, body: Any) -> Check:
        return lambda devs: validate_schema(
            "destinations", name, body, direction="request", deviations=devs
        )

    def query(api: str, path: str, values: dict[str, str]) -> Check:
        return lambda devs: validate_request_parameters(
            api, "POST", path, query=values, deviations=devs
        )

    def header(values: dict[str, str]) -> Check:
        return lambda devs: validate_request_parameters(
            "ad-hoc-activation", "POST", "/adhocrun", headers=values, deviations=devs
        )

    connection_item = {
        **AUDIT,
        "id": "base",
        "name": "s3",
        "connectionSpec": {"id": S3, "version": "1.0"},
        "auth": {
            "specName": "Access Key",
            "params": {"s3AccessKey": "ABCDEFGHIJKLMNOPQRST", "s3SecretKey": "a" * 40},
        },
    }
    for path, item in (
        ("/connections", connection_item),
        ("/connections/{id}", connection_item),
        ("/sourceConnections", source_item()),
        ("/sourceConnections/{id}", source_item()),
        ("/targetConnections", target_item()),
        ("/targetConnections/{id}", target_item()),
    ):
        yield f"GET {path} response 200", response("destinations", "get", path, {"items": [item]})
    components = "#/components/schemas/"
    yield (
        f"{components}StatusSummary/properties/status/enum",
        response("destinations", "get", "/runs", {"items": [run_item("success")]}),
    )
    yield (
        f"{components}Info/properties/code/pattern",
        response("destinations", "get", "/runs", {"items": [failed_run]}),
    )
    yield (
        f"{components}DatasetScheduleParams_V2/properties/interval/enum",
        component("Create_Batch_Destination_Flow_Request_Dataset_V2", flow_once),
    )
    for name in ("sourceConnections", "targetConnections"):
        yield (
            f"{components}BaseFlowItem/properties/inheritedAttributes/properties/{name}/type",
            response("destinations", "get", "/flows/{id}", {"items": [flow_item()]}),
        )
    for path in ("/flows", "/flows/{id}"):
        yield (
            f"GET {path} response 200#/oneOf",
            response("destinations", "get", path, {"items": []}),
        )
    for kind, entity, path in (
        ("SourceConnectionItem", source_item(), "/sourceConnections"),
        ("TargetConnectionItem", target_item(), "/targetConnections"),
    ):
        entity["inheritedAttributes"] = {"baseConnection": {"id": "base"}}
        entity["typeInfo"] = {"id": "ups", "type": "ProfileFragments"}
        yield (
            f"{components}{kind}/properties/inheritedAttributes/properties/baseConnection/type",
            response("destinations", "get", path, {"items": [entity]}),
        )
    yield (
        f"{components}TargetConnectionItem/properties/params/oneOf",
        response("destinations", "get", "/targetConnections", {"items": [target_item()]}),
    )
    yield (
        f"{components}SourceConnectionItem/required",
        response("destinations", "get", "/sourceConnections", {"items": [source_item()]}),
    )
    data_lake_source = {
        "name": "source",
        "connectionSpec": {"id": DATA_LAKE, "version": "1.0"},
        "params": {"datasets": [{"dataSetId": "ds", "name": "Dataset"}]},
    }
    yield (
        "POST /sourceConnections request#/oneOf",
        request("destinations", "post", "/sourceConnections", data_lake_source),
    )
    yield "POST /flows request#/oneOf", request("destinations", "post", "/flows", flow_once)
    yield (
        f"{components}PatchFlowItem/properties/value/oneOf",
        request("destinations", "patch", "/flows/{id}", flow_patch),
    )
    action = "/flows/{FLOW_ID}/action"
    yield (
        f"POST {action} query#/properties/op/enum",
        query("flow-service", action, {"op": "disable", "subOp": "APPLY"}),
    )
    yield f"POST {action} query#/required", query("flow-service", action, {"op": "ENABLE"})
    yield (
        f"{components}PatchInstruction/properties/op/enum",
        request("flow-service", "patch", "/flows/{FLOW_ID}", [{**flow_patch[0], "value": {}}]),
    )
    yield (
        f"{components}PatchInstruction/properties/value/type",
        request("flow-service", "patch", "/flows/{FLOW_ID}", [{**source_patch[0], "op": "ADD"}]),
    )
    yield (
        f"{components}ScheduleSpecDTO/properties/interval/type",
        request("flow-service", "post", "/flows", dataset_flow()),
    )
    yield (
        f"{components}CreateSourceConnectionRequest/required",
        request("flow-service", "post", "/sourceConnections", data_lake_source),
    )
    yield (
        f"{components}CreateTargetConnectionRequest/required",
        request("flow-service", "post", "/targetConnections", dataset_target_connection()),
    )
    yield (
        "POST /adhocrun header#/properties/accept/enum",
        header(
            {
                "Authorization": "Bearer t",
                "x-api-key": "k",
                "x-gw-ims-org-id": "o",
                "Content-Type": "application/json",
                "Accept": dataset_accept,
            }
        ),
    )
    yield (
        f"{components}activationInfoMap/additionalProperties/items/type",
        request("ad-hoc-activation", "post", "/adhocrun", dataset_adhoc),
    )


EVIDENCE = dict(evidence())


def test_every_known_deviation_has_evidence() -> None:
    assert sorted(EVIDENCE) == sorted({d.rule for d in KNOWN_DEVIATIONS})


@pytest.mark.parametrize("rule", sorted(EVIDENCE))
def test_known_deviation_is_needed_and_sufficient(rule: str) -> None:
    check = EVIDENCE[rule]
    with pytest.raises(AssertionError, match="does not match Adobe's OpenAPI schema"):
        check(())
    only_this = tuple(d for d in KNOWN_DEVIATIONS if d.rule == rule)
    others = tuple(d for d in KNOWN_DEVIATIONS if d.rule != rule)
    with pytest.raises(AssertionError) as failure:
        check(others)
    if not any(d.wrap_items for d in only_this):
        assert f"[rule at {rule}]" in str(failure.value)
    check(KNOWN_DEVIATIONS)


@pytest.mark.parametrize("deviation", KNOWN_DEVIATIONS, ids=lambda d: d.rule)
def test_known_deviation_points_at_a_real_rule(deviation: Deviation) -> None:
    assert deviation.reason
    api = derived()["apis"][deviation.api]
    label, _, pointer = deviation.rule.partition("#")
    if label:  # an operation: "<METHOD> <path> <part>[ <status>]"
        method, path, part, *status = label.split()
        operation = api["paths"][path][method.lower()]
        if part == "response":
            assert status[0] in operation["responses"]
        elif part == "request":
            assert operation["requestBody"]["schema"] is not None
        else:
            assert any(p["in"] == part for p in operation["parameters"])
        return
    node: Any = api
    for segment in pointer.strip("/").split("/"):
        node = node[int(segment)] if isinstance(node, list) else node[segment]


def test_deviations_stay_narrow() -> None:
    with pytest.raises(AssertionError, match="'bogus' is not one of"):
        validate_response("destinations", "GET", "/runs", 200, {"items": [run_item("bogus")]})
    with pytest.raises(AssertionError, match="op: 'start' is not one of"):
        validate_request_parameters(
            "flow-service", "POST", "/flows/1/action", query={"op": "start"}
        )
    # An overlap deviation lets a value match several alternatives, never none of them.
    rename = [{"op": "replace", "path": "/name", "value": "new name"}]
    with pytest.raises(AssertionError, match=r"\[0\]\.value: matches none of the 8"):
        validate_request_body("destinations", "PATCH", "/flows/{id}", rename)
    # The items envelope still checks every item.
    broken = source_item()
    del broken["name"]
    with pytest.raises(AssertionError, match=r"items\[0\]\.name: missing required field"):
        validate_response("destinations", "GET", "/sourceConnections", 200, {"items": [broken]})
    with pytest.raises(AssertionError, match="items: missing required field 'items'"):
        validate_response("destinations", "GET", "/sourceConnections", 200, broken)


def test_caller_can_add_a_deviation() -> None:
    run = run_item("success")
    run["sandboxId"] = 5
    with pytest.raises(AssertionError):
        validate_response("destinations", "GET", "/runs", 200, {"items": [run]})
    extra = Deviation(
        api="destinations",
        rule="#/components/schemas/Flow_Run/properties/sandboxId/type",
        accept=(5,),
        reason="test",
    )
    validate_response(
        "destinations", "GET", "/runs", 200, {"items": [run]}, deviations=(*KNOWN_DEVIATIONS, extra)
    )


def test_dataset_flow_requests_validate_against_both_files() -> None:
    flow = dataset_flow()
    validate_request_body("destinations", "POST", "/flows", flow)
    validate_schema(
        "destinations",
        "Create_Batch_Destination_Flow_Request_Dataset_V2",
        flow,
        direction="request",
    )
    validate_request_body("flow-service", "POST", "/flows", flow)
    bad = copy.deepcopy(flow)
    bad["scheduleParams"]["interval"] = 7
    with pytest.raises(AssertionError, match=r"scheduleParams\.interval: 7 is not one of"):
        validate_schema(
            "destinations",
            "Create_Batch_Destination_Flow_Request_Dataset_V2",
            bad,
            direction="request",
        )


# --------------------------------------------------------------------------------------------
# The derived file: no prose, provenance header, and reproducible from the source
# --------------------------------------------------------------------------------------------

PROSE_KEYS = {"description", "summary", "example", "examples", "title", "externalDocs", "xml"}


def prose_keys(node: Any, where: str = "") -> Iterator[str]:
    """Prose keywords anywhere, except as field names inside a ``properties`` map."""
    if isinstance(node, dict):
        for key, value in node.items():
            if where.endswith("/properties"):
                yield from prose_keys(value, f"{where}/{key}")
                continue
            if key in PROSE_KEYS or key.startswith("x-") or key in ("info", "servers", "tags"):
                yield f"{where}/{key}"
            yield from prose_keys(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from prose_keys(value, f"{where}/{index}")


def test_derived_file_has_no_prose() -> None:
    data = derived()
    assert list(prose_keys(data["apis"])) == []
    assert load_derive_script().prose_violations(data) == []
    text = openapi.SCHEMAS_FILE.read_text(encoding="utf-8")
    assert '"description": {' in text  # only ever as a field name of a schema
    assert '"description": "' not in text


def test_derived_file_header_and_coverage() -> None:
    data = derived()
    assert data["source"]["commit"] == "16c60cd7a5617582fc21500f5ab3edf0e2ee308b"
    assert data["source"]["license"] == "Apache-2.0"
    assert "Adobe" in data["source"]["copyright"]
    assert (
        data["source"]["note"] == "derived by scripts/derive_aep_schemas.py; descriptions removed"
    )
    assert sorted(data["apis"]) == list(openapi.APIS)
    assert data["apis"]["flow-service"]["basePath"] == "/data/foundation/flowservice"
    assert data["apis"]["ad-hoc-activation"]["basePath"] == "/data/core/activation/disflowprovider"
    for api in data["apis"].values():
        schemas = api["components"]["schemas"]
        refs = set(ref_targets(api["paths"])) | set(ref_targets(schemas))
        assert refs <= set(schemas), refs - set(schemas)


def ref_targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value.rsplit("/", 1)[1]
            else:
                yield from ref_targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from ref_targets(value)


def test_derived_file_is_sorted_and_stable() -> None:
    text = openapi.SCHEMAS_FILE.read_text(encoding="utf-8")
    assert text == json.dumps(derived(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.skipif(
    not SOURCE_DIR.is_dir(),
    reason=f"Adobe's OpenAPI source folder {SOURCE_DIR} is absent; cannot re-derive",
)
def test_rederiving_is_deterministic_and_up_to_date(tmp_path: Path) -> None:
    script = load_derive_script()
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    for output in (first, second):
        assert script.main(["--source", str(SOURCE_DIR), "--output", str(output)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() == openapi.SCHEMAS_FILE.read_bytes()
