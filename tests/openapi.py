"""Validate AEP requests and responses against Adobe's published OpenAPI schemas.

The schemas come from ``tests/aep_schemas.json``, a prose-free derivative of Adobe's
``flow-service.yaml``, ``destinations.yaml`` and ``ad-hoc-activation.yaml`` (origin and licence:
``tests/aep_schemas.NOTICE.md``; regenerate with ``scripts/derive_aep_schemas.py``).  APIs are
keyed by file stem: ``"flow-service"``, ``"destinations"``, ``"ad-hoc-activation"``.

Public API (every validator raises AssertionError naming the field and the failed rule)::

    validate_response(api, method, path, status, body)
    validate_request_body(api, method, path, body)
    validate_request_parameters(api, method, path, query=..., headers=...)
    validate_schema(api, component, instance, direction="response")
    operation_for(api, method, concrete_path) -> path template
    response_schema(api, method, path, status) -> OpenAPI schema or None

``path`` may be the spec's template (``/flows/{FLOW_ID}``) or a concrete path
(``/flows/123``, optionally with the API base path or a query string); concrete paths are
mapped with :func:`operation_for`.  Templates differ per file: ``{FLOW_ID}`` in flow-service,
``{id}`` in destinations.

OpenAPI 3.0 Schema Objects are translated to JSON Schema draft 4, which the OpenAPI 3.0 dialect
extends: ``nullable: true`` adds the ``"null"`` type, ``readOnly`` properties are not required
in requests nor ``writeOnly`` ones in responses, ``$ref`` resolves into the API's
``components/schemas`` (``allOf``/``oneOf``/``anyOf`` follow JSON-schema semantics), and the
``int32``/``int64`` formats are range-checked.  Types, enums, required fields, patterns and
combinators are enforced strictly; undeclared properties are allowed because Adobe never
closes its objects.  When the spec gives no JSON schema for a status (or does not list the
status), :func:`validate_response` passes.

Adobe's files contradict their own examples and the product docs in places.  Each contradiction
that real traffic hits is one explicit :class:`Deviation` in :data:`KNOWN_DEVIATIONS`, naming
the exact rule and the offending values it tolerates, with its reason.  Every validator takes
``deviations=``: pass ``()`` to be fully strict or add entries for a test of your own.
Because several ``oneOf`` lists in these specs have overlapping, open alternatives, an
operation-level check may be satisfied by an unintended alternative; when a message has a
known precise shape, also check it with :func:`validate_schema` against that component
(e.g. ``Create_Batch_Destination_Flow_Request_Dataset_V2`` for a dataset dataflow).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import extend

SCHEMAS_FILE = Path(__file__).with_name("aep_schemas.json")
APIS = ("ad-hoc-activation", "destinations", "flow-service")

Direction = Literal["request", "response"]

_COMPONENTS = "#/components/schemas/"
_MAX_MESSAGE = 300
_MAX_VALUE = 60

# --------------------------------------------------------------------------------------------
# Known deviations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deviation:
    """One documented disagreement between Adobe's spec and real traffic that tests tolerate.

    ``rule`` is the location of the failing rule exactly as failure messages print it:
    ``#/components/schemas/<Name>/...`` for rules inside a component, or
    ``<METHOD> <path> <part>#/...`` for rules written inline in an operation (``<part>`` is
    ``request``, ``response <status>``, ``query`` or ``header``; header names are lower case).
    The last segment is the JSON-schema keyword (``enum``, ``type``, ``pattern``,
    ``required``, ``oneOf`` ...).  A failure of that rule is tolerated when the offending
    value is listed in ``accept`` (for ``required``: the missing field's name) or has one of
    the JSON types in ``accept_types``.  With both empty, any failure of the rule is
    tolerated; that is only used for ``oneOf`` lists whose alternatives overlap, where it
    lets a value match several alternatives (it must still match one).

    With ``wrap_items=True``, ``rule`` names a message (``GET /connections response 200``)
    whose declared schema describes one element of the ``{"items": [...]}`` envelope the
    service really returns; the schema is then applied to every element of ``items``.

    When no alternative of a ``oneOf``/``anyOf`` matches, the failure is tolerated if one
    alternative fails solely by tolerated errors.
    """

    api: str
    rule: str
    reason: str
    accept: tuple[object, ...] = ()
    accept_types: tuple[str, ...] = ()
    wrap_items: bool = False

    def tolerates(self, api: str, rule: str, value: object) -> bool:
        if self.wrap_items or api != self.api or rule != self.rule:
            return False
        if not self.accept and not self.accept_types:
            return True
        return _json_type(value) in self.accept_types or any(
            type(value) is type(ok) and value == ok for ok in self.accept
        )


def _items_envelope(path: str) -> Deviation:
    return Deviation(
        api="destinations",
        rule=f"GET {path} response 200",
        wrap_items=True,
        reason=(
            "the 200 schema is the bare item, but the service and every example in the spec "
            'return {"items": [item, ...]}'
        ),
    )


KNOWN_DEVIATIONS: tuple[Deviation, ...] = (
    # ---- destinations.yaml ------------------------------------------------------------------
    *(
        _items_envelope(path)
        for path in (
            "/connections",
            "/connections/{id}",
            "/sourceConnections",
            "/sourceConnections/{id}",
            "/targetConnections",
            "/targetConnections/{id}",
        )
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/StatusSummary/properties/status/enum",
        accept=("success", "failed", "processing", "waiting"),
        reason=(
            "the run status enum is capitalised (Success, Failed, ...) but the spec's run "
            "examples and the monitoring docs use lower case "
            "(https://experienceleague.adobe.com/en/docs/experience-platform/dataflows/api/monitor)"
        ),
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/Info/properties/code/pattern",
        accept=("ACTIVATION_BATCH-0000-FAILED", "ACTIVATION_BATCH-0000-SKIP"),
        reason=(
            "Info.code must look like ABC-123-400, yet the spec's own dataset-run examples "
            "report these activation codes"
        ),
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/DatasetScheduleParams_V2/properties/interval/enum",
        accept=(0,),
        reason=(
            "interval enum is 1|3|6|9|12, but a one-time full export is documented as "
            "DAILY_FULL_EXPORT + day + interval 0 "
            "(https://experienceleague.adobe.com/en/docs/experience-platform/destinations/api/export-datasets)"
        ),
    ),
    *(
        Deviation(
            api="destinations",
            rule=(
                "#/components/schemas/BaseFlowItem/properties/inheritedAttributes/properties/"
                f"{name}/type"
            ),
            accept_types=("array",),
            reason=(
                f"inheritedAttributes.{name} is typed object, but every flow example in the "
                "spec returns an array of connections"
            ),
        )
        for name in ("sourceConnections", "targetConnections")
    ),
    *(
        Deviation(
            api="destinations",
            rule=f"GET {path} response 200#/oneOf",
            reason=(
                "oneOf(Batch_Flow, Streaming_Flow) overlap: both are {items: [...]} with open "
                "items, so an empty list matches both"
            ),
        )
        for path in ("/flows", "/flows/{id}")
    ),
    *(
        Deviation(
            api="destinations",
            rule=(
                f"#/components/schemas/{item}/properties/inheritedAttributes/"
                "properties/baseConnection/type"
            ),
            accept_types=("object",),
            reason=(
                "inheritedAttributes.baseConnection is typed string, but the spec's examples "
                "return the base connection object {id, connectionSpec}"
            ),
        )
        for item in ("SourceConnectionItem", "TargetConnectionItem")
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/TargetConnectionItem/properties/params/oneOf",
        reason=(
            "oneOf over S3/SFTP params overlaps: SFTP params require nothing an S3 dataset "
            "target lacks, so valid S3 params match several alternatives"
        ),
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/SourceConnectionItem/required",
        accept=("typeInfo",),
        reason=(
            "typeInfo (ups/ProfileFragments) is required, but it only exists on profile-store "
            "source connections; the spec's data-lake source example has none"
        ),
    ),
    Deviation(
        api="destinations",
        rule="POST /sourceConnections request#/oneOf",
        reason=(
            "oneOf(generic, data-lake) source connection overlap: the generic schema is open, "
            "so every valid data-lake body matches both"
        ),
    ),
    Deviation(
        api="destinations",
        rule="POST /flows request#/oneOf",
        reason=(
            "the three flow-request alternatives are open and overlap: a dataset flow with "
            "transformations: [] also matches the legacy batch request; pin dataset flows "
            "with validate_schema(..., 'Create_Batch_Destination_Flow_Request_Dataset_V2', body)"
        ),
    ),
    Deviation(
        api="destinations",
        rule="#/components/schemas/PatchFlowItem/properties/value/oneOf",
        reason=(
            "the value alternatives are open objects without required fields, so a "
            "scheduleParams value matches several of them; check the value itself with "
            "validate_schema(..., 'DatasetScheduleParams_V2', value)"
        ),
    ),
    # ---- flow-service.yaml ------------------------------------------------------------------
    Deviation(
        api="flow-service",
        rule="POST /flows/{FLOW_ID}/action query#/properties/op/enum",
        accept=("enable", "disable"),
        reason=(
            "op is listed as ENABLE|DISABLE|...; the destination dataflow docs and aepp send "
            "lower-case enable|disable "
            "(https://experienceleague.adobe.com/en/docs/experience-platform/destinations/api/update-destination-dataflows)"
        ),
    ),
    Deviation(
        api="flow-service",
        rule="POST /flows/{FLOW_ID}/action query#/required",
        accept=("subOp",),
        reason="subOp is marked required, but documented enable/disable calls send only op",
    ),
    Deviation(
        api="flow-service",
        rule="#/components/schemas/PatchInstruction/properties/op/enum",
        accept=("add", "replace", "remove"),
        reason=(
            "op is listed as ADD|REPLACE|REMOVE, while destinations.yaml and the dataflow "
            "update docs use lower-case JSON-Patch ops"
        ),
    ),
    Deviation(
        api="flow-service",
        rule="#/components/schemas/PatchInstruction/properties/value/type",
        accept_types=("array", "string", "integer"),
        reason=(
            "value is typed object, but documented patches replace /sourceConnectionIds "
            "(array) and /name, /description (string)"
        ),
    ),
    Deviation(
        api="flow-service",
        rule="#/components/schemas/ScheduleSpecDTO/properties/interval/type",
        accept_types=("integer",),
        reason=(
            "interval is typed string, but dataset dataflows (destinations.yaml "
            "DatasetScheduleParams_V2, docs, examples) use an integer"
        ),
    ),
    *(
        Deviation(
            api="flow-service",
            rule=f"#/components/schemas/{name}/required",
            accept=("data",),
            reason=(
                "data (format/schema) is required for ingestion; destination "
                f"{kind} connections carry none (see destinations.yaml)"
            ),
        )
        for name, kind in (
            ("CreateSourceConnectionRequest", "source"),
            ("CreateTargetConnectionRequest", "target"),
        )
    ),
    # ---- ad-hoc-activation.yaml -------------------------------------------------------------
    Deviation(
        api="ad-hoc-activation",
        rule="POST /adhocrun header#/properties/accept/enum",
        accept=("application/vnd.adobe.adhoc.dataset.activation+json; version=1",),
        reason=(
            "only the audience v2 Accept value is listed; the dataset export variant is "
            "selected with this Accept value (docs/aep-notes.md#ad-hoc-dataset-exports)"
        ),
    ),
    Deviation(
        api="ad-hoc-activation",
        rule="#/components/schemas/activationInfoMap/additionalProperties/items/type",
        accept_types=("object",),
        reason=(
            "the spec describes audience bodies only ({flowId: [audienceId]}); the dataset "
            "variant sends activationInfo.destinations as [{flowId, datasets: [{id}]}]"
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# Loading and OpenAPI 3.0 -> JSON Schema draft 4
# --------------------------------------------------------------------------------------------


@cache
def _document() -> dict[str, Any]:
    with SCHEMAS_FILE.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def _api(api: str) -> dict[str, Any]:
    apis: dict[str, Any] = _document()["apis"]
    if api not in apis:
        raise AssertionError(f"unknown API {api!r}; known: {', '.join(sorted(apis))}")
    result: dict[str, Any] = apis[api]
    return result


def _to_json_schema(node: Any, direction: Direction) -> Any:
    """Translate an OpenAPI 3.0 Schema Object to JSON Schema draft 4."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _to_json_schema(sub, direction) for name, sub in value.items()}
        elif key in ("items", "not", "additionalProperties"):
            out[key] = _to_json_schema(value, direction)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(sub, direction) for sub in value]
        elif key not in ("nullable", "readOnly", "writeOnly", "discriminator", "deprecated"):
            out[key] = value
    hidden_flag = "readOnly" if direction == "request" else "writeOnly"
    properties = node.get("properties")
    if isinstance(properties, dict) and isinstance(out.get("required"), list):
        hidden = {
            name
            for name, sub in properties.items()
            if isinstance(sub, dict) and sub.get(hidden_flag) is True
        }
        out["required"] = [name for name in out["required"] if name not in hidden]
        if not out["required"]:
            del out["required"]
    if node.get("nullable") is True and "$ref" not in node:
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "type" not in out:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


