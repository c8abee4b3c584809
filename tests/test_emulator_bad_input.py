"""Bad input never hurts the emulator: a table of hostile requests, each answered with a 4xx in
the envelope AEP documents for it (docs/aep-notes.md#error-envelopes), never a 500 or a
traceback, and the emulator serving normally afterwards.

Envelopes: Flow Service's problem document (`type` ending in `FLOW-<code>-<status>`), the
platform's RFC 7807 answer for unreadable requests (content type, size), the ad hoc service's
`{message}` and the gateway's `{error_code, message}`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aep_emulator.common import MAX_JSON_DEPTH
from aep_emulator.settings import Knobs
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    IMS_TOKEN_PATH,
    LANDING_ZONE_PATH,
    STORAGE_SPECS,
    StorageType,
)
from tests.conftest import Emulator, default_knobs
from tests.workflow import base_connection, flow, source_connection, target_connection

MAX_BODY = 8_192
S3 = StorageType.S3
AZURE = StorageType.AZURE_BLOB
FS = FLOW_SERVICE_PATH


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs(max_body_bytes=MAX_BODY)


# -- the world bad requests are aimed at --------------------------------------------------------


@dataclass
class World:
    """Valid entities of every kind, in prod; bad requests must leave them as they are."""

    dataset: str
    base: str
    source: str
    target: str
    flow: str
    etag: str

    def ids(self) -> dict[str, str]:
        return {
            "dataset": self.dataset,
            "base": self.base,
            "source": self.source,
            "target": self.target,
            "flow": self.flow,
        }


async def created(emulator: Emulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    made = await emulator.fs("POST", path, json_body=body)
    assert made.status == 201, made.body
    return dict(made.body)


@pytest.fixture
async def world(emulator: Emulator) -> AsyncIterator[World]:
    (dataset,) = await emulator.seed(rows=3)
    base = (await created(emulator, "/connections", base_connection(S3)))["id"]
    source = (await created(emulator, "/sourceConnections", source_connection(dataset)))["id"]
    target = (await created(emulator, "/targetConnections", target_connection(S3, base)))["id"]
    made = await created(emulator, "/flows", flow(S3, source, target))
    made_world = World(dataset, base, source, target, made["id"], made["etag"])
    yield made_world
    # Whatever a test threw at it, the emulator still serves, and nothing was a 5xx.
    await still_serving(emulator, made_world)


async def still_serving(emulator: Emulator, world: World) -> None:
    answer = await emulator.fs("GET", f"/flows/{world.flow}")
    assert answer.status == 200, answer.body
    (item,) = answer.body["items"]
    assert item["etag"] == world.etag  # no bad request changed it
    assert item["name"] == "flow"
    for path in ("/connections", "/sourceConnections", "/targetConnections", "/flows"):
        listed = await emulator.fs("GET", path)
        assert listed.status == 200
        assert len(listed.body["items"]) == 1, (path, listed.body)
    journal = await emulator.control("GET", "/journal")
    assert [e for e in journal["entries"] if e["status"] >= 500] == []


# -- envelopes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    status: int
    kind: str  # "flow", "problem", "adhoc" or "gateway"
    code: int | str | None = None


def flow_code(code: int, status: int = 400) -> Expect:
    return Expect(status, "flow", code)


def problem(status: int, title: str) -> Expect:
    return Expect(status, "problem", title)


ADHOC = Expect(400, "adhoc")
BAD = flow_code(1400)
BAD_CONTENT_TYPE = problem(400, "BadRequestError")
TOO_LARGE = problem(413, "PayloadTooLarge")


def check_envelope(status: int, content_type: str, text: str, expect: Expect) -> None:
    assert status == expect.status, text
    assert content_type.startswith("application/json"), content_type
    assert "Traceback" not in text
    assert 'File "' not in text
    body = json.loads(text)
    if expect.kind == "flow":
        assert body["type"] == (
            f"https://ns.adobe.com/aep/errors/FLOW-{expect.code}-{expect.status}"
        ), body
        assert body["status"] == expect.status
        assert body["title"]
        assert body["report"]["detailed-message"]
        assert body["report"]["request-id"]
        assert body["errorMessage"] == body["report"]["detailed-message"]
    elif expect.kind == "problem":
        assert body == {
            "type": "http://ns.adobe.com/aep/errors/request",
            "status": expect.status,
            "title": expect.code,
            "detail": body["detail"],
        }
        assert body["detail"]
    elif expect.kind == "adhoc":
        assert set(body) == {"message"}, body
        assert body["message"].startswith("Invalid parameter: ")
    else:
        assert body == {"error_code": expect.code, "message": body["message"]}


# -- the corpus ---------------------------------------------------------------------------------

MISSING: Any = object()
Body = Callable[[World], Any]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str  # formatted with World.ids()
    expect: Expect
    json_body: Body | None = None
    raw: bytes | None = None
    content_type: str | None = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    if_match: bool = False  # send the flow's current etag


def edited(body: Any, dotted: str, value: Any) -> Any:
    """`body` with the value at a dotted path (list indexes as digits) replaced or removed."""
    body = json.loads(json.dumps(body))
    *parents, last = dotted.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is MISSING:
        del node[key]
    else:
        node[key] = value
    return body


BUILDERS: dict[str, Body] = {
    "connections": lambda w: base_connection(S3),
    "sourceConnections": lambda w: source_connection(w.dataset),
    "targetConnections": lambda w: target_connection(S3, w.base),
    "flows": lambda w: flow(S3, w.source, w.target),
}
CREATES = list(BUILDERS)


def field_case(collection: str, dotted: str, value: Any, expect: Expect, label: str) -> Case:
    build = BUILDERS[collection]
    return Case(
        f"{collection}-{dotted}-{label}",
        "POST",
        f"{FS}/{collection}",
        expect,
        json_body=lambda w: edited(build(w), dotted, value),
    )


def wrong_types(collection: str, dotted: str, expect: Expect = BAD) -> list[Case]:
    """A string field given every other JSON type, or left out."""
    values = {
        "missing": MISSING,
        "null": None,
        "int": 5,
        "float": 1.5,
        "bool": True,
        "list": ["x"],
        "object": {"x": 1},
    }
    return [field_case(collection, dotted, v, expect, label) for label, v in values.items()]


SPEC_S3 = STORAGE_SPECS[S3].connection_spec_id
SPEC_AZURE = STORAGE_SPECS[AZURE].connection_spec_id
FLOW_SPEC_AZURE = STORAGE_SPECS[AZURE].dataset_flow_spec_id
UNKNOWN_SPEC = "00000000-0000-0000-0000-000000000000"


def spec_cases(collection: str, key: str = "connectionSpec") -> list[Case]:
    invalid_spec = flow_code(1413)
    return [
        field_case(collection, key, MISSING, invalid_spec, "missing"),
        field_case(collection, key, "s3", invalid_spec, "string"),
        field_case(collection, key, [], invalid_spec, "list"),
        field_case(collection, f"{key}.id", 5, invalid_spec, "id-int"),
        field_case(collection, f"{key}.id", UNKNOWN_SPEC, invalid_spec, "id-unknown"),
        field_case(collection, f"{key}.version", MISSING, flow_code(1412, 422), "no-version"),
    ]


FIELD_CASES: list[Case] = [
    # -- connections
    *wrong_types("connections", "name"),
    field_case("connections", "name", "", BAD, "empty"),
    field_case("connections", "name", "   ", BAD, "blank"),
    field_case("connections", "description", 5, BAD, "int"),
    field_case("connections", "description", ["x"], BAD, "list"),
    *spec_cases("connections"),
    field_case("connections", "connectionSpec.version", 1, BAD, "int"),
    field_case("connections", "connectionSpec.id", DATALAKE_SOURCE_SPEC_ID, flow_code(1413), "src"),
    field_case("connections", "auth", MISSING, BAD, "missing"),
    field_case("connections", "auth", "key", BAD, "string"),
    field_case("connections", "auth", [], BAD, "list"),
    field_case("connections", "auth.specName", 5, BAD, "int"),
    field_case("connections", "auth.specName", "Password", BAD, "unknown"),
    field_case("connections", "auth.params", MISSING, BAD, "missing"),
    field_case("connections", "auth.params", "secret", BAD, "string"),
    field_case("connections", "auth.params.s3AccessKey", 5, BAD, "int"),
    field_case("connections", "auth.params.s3AccessKey", "lowercase", BAD, "pattern"),
    field_case("connections", "auth.params.s3SecretKey", MISSING, BAD, "missing"),
    field_case("connections", "auth.params.s3SecretKey", None, BAD, "null"),
    # -- source connections
    *wrong_types("sourceConnections", "name"),
    field_case("sourceConnections", "description", 5, BAD, "int"),
    *spec_cases("sourceConnections"),
    field_case("sourceConnections", "connectionSpec.id", SPEC_S3, flow_code(1413), "dest"),
    field_case("sourceConnections", "params", MISSING, BAD, "missing"),
    field_case("sourceConnections", "params", "x", BAD, "string"),
    field_case("sourceConnections", "params", [], BAD, "list"),
    field_case("sourceConnections", "params", {}, BAD, "empty"),
    field_case("sourceConnections", "params.datasets", "x", BAD, "string"),
    field_case("sourceConnections", "params.datasets", [], BAD, "empty"),
    field_case("sourceConnections", "params.datasets", [5], BAD, "int-item"),
    field_case("sourceConnections", "params.datasets", [{}], BAD, "empty-item"),
    field_case("sourceConnections", "params.datasets.0.dataSetId", 5, BAD, "int"),
    field_case("sourceConnections", "params.datasets.0.dataSetId", "", BAD, "empty"),
    field_case("sourceConnections", "params.datasets.0.dataSetId", [], BAD, "list"),
    field_case("sourceConnections", "params.datasets.0.name", 5, BAD, "int"),
    field_case(
        "sourceConnections",
        "params.datasets.0.dataSetId",
        "0123456789abcdef01234567",
        flow_code(1415),
        "unknown",
    ),
    # -- target connections
    *wrong_types("targetConnections", "name"),
    *wrong_types("targetConnections", "baseConnectionId"),
    field_case("targetConnections", "baseConnectionId", "nope", flow_code(1416), "unknown"),
    field_case("targetConnections", "description", False, BAD, "bool"),
    *spec_cases("targetConnections"),
    field_case("targetConnections", "connectionSpec.id", SPEC_AZURE, flow_code(1413), "other"),
    field_case("targetConnections", "params", MISSING, BAD, "missing"),
    field_case("targetConnections", "params", "x", BAD, "string"),
    field_case("targetConnections", "params", [], BAD, "list"),
    field_case("targetConnections", "params.datasetFileType", 5, BAD, "int"),
    field_case("targetConnections", "params.datasetFileType", "CSV", BAD, "csv"),
    field_case("targetConnections", "params.datasetFileType", MISSING, BAD, "missing"),
    field_case("targetConnections", "params.compression", "ZIP", BAD, "zip"),
    field_case("targetConnections", "params.compression", None, BAD, "null"),
    field_case("targetConnections", "params.bucketName", 5, BAD, "int"),
    field_case("targetConnections", "params.bucketName", "Not_A_Bucket", BAD, "pattern"),
    field_case("targetConnections", "params.bucketName", MISSING, BAD, "missing"),
    field_case("targetConnections", "params.path", ["a"], BAD, "list"),
    field_case("targetConnections", "params.path", "a/../../etc", BAD, "dotdot"),
    field_case("targetConnections", "params.mode", "Browser", BAD, "mode"),
    Case(
        "targetConnections-json-uncompressed",
        "POST",
        f"{FS}/targetConnections",
        BAD,
        json_body=lambda w: target_connection(S3, w.base, file_type="JSON", compression="NONE"),
    ),
    # -- flows
    field_case("flows", "state", "enabled", flow_code(1410), "given"),
    *wrong_types("flows", "name"),
    field_case("flows", "name", "", BAD, "empty"),
    field_case("flows", "description", 5, BAD, "int"),
    field_case("flows", "description", {"a": 1}, BAD, "object"),
    field_case("flows", "flowSpec", MISSING, flow_code(1413), "missing"),
    field_case("flows", "flowSpec", "s3", flow_code(1413), "string"),
    field_case("flows", "flowSpec.id", UNKNOWN_SPEC, flow_code(1413), "unknown"),
    field_case("flows", "flowSpec.id", 7, flow_code(1413), "int"),
    field_case("flows", "flowSpec.id", FLOW_SPEC_AZURE, flow_code(1413), "other-storage"),
    field_case("flows", "flowSpec.version", MISSING, flow_code(1412, 422), "missing"),
    field_case("flows", "flowSpec.version", 1.0, flow_code(1412, 422), "float"),
    field_case("flows", "transformations", "x", BAD, "string"),
    field_case("flows", "transformations", {"a": 1}, BAD, "object"),
    *[
        case
        for key in ("sourceConnectionIds", "targetConnectionIds")
        for case in (
            field_case("flows", key, MISSING, BAD, "missing"),
            field_case("flows", key, "id", BAD, "string"),
            field_case("flows", key, [], BAD, "empty"),
            field_case("flows", key, [5], BAD, "int-item"),
            field_case("flows", key, ["a", "b"], BAD, "two"),
            field_case("flows", key, ["nope"], flow_code(1416), "unknown"),
        )
    ],
    field_case("flows", "scheduleParams", MISSING, BAD, "missing"),
    field_case("flows", "scheduleParams", "daily", BAD, "string"),
    field_case("flows", "scheduleParams", [], BAD, "list"),
    field_case("flows", "scheduleParams.timeUnit", "week", BAD, "week"),
    field_case("flows", "scheduleParams.timeUnit", 5, BAD, "int"),
    field_case("flows", "scheduleParams.interval", "abc", BAD, "text"),
    field_case("flows", "scheduleParams.interval", 1.5, BAD, "float"),
    field_case("flows", "scheduleParams.interval", True, BAD, "bool"),
    field_case("flows", "scheduleParams.interval", 2, BAD, "unsupported"),
    field_case("flows", "scheduleParams.exportMode", "WEEKLY", BAD, "unknown"),
    field_case("flows", "scheduleParams.exportMode", 5, BAD, "int"),
    field_case("flows", "scheduleParams.startTime", MISSING, BAD, "missing"),
    field_case("flows", "scheduleParams.startTime", "now", BAD, "text"),
    field_case("flows", "scheduleParams.startTime", 1_767_225_600_000, BAD, "millis"),
    field_case("flows", "scheduleParams.startTime", -1, BAD, "negative"),
    field_case("flows", "scheduleParams.startTime", False, BAD, "bool"),
    field_case("flows", "scheduleParams.endTime", 1, BAD, "before-start"),
    field_case("flows", "scheduleParams.endTime", "later", BAD, "text"),
    field_case("flows", "scheduleParams.cron", "* * * * *", BAD, "unknown-field"),
    field_case("flows", "scheduleParams.foldernameTemplate", 5, BAD, "template-int"),
    field_case("flows", "scheduleParams.foldernameTemplate", "%NO_SUCH%", BAD, "template-macro"),
]


def raw_case(label: str, method: str, path: str, raw: bytes, expect: Expect, **kwargs: Any) -> Case:
    return Case(
        f"{label}-{method}-{path.rsplit('/', 1)[-1]}", method, path, expect, raw=raw, **kwargs
    )


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


UNREADABLE_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed", b'{"name": ', 1400),
    ("unterminated-string", b'{"name": "abc', 1400),
    ("trailing-garbage", b'{"name": "x"} tail', 1400),
    ("single-quotes", b"{'name': 'x'}", 1400),
    ("empty", b"", 1405),
    ("blank", b" \n\t ", 1405),
    ("binary", bytes(range(256)), 1400),
    ("bad-utf8", b'{"name": "\xff\xfe"}', 1400),
    ("deep-arrays", b"[" * 2_000 + b"]" * 2_000, 1400),
    ("deep-arrays-unclosed", b"[" * 8_000, 1400),
    ("deep-objects", nested(MAX_JSON_DEPTH + 1), 1400),
]
NON_OBJECTS = {
    "array": b"[]",
    "array-of-object": b'[{"name": "x"}]',
    "string": b'"name"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
}

RAW_CASES: list[Case] = [
    *[
        raw_case(label, "POST", f"{FS}/{c}", raw, flow_code(code))
        for c in CREATES
        for label, raw, code in UNREADABLE_BODIES
    ],
    *[
        raw_case(f"non-object-{label}", "POST", f"{FS}/{c}", raw, BAD)
        for c in CREATES
        for label, raw in NON_OBJECTS.items()
    ],
    *[
        raw_case(label, "POST", f"{FS}/{c}", b'{"name": "x"}', BAD_CONTENT_TYPE, content_type=ct)
        for c in CREATES
        for label, ct in (
            ("text-plain", "text/plain"),
            ("form", "application/x-www-form-urlencoded"),
            ("no-content-type", None),
            ("json-ish", "application/jsonp"),
        )
    ],
    *[
        raw_case("too-large", "POST", f"{FS}/{c}", b" " * (MAX_BODY + 1), TOO_LARGE)
        for c in CREATES
    ],
    raw_case("too-large-despite-content-type", "POST", f"{FS}/flows", b"x" * 100_000, TOO_LARGE),
]

PATCH = f"{FS}/flows/{{flow}}"


def patch_case(label: str, ops: Any, expect: Expect, *, if_match: bool = True) -> Case:
    return Case(
        f"patch-{label}", "PATCH", PATCH, expect, json_body=lambda w: ops, if_match=if_match
    )


NAME_OP = [{"op": "replace", "path": "/name", "value": "renamed"}]
PATCH_CASES: list[Case] = [
    patch_case("no-if-match", NAME_OP, flow_code(1403), if_match=False),
    Case(
        "patch-stale-etag",
        "PATCH",
        PATCH,
        flow_code(1404, 412),
        json_body=lambda w: NAME_OP,
        headers={"If-Match": '"00000000-0000-0200-0000-000000000000"'},
    ),
    Case(
        "patch-unquoted-etag",
        "PATCH",
        PATCH,
        flow_code(1404, 412),
        json_body=lambda w: NAME_OP,
        headers={"If-Match": "*"},
    ),
    patch_case("object-body", {"op": "replace"}, flow_code(1455)),
    patch_case("empty-list", [], flow_code(1455)),
    patch_case("string-body", "replace", flow_code(1455)),
    patch_case("null-body", None, flow_code(1455)),
    patch_case("int-op", [5], flow_code(1455)),
    patch_case("no-path", [{"op": "replace", "value": "x"}], flow_code(1455)),
    patch_case("int-verb", [{"op": 5, "path": "/name", "value": "x"}], flow_code(1455)),
    patch_case("path-int", [{"op": "replace", "path": 5, "value": "x"}], flow_code(1455)),
    *[
        patch_case(f"verb-{verb}", [{"op": verb, "path": "/name", "from": "/x"}], flow_code(1434))
        for verb in ("move", "copy", "test", "merge", "")
    ],
    patch_case("remove-name", [{"op": "remove", "path": "/name"}], flow_code(1455)),
    patch_case("name-empty", [{"op": "replace", "path": "/name", "value": ""}], flow_code(1455)),
    patch_case("name-int", [{"op": "replace", "path": "/name", "value": 5}], flow_code(1455)),
    patch_case("name-missing-value", [{"op": "replace", "path": "/name"}], flow_code(1455)),
    *[
        patch_case(f"path-{path}", [{"op": "replace", "path": path, "value": "x"}], flow_code(1455))
        for path in ("/state", "/flowSpec/id", "/id", "", "/", "/name/first", "/etag")
    ],
    patch_case(
        "schedule-not-object", [{"op": "replace", "path": "/scheduleParams", "value": 5}], BAD
    ),
    patch_case(
        "schedule-then-field",
        [
            {"op": "replace", "path": "/scheduleParams", "value": 5},
            {"op": "replace", "path": "/scheduleParams/interval", "value": 1},
        ],
        flow_code(1455),
    ),
    patch_case(
        "schedule-deep-path",
        [{"op": "replace", "path": "/scheduleParams/interval/x", "value": 1}],
        flow_code(1455),
    ),
    patch_case(
        "interval-unsupported",
        [{"op": "replace", "path": "/scheduleParams/interval", "value": 7}],
        BAD,
    ),
    patch_case(
        "source-unknown",
        [{"op": "replace", "path": "/sourceConnectionIds", "value": ["nope"]}],
        flow_code(1416),
    ),
    patch_case(
        "target-string",
        [{"op": "replace", "path": "/targetConnectionIds", "value": "nope"}],
        BAD,
    ),
    patch_case(
        "good-then-bad",
        [NAME_OP[0], {"op": "replace", "path": "/state", "value": "disabled"}],
        flow_code(1455),
    ),
    *[
        Case(f"patch-{label}", "PATCH", PATCH, flow_code(code), raw=raw, if_match=True)
        for label, raw, code in UNREADABLE_BODIES
    ],
    Case(
        "patch-json-patch-content-type",
        "PATCH",
        PATCH,
        BAD_CONTENT_TYPE,
        raw=json.dumps(NAME_OP).encode(),
        content_type="application/json-patch+json",
        if_match=True,
    ),
    Case(
        "patch-too-large",
        "PATCH",
        PATCH,
        TOO_LARGE,
        raw=b" " * (MAX_BODY + 1),
        if_match=True,
    ),
]

ACTION = f"{FS}/flows/{{flow}}/action"
ACTION_CASES: list[Case] = [
    Case("action-no-op", "POST", ACTION, flow_code(1436)),
    Case("action-empty-op", "POST", f"{ACTION}?op=", flow_code(1436)),
    Case("action-explode", "POST", f"{ACTION}?op=explode", flow_code(1436)),
    Case("action-delete", "POST", f"{ACTION}?op=delete", flow_code(1436)),
    Case("action-enable-enabled", "POST", f"{ACTION}?op=enable", flow_code(1422)),
    Case("action-ENABLE-enabled", "POST", f"{ACTION}?op=ENABLE", flow_code(1422)),
]

COLLECTIONS = [*CREATES, "runs", "connectionSpecs", "flowSpecs"]
WEIRD_IDS = ["00000000-0000-0000-0000-000000000000", "%20", "%C3%BC", "a" * 2_000, "..."]
UNKNOWN_ID_CASES: list[Case] = [
    *[
        Case(f"get-flows-{i}", "GET", f"{FS}/flows/{wid}", flow_code(1101, 404))
        for i, wid in enumerate(WEIRD_IDS)
    ],
    *[Case(f"get-{c}-unknown", "GET", f"{FS}/{c}/nope", flow_code(1101, 404)) for c in COLLECTIONS],
    *[
        Case(f"delete-{c}-unknown", "DELETE", f"{FS}/{c}/nope", flow_code(1101, 404))
        for c in CREATES
    ],
    Case(
        "patch-unknown-flow",
        "PATCH",
        f"{FS}/flows/nope",
        flow_code(1101, 404),
        json_body=lambda w: NAME_OP,
        headers={"If-Match": '"x"'},
    ),
    Case("action-unknown-flow", "POST", f"{FS}/flows/nope/action?op=disable", flow_code(1101, 404)),
    Case("configs-unknown-spec", "GET", f"{FS}/connectionSpecs/nope/configs", flow_code(1101, 404)),
    Case(
        "delete-base-in-use",
        "DELETE",
        f"{FS}/connections/{{base}}",
        flow_code(1418),
    ),
    Case("delete-target-in-use", "DELETE", f"{FS}/targetConnections/{{target}}", flow_code(1418)),
    Case("delete-source-in-use", "DELETE", f"{FS}/sourceConnections/{{source}}", flow_code(1418)),
]

ROUTING_CASES: list[Case] = [
    Case("unknown-fs-path", "GET", f"{FS}/nothing", flow_code(1101, 404)),
    Case("unknown-fs-subpath", "GET", f"{FS}/flows/{{flow}}/nothing", flow_code(1101, 404)),
    Case("unknown-data-path", "GET", "/data/nothing", flow_code(1101, 404)),
    Case("unknown-root-path", "GET", "/nowhere", flow_code(1101, 404)),
    Case("root", "GET", "/", flow_code(1101, 404)),
    Case("post-runs", "POST", f"{FS}/runs", flow_code(1100, 405)),
    Case("put-flow", "PUT", f"{FS}/flows/{{flow}}", flow_code(1100, 405)),
    Case("patch-connection", "PATCH", f"{FS}/connections/{{base}}", flow_code(1100, 405)),
    Case("patch-flows", "PATCH", f"{FS}/flows", flow_code(1100, 405)),
    Case("delete-run", "DELETE", f"{FS}/runs/x", flow_code(1100, 405)),
    Case("delete-specs", "DELETE", f"{FS}/connectionSpecs", flow_code(1100, 405)),
    Case("get-action", "GET", f"{ACTION}?op=enable", flow_code(1100, 405)),
    Case("get-adhoc", "GET", ADHOC_PATH, flow_code(1100, 405)),
    Case("options-flows", "OPTIONS", f"{FS}/flows", flow_code(1100, 405)),
    Case("trace-flow", "TRACE", f"{FS}/flows/{{flow}}", flow_code(1100, 405)),
    Case("get-ims", "GET", IMS_TOKEN_PATH, flow_code(1100, 405)),
]


def token_for(payload: bytes) -> str:
    """A continuation token with a valid checksum around an arbitrary payload."""
    check = hashlib.blake2b(payload, digest_size=6, person=b"aep-query").digest()
    return base64.urlsafe_b64encode(check + payload).decode().rstrip("=")


# Valid, but for the default order (createdAt, descending), not for `orderby=name`.
CREATED_AT_TOKEN = token_for(json.dumps([1, "createdAt", True, 2, 5, "id"]).encode())
GARBAGE_QUERIES: list[tuple[str, str, int]] = [
    ("tilde", "property=name~=x", 1440),
    ("bad-operator", "property=name<>x", 1450),
    ("bad-operator-2", "property=name=!x", 1450),
    ("no-value", "property=name==", 1453),
    ("empty-list-value", "property=name==a,,b", 1453),
    ("bad-field", "property=na%20me==x", 1449),
    ("bad-field-2", "property=name..x==1", 1449),
    ("range-many", "property=createdAt>1,2", 1443),
    ("range-id", "property=id>5", 1448),
    ("limit-text", "limit=abc", 1453),
    ("limit-zero", "limit=0", 1453),
    ("limit-negative", "limit=-1", 1453),
    ("limit-float", "limit=1.5", 1453),
    ("limit-unicode-digit", "limit=%D9%A3", 1453),
    ("limit-twice", "limit=1&limit=2", 1453),
    ("limit-and-count", "limit=5&count=true", 1401),
    ("count-maybe", "count=maybe", 1453),
    ("orderby-sign-only", "orderby=-", 1432),
    ("orderby-bad-field", "orderby=na!me", 1433),
    ("unknown-param", "foo=bar", 1451),
    ("token-garbage", "continuationToken=garbage", 1453),
    ("token-not-base64", "continuationToken=%25%25%25", 1453),
    ("token-empty", "continuationToken=", 1453),
    ("token-bad-checksum", f"continuationToken={token_for(b'[1]')[:-2]}xy", 1453),
    ("token-wrong-shape", f"continuationToken={token_for(b'[1,2,3]')}", 1453),
    ("token-rank-list", f"continuationToken={token_for(b'[1,1,1,[2],0,1]')}", 1453),
    ("token-deep", f"continuationToken={token_for(b'[' * 3_000 + b']' * 3_000)}", 1453),
    (
        "token-other-orderby",
        f"orderby=name&continuationToken={CREATED_AT_TOKEN}",
        1453,
    ),
]
QUERY_CASES: list[Case] = [
    Case(f"query-{c}-{label}", "GET", f"{FS}/{c}?{query}", flow_code(code))
    for c in ("flows", "runs")  # the two ways lists are served: entities, and runs
    for label, query, code in GARBAGE_QUERIES
] + [
    Case(
        "configs-no-output-type",
        "GET",
        f"{FS}/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs",
        BAD,
    ),
    *[
        Case(
            f"configs-{label}",
            "GET",
            f"{FS}/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs"
            f"?outputType=activationDatasets&{query}",
            BAD,
        )
        for label, query in (
            ("start-text", "start=abc"),
            ("start-negative", "start=-1"),
            ("limit-huge", "limit=1000"),
            ("limit-zero", "limit=0"),
        )
    ],
    Case("configs-wrong-spec", "GET", f"{FS}/connectionSpecs/{SPEC_S3}/configs", flow_code(1413)),
    Case("landing-zone-no-type", "GET", LANDING_ZONE_PATH, BAD),
    Case("landing-zone-bad-type", "GET", f"{LANDING_ZONE_PATH}/credentials?type=x", BAD),
    Case(
        "landing-zone-refresh-no-action",
        "POST",
        f"{LANDING_ZONE_PATH}/credentials?type=dlz_destination",
        BAD,
    ),
]

ADHOC_ACCEPT = {"Accept": ADHOC_DATASET_ACCEPT}


def adhoc_case(label: str, body: Any, expect: Expect = ADHOC) -> Case:
    return Case(
        f"adhoc-{label}", "POST", ADHOC_PATH, expect, json_body=lambda w: body, headers=ADHOC_ACCEPT
    )


def destinations(*items: Any) -> dict[str, Any]:
    return {"activationInfo": {"destinations": list(items)}}


ADHOC_CASES: list[Case] = [
    *[
        Case(f"adhoc-{label}", "POST", ADHOC_PATH, ADHOC, raw=raw, headers=ADHOC_ACCEPT)
        for label, raw, _ in UNREADABLE_BODIES
    ],
    Case("adhoc-no-accept", "POST", ADHOC_PATH, ADHOC, json_body=lambda w: {}),
    Case(
        "adhoc-audience-accept",
        "POST",
        ADHOC_PATH,
        ADHOC,
        json_body=lambda w: {},
        headers={"Accept": "application/json"},
    ),
    adhoc_case("list", []),
    adhoc_case("empty-object", {}),
    adhoc_case("info-int", {"activationInfo": 5}),
    adhoc_case("destinations-empty", destinations()),
    adhoc_case("destination-int", destinations(5)),
    adhoc_case("flow-id-int", destinations({"flowId": 5, "datasets": [{"id": "d"}]})),
    adhoc_case("datasets-missing", destinations({"flowId": "f"})),
    adhoc_case("datasets-empty", destinations({"flowId": "f", "datasets": []})),
    adhoc_case("dataset-id-int", destinations({"flowId": "f", "datasets": [{"id": 5}]})),
    adhoc_case("unknown-flow", destinations({"flowId": "f", "datasets": [{"id": "d"}]})),
    Case(
        "adhoc-dataset-not-in-flow",
        "POST",
        ADHOC_PATH,
        ADHOC,
        json_body=lambda w: destinations({"flowId": w.flow, "datasets": [{"id": "other"}]}),
        headers=ADHOC_ACCEPT,
    ),
    Case(
        "adhoc-text-plain",
        "POST",
        ADHOC_PATH,
        BAD_CONTENT_TYPE,
        raw=b"{}",
        content_type="text/plain",
        headers=ADHOC_ACCEPT,
    ),
    Case(
        "adhoc-too-large",
        "POST",
        ADHOC_PATH,
        TOO_LARGE,
        raw=b" " * (MAX_BODY + 1),
        headers=ADHOC_ACCEPT,
    ),
]

ALL_CASES = [
    *FIELD_CASES,
    *RAW_CASES,
    *PATCH_CASES,
    *ACTION_CASES,
    *UNKNOWN_ID_CASES,
    *ROUTING_CASES,
    *QUERY_CASES,
    *ADHOC_CASES,
]


async def send(emulator: Emulator, world: World, case: Case) -> tuple[int, str, str]:
    headers = await emulator.headers()
    headers.update(case.headers)
    if case.if_match:
        headers["If-Match"] = world.etag
    data: bytes | None = case.raw
    if case.json_body is not None:
        data = json.dumps(case.json_body(world)).encode()
    skip: list[str] = []
    if case.content_type is None:
        skip.append("Content-Type")
    elif data is not None:
        headers["Content-Type"] = case.content_type
    url = emulator.url + case.path.format(**world.ids())
    async with emulator.session.request(
        case.method, url, data=data, headers=headers, skip_auto_headers=skip
    ) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
async def test_bad_input_gets_a_documented_4xx(
    emulator: Emulator, world: World, case: Case
) -> None:
    status, content_type, text = await send(emulator, world, case)
    check_envelope(status, content_type, text, case.expect)


# -- boundaries: the limits refuse what they should and nothing more ---------------------------


def padded_connection(size: int) -> bytes:
    """A valid DLZ base connection of exactly `size` bytes."""
    body = base_connection(StorageType.DLZ)
    body["description"] = ""
    raw = json.dumps(body).encode()
    body["description"] = "x" * (size - len(raw))
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


async def post_raw(
    emulator: Emulator, path: str, data: Any, content_type: str = "application/json"
) -> tuple[int, str, str]:
    headers = {**(await emulator.headers()), "Content-Type": content_type}
    async with emulator.session.post(emulator.url + path, data=data, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_a_body_of_exactly_max_body_bytes_is_read(emulator: Emulator, world: World) -> None:
    status, _, text = await post_raw(emulator, f"{FS}/connections", padded_connection(MAX_BODY))
    assert status == 201, text
    assert (await emulator.fs("DELETE", f"/connections/{json.loads(text)['id']}")).status == 202
    status, content_type, text = await post_raw(
        emulator, f"{FS}/connections", padded_connection(MAX_BODY + 1)
    )
    check_envelope(status, content_type, text, TOO_LARGE)


async def chunks(raw: bytes, size: int = 1_000) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), size):
        yield raw[i : i + size]
        for _ in range(10):  # let the emulator read what has arrived so far
            await asyncio.sleep(0)


async def test_a_chunked_body_is_read_whole_and_limited(emulator: Emulator, world: World) -> None:
    # No Content-Length: the body arrives in pieces, and is still read whole...
    status, _, text = await post_raw(
        emulator, f"{FS}/connections", chunks(padded_connection(MAX_BODY))
    )
    assert status == 201, text
    assert (await emulator.fs("DELETE", f"/connections/{json.loads(text)['id']}")).status == 202
    # ... and refused once it passes the limit.
    status, content_type, text = await post_raw(
        emulator, f"{FS}/connections", chunks(padded_connection(MAX_BODY * 3))
    )
    check_envelope(status, content_type, text, TOO_LARGE)


async def test_the_body_limit_follows_the_knob_at_run_time(
    emulator: Emulator, world: World
) -> None:
    await emulator.control("PATCH", "/config", {"max_body_bytes": 200})
    status, content_type, text = await post_raw(
        emulator, f"{FS}/connections", padded_connection(201)
    )
    check_envelope(status, content_type, text, TOO_LARGE)
    status, _, text = await post_raw(emulator, f"{FS}/connections", padded_connection(200))
    assert status == 201, text
    assert (await emulator.fs("DELETE", f"/connections/{json.loads(text)['id']}")).status == 202


async def test_nesting_up_to_the_limit_is_accepted(emulator: Emulator, world: World) -> None:
    # `data` is free-form on a source connection: MAX_JSON_DEPTH levels in all pass.
    body = source_connection(world.dataset)
    inner: Any = 1
    for _ in range(MAX_JSON_DEPTH - 1):  # the body object itself is the first level
        inner = {"a": inner}
    body["data"] = inner
    status, _, text = await post_raw(emulator, f"{FS}/sourceConnections", json.dumps(body))
    assert status == 201, text
    made = json.loads(text)["id"]
    got = await emulator.fs("GET", f"/sourceConnections/{made}")
    assert got.body["items"][0]["data"] == inner
    assert (await emulator.fs("DELETE", f"/sourceConnections/{made}")).status == 202
    body["data"] = {"a": inner}
    status, content_type, text = await post_raw(
        emulator, f"{FS}/sourceConnections", json.dumps(body)
    )
    check_envelope(status, content_type, text, BAD)


async def test_an_ims_form_over_the_limit_is_refused(emulator: Emulator) -> None:
    async with emulator.session.post(
        emulator.url + IMS_TOKEN_PATH,
        data=b"grant_type=" + b"x" * (MAX_BODY * 2),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        status, content_type, text = resp.status, resp.content_type, await resp.text()
    check_envelope(status, content_type, text, TOO_LARGE)


async def test_a_failed_patch_leaves_the_flow_alone_and_a_good_one_then_works(
    emulator: Emulator, world: World
) -> None:
    for case in PATCH_CASES:
        status, content_type, text = await send(emulator, world, case)
        check_envelope(status, content_type, text, case.expect)
    patched = await emulator.fs(
        "PATCH",
        f"/flows/{world.flow}",
        json_body=NAME_OP,
        headers={"If-Match": world.etag},
    )
    assert patched.status == 200, patched.body
    assert patched.body["etag"] != world.etag
    # The old etag is now stale.
    stale = await emulator.fs(
        "PATCH", f"/flows/{world.flow}", json_body=NAME_OP, headers={"If-Match": world.etag}
    )
    assert stale.status == 412
    restored = await emulator.fs(
        "PATCH",
        f"/flows/{world.flow}",
        json_body=[{"op": "replace", "path": "/name", "value": "flow"}],
        headers={"If-Match": patched.body["etag"]},
    )
    assert restored.status == 200
    world.etag = restored.body["etag"]  # for the world's final check


# -- property: any JSON, any bytes, any query ---------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
TARGETS = [f"{FS}/{c}" for c in CREATES] + [ADHOC_PATH]
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: CI never flakes on a lucky draw
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def shape_of(status: int, text: str) -> str:
    body = json.loads(text)
    if "error_code" in body:
        return "gateway"
    if set(body) == {"message"}:
        return "adhoc"
    if set(body) == {"type", "status", "title", "detail"}:
        return "problem"
    assert body["type"].startswith("https://ns.adobe.com/aep/errors/FLOW-")
    assert body["type"].endswith(f"-{status}")
    return "flow"


@PROPERTY_SETTINGS
@given(target=st.sampled_from(TARGETS), value=JSON_VALUES)
async def test_any_json_body_gets_a_4xx(
    emulator: Emulator, world: World, target: str, value: Any
) -> None:
    headers = {
        **(await emulator.headers()),
        "Accept": ADHOC_DATASET_ACCEPT,
        "Content-Type": "application/json",
    }
    data = json.dumps(value)
    async with emulator.session.post(emulator.url + target, data=data, headers=headers) as resp:
        status, text = resp.status, await resp.text()
    assert 400 <= status < 500, text
    assert shape_of(status, text) == ("adhoc" if target == ADHOC_PATH else "flow")


@PROPERTY_SETTINGS
@given(target=st.sampled_from(TARGETS), raw=st.binary(max_size=300))
async def test_any_bytes_get_a_4xx(
    emulator: Emulator, world: World, target: str, raw: bytes
) -> None:
    headers = {
        **(await emulator.headers()),
        "Accept": ADHOC_DATASET_ACCEPT,
        "Content-Type": "application/json",
    }
    async with emulator.session.post(emulator.url + target, data=raw, headers=headers) as resp:
        status, text = resp.status, await resp.text()
    assert 400 <= status < 500, text
    assert shape_of(status, text) in ("adhoc", "flow")


QUERY_NAMES = st.sampled_from(["property", "limit", "count", "orderby", "continuationToken", "x"])


@PROPERTY_SETTINGS
@given(
    collection=st.sampled_from(["flows", "connections", "runs", "flowSpecs"]),
    params=st.lists(st.tuples(QUERY_NAMES, st.text(max_size=30)), max_size=4),
)
async def test_any_query_gets_a_page_or_a_400(
    emulator: Emulator, world: World, collection: str, params: list[tuple[str, str]]
) -> None:
    answer = await emulator.fs("GET", f"/{collection}", params=params)
    assert answer.status in (200, 400), answer.body
    if answer.status == 200:
        assert "items" in answer.body or "count" in answer.body
    else:
        assert answer.body["type"].startswith("https://ns.adobe.com/aep/errors/FLOW-14")