@cache
def _components(api: str, direction: Direction) -> dict[str, Any]:
    schemas: dict[str, Any] = _api(api)["components"]["schemas"]
    return {name: _to_json_schema(schema, direction) for name, schema in schemas.items()}


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("int32")
def _is_int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def _required(
    validator: Validator, required: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """Draft-4 ``required`` whose errors point at the missing field itself."""
    if not validator.is_type(instance, "object"):
        return
    for name in required:
        if name not in instance:
            yield ValidationError(f"missing required field {name!r}", path=[name])


# types-jsonschema leaves ``extend`` untyped; it returns a validator class.
_extend = cast("Callable[..., type[Validator]]", extend)
_Validator = _extend(Draft4Validator, validators={"required": _required})


@dataclass(frozen=True)
class _Compiled:
    validator: Validator
    root: dict[str, Any]
    label: str  # prefix for rule locations outside components, e.g. "GET /runs response 200"


@cache
def _compile(api: str, schema_json: str, direction: Direction, label: str) -> _Compiled:
    schema = _to_json_schema(json.loads(schema_json), direction)
    root = {"allOf": [schema], "components": {"schemas": _components(api, direction)}}
    return _Compiled(_Validator(root, format_checker=_FORMATS), root, label)


def _compiled(api: str, schema: Any, direction: Direction, label: str) -> _Compiled:
    return _compile(api, json.dumps(schema, sort_keys=True), direction, label)


# --------------------------------------------------------------------------------------------
# Operations and paths
# --------------------------------------------------------------------------------------------


def _segments(path: str) -> list[str]:
    return [segment for segment in path.split("/") if segment]


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def operation_for(api: str, method: str, concrete_path: str) -> str:
    """Map a concrete request path to the spec's path template for ``method``.

    Accepts a bare path (``/flows/123``), one with the API base path
    (``/data/foundation/flowservice/flows/123``) or a full URL; any query string is ignored.
    Literal segments beat template parameters (``/flows/search`` over ``/flows/{FLOW_ID}``);
    a trailing slash only breaks ties (flow-service spells some templates with one).
    Raises AssertionError when no operation of the spec matches.
    """
    spec = _api(api)
    path = re.sub(r"^[a-z][a-z0-9+.-]*://[^/]*", "", concrete_path).split("?", 1)[0]
    base: str = spec["basePath"]
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base) :]
    wanted = _segments(path)
    verb = method.lower()
    best: tuple[int, bool, str] | None = None
    other_methods: set[str] = set()
    for template, operations in spec["paths"].items():
        segments = _segments(template)
        if len(segments) != len(wanted) or not all(
            t == s or _is_param(t) for t, s in zip(segments, wanted, strict=True)
        ):
            continue
        if verb not in operations:
            other_methods.update(operations)
            continue
        rank = (
            sum(not _is_param(t) for t in segments),
            template.endswith("/") == path.endswith("/"),
        )
        if best is None or rank > best[:2]:
            best = (*rank, template)
    if best is None:
        hint = f"; the path exists for {', '.join(sorted(m.upper() for m in other_methods))}"
        raise AssertionError(
            f"{api}: no {method.upper()} operation in Adobe's spec matches {concrete_path!r}"
            + (hint if other_methods else "")
        )
    return best[2]


def _template(api: str, method: str, path: str) -> str:
    paths: dict[str, Any] = _api(api)["paths"]
    if path in paths and method.lower() in paths[path]:
        return path
    return operation_for(api, method, path)


def _operation(api: str, method: str, template: str) -> dict[str, Any]:
    operation: dict[str, Any] = _api(api)["paths"][template][method.lower()]
    return operation


def response_schema(api: str, method: str, path: str, status: int) -> Any:
    """The OpenAPI schema of a response (``$ref`` unresolved), or None if none is given.

    Looks up the exact status, then an ``NXX`` range, then ``default``.
    """
    operation = _operation(api, method, _template(api, method, path))
    responses: dict[str, Any] = operation["responses"]
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            return responses[key]
    return None


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _field(path: Iterable[object]) -> str:
    text = ""
    for segment in path:
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            text += f".{segment}" if text else str(segment)
    return text or "<body>"


def _discriminators(errors: Iterable[ValidationError]) -> int:
    return sum(
        e.validator == "enum"
        and isinstance(e.validator_value, list)
        and len(e.validator_value) == 1
        for e in errors
    )


class _Report:
    def __init__(self, api: str, compiled: _Compiled, deviations: Sequence[Deviation]) -> None:
        self.api = api
        self.compiled = compiled
        self.deviations = deviations

    def location(self, error: ValidationError) -> str:
        """Where the failing rule lives: in a component, or inline in the message schema."""
        root = self.compiled.root
        node: Any = root
        location = f"{self.compiled.label}#"
        for segment in error.absolute_schema_path:
            # jsonschema leaves "$ref" out of schema paths: follow references implicitly.
            while isinstance(node, dict) and "$ref" in node and segment not in node:
                ref = node["$ref"]
                node = root["components"]["schemas"].get(ref[len(_COMPONENTS) :])
                location = ref
            if isinstance(node, dict):
                node = node.get(str(segment))
            elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
                node = node[segment]
            else:
                node = None
            location += f"/{segment}"
        return location.replace("#/allOf/0", "#", 1)

    def tolerated(self, error: ValidationError) -> bool:
        if error.validator in ("oneOf", "anyOf") and error.context:
            # No alternative matched: tolerated only if one fails solely by tolerated errors.
            branches: dict[object, list[ValidationError]] = {}
            for sub in error.context:
                branches.setdefault(sub.relative_schema_path[0], []).append(sub)
            return any(all(self.tolerated(sub) for sub in subs) for subs in branches.values())
        value = error.path[-1] if error.validator == "required" and error.path else error.instance
        rule = self.location(error)
        return any(d.tolerates(self.api, rule, value) for d in self.deviations)

    def describe(self, error: ValidationError) -> str:
        message = error.message
        instance_repr = repr(error.instance)
        if len(instance_repr) > _MAX_VALUE and message.startswith(instance_repr):
            message = instance_repr[: _MAX_VALUE - 3] + "..." + message[len(instance_repr) :]
        if error.validator in ("oneOf", "anyOf"):
            count = len(error.validator_value) if isinstance(error.validator_value, list) else 0
            if error.context:
                message = f"matches none of the {count} alternatives"
            else:
                matched = message.partition(" is valid under each of ")[2]
                message = f"matches more than one of the {count} alternatives: {matched}"
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        text = f"{_field(error.absolute_path)}: {message} [rule at {self.location(error)}]"
        if error.validator in ("oneOf", "anyOf") and error.context:
            # The intended alternative is the one whose single-value enums (discriminators
            # such as connectionSpec.id or specName) hold, then the one with fewest errors.
            branches: dict[object, list[ValidationError]] = {}
            for sub in error.context:
                if not self.tolerated(sub):
                    branches.setdefault(sub.relative_schema_path[0], []).append(sub)
            if branches:
                nearest = min(
                    branches.values(), key=lambda subs: (_discriminators(subs), len(subs))
                )
                closest = best_match(nearest)
                if closest is not None:
                    text += f"\n      closest alternative fails at {self.describe(closest)}"
        return text

    def check(self, instance: Any, what: str) -> None:
        errors = [
            error
            for error in self.compiled.validator.iter_errors(instance)
            if not self.tolerated(error)
        ]
        if not errors:
            return
        errors.sort(key=lambda e: ([str(s) for s in e.absolute_path], str(e.validator)))
        lines = "\n".join(f"  - {self.describe(error)}" for error in errors)
        raise AssertionError(f"{what} does not match Adobe's OpenAPI schema:\n{lines}")


def _validate(
    api: str,
    label: str,
    schema: Any,
    direction: Direction,
    instance: Any,
    deviations: Iterable[Deviation],
) -> None:
    deviations = tuple(deviations)
    if any(d.wrap_items and d.api == api and d.rule == label for d in deviations):
        schema = {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": schema}},
        }
    report = _Report(api, _compiled(api, schema, direction, label), deviations)
    report.check(instance, f"{api} {label}")


def validate_response(
    api: str,
    method: str,
    path: str,
    status: int,
    body: Any,
    *,
    deviations: Iterable[Deviation] = KNOWN_DEVIATIONS,
) -> None:
    """Assert that a decoded JSON response body matches the spec for ``status``.

    Passes when the spec gives no JSON schema for that status (or does not list it).
    """
    template = _template(api, method, path)
    schema = response_schema(api, method, template, status)
    if schema is not None:
        label = f"{method.upper()} {template} response {status}"
        _validate(api, label, schema, "response", body, deviations)


def validate_request_body(
    api: str,
    method: str,
    path: str,
    body: Any,
    *,
    deviations: Iterable[Deviation] = KNOWN_DEVIATIONS,
) -> None:
    """Assert that a decoded JSON request body (``None``: no body) matches the spec."""
    template = _template(api, method, path)
    label = f"{method.upper()} {template} request"
    request_body = _operation(api, method, template).get("requestBody")
    if request_body is None:
        if body is not None:
            raise AssertionError(f"{api} {label}: the operation takes no request body")
        return
    if body is None:
        if request_body["required"]:
            raise AssertionError(f"{api} {label}: the spec requires a request body")
        return
    if request_body["schema"] is not None:
        _validate(api, label, request_body["schema"], "request", body, deviations)


def validate_schema(
    api: str,
    component: str,
    instance: Any,
    *,
    direction: Direction = "response",
    deviations: Iterable[Deviation] = KNOWN_DEVIATIONS,
) -> None:
    """Assert that ``instance`` matches ``#/components/schemas/<component>`` of ``api``.

    Use it to pin a message to the alternative it is meant to be when an operation's
    ``oneOf`` is too loose.  ``direction`` decides whether ``readOnly`` or ``writeOnly``
    properties may be missing.
    """
    if component not in _api(api)["components"]["schemas"]:
        raise AssertionError(f"{api}: no component schema {component!r} in the derived spec")
    schema = {"$ref": _COMPONENTS + component}
    _validate(api, component, schema, direction, instance, deviations)


def _resolve(api: str, schema: Any) -> Any:
    components = _api(api)["components"]["schemas"]
    while isinstance(schema, dict) and "$ref" in schema:
        schema = components[schema["$ref"][len(_COMPONENTS) :]]
    return schema


def _coerce(api: str, value: str | Sequence[str], schema: Any) -> Any:
    """Turn a query-string value into the JSON value its parameter schema describes."""
    schema = _resolve(api, schema) or {}
    kind = schema.get("type")
    if kind == "array":
        values = [value] if isinstance(value, str) else list(value)
        if len(values) == 1:
            values = values[0].split(",")
        return [_coerce(api, item, schema.get("items")) for item in values]
    if not isinstance(value, str):
        return list(value)  # repeated although not an array: reported as a type error
    if kind == "integer" and re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    if kind == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
        return float(value)
    if kind == "boolean" and value in ("true", "false"):
        return value == "true"
    return value


def _parameters_schema(operation: Mapping[str, Any], location: str) -> dict[str, Any]:
    params = [p for p in operation["parameters"] if p["in"] == location]

    def key(param: Mapping[str, Any]) -> str:
        name = str(param["name"])
        return name if location == "query" else name.lower()

    schema: dict[str, Any] = {
        "type": "object",
        "properties": {key(p): p.get("schema", {}) for p in params},
    }
    required = [key(p) for p in params if p["required"]]
    if required:
        schema["required"] = required
    return schema


def validate_request_parameters(
    api: str,
    method: str,
    path: str,
    *,
    query: Mapping[str, str | Sequence[str]] | None = None,
    headers: Mapping[str, str] | None = None,
    deviations: Iterable[Deviation] = KNOWN_DEVIATIONS,
) -> None:
    """Assert that query parameters and/or headers match the operation's parameter list.

    Only the mappings passed are checked.  Query values are strings (a list of strings for
    a repeated parameter) and are converted as their schema says (integer, boolean, comma
    separated arrays); header names are compared case-insensitively.  Undeclared parameters
    are allowed.
    """
    template = _template(api, method, path)
    operation = _operation(api, method, template)
    prefix = f"{method.upper()} {template}"
    if query is not None:
        schema = _parameters_schema(operation, "query")
        declared = schema["properties"]
        values = {
            name: _coerce(api, value, declared[name]) if name in declared else value
            for name, value in query.items()
        }
        _validate(api, f"{prefix} query", schema, "request", values, deviations)
    if headers is not None:
        schema = _parameters_schema(operation, "header")
        lowered = {name.lower(): value for name, value in headers.items()}
        _validate(api, f"{prefix} header", schema, "request", lowered, deviations)
