"""Parameters checked against the JSON Schemas of AEP's live connection specs.

A connection spec (`GET /connectionSpecs/{id}`) carries the JSON Schema of each way to
authenticate (`authSpec[].spec`) and of the target connection's parameters
(`targetSpec.spec`); AEP validates create requests against them (docs/aep-notes.md,
"Connection specs"). `aep-exporter check` asks for the specs and applies them here, before any
entity is created, so a destination AEP would refuse is found without touching the sandbox.

The runtime does not carry a JSON Schema library, so this reads the subset of draft 7 that
connection specs use: `type`, `properties`, `required`, `additionalProperties: false`,
`enum`, `pattern`, `minLength`, `maxLength`, `items`, `minItems`, `minimum`, `maximum`.
Other keywords are not checked (AEP still is, when the first export creates the entities).

Problems never quote the value: an auth parameter may be a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list, tuple),
    "null": (type(None),),
}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES.get(kind, (object,)))


def problems(schema: Any, value: Any, where: str) -> list[str]:
    """Why `value` does not satisfy `schema`, one sentence each, each starting with the
    place (`where`, then the field path); empty when it does (or the schema is not one)."""
    if not isinstance(schema, Mapping):
        return []
    found: list[str] = []
    kinds = schema.get("type")
    if isinstance(kinds, str):
        kinds = [kinds]
    if isinstance(kinds, list) and kinds and not any(_is(value, str(k)) for k in kinds):
        return [f"{where}: must be of type {' or '.join(str(k) for k in kinds)}"]
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        found.append(f"{where}: must be one of {', '.join(map(str, enum))}")
    if isinstance(value, str):
        found += _text_problems(schema, value, where)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(schema.get("minimum"), int | float) and value < schema["minimum"]:
            found.append(f"{where}: must be at least {schema['minimum']}")
        if isinstance(schema.get("maximum"), int | float) and value > schema["maximum"]:
            found.append(f"{where}: must be at most {schema['maximum']}")
    if isinstance(value, Mapping):
        found += _object_problems(schema, value, where)
    if isinstance(value, list | tuple):
        found += _array_problems(schema, value, where)
    return found


def _text_problems(schema: Mapping[str, Any], value: str, where: str) -> list[str]:
    found = []
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(value) < low:
        found.append(f"{where}: must be at least {low} character(s) long")
    if isinstance(high, int) and len(value) > high:
        found.append(f"{where}: must be at most {high} characters long")
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            matched = re.search(pattern, value) is not None
        except re.error:
            matched = True  # a pattern Python cannot read is AEP's to apply, not ours
        if not matched:
            found.append(f"{where}: does not match the pattern {pattern}")
    return found


def _object_problems(schema: Mapping[str, Any], value: Mapping[str, Any], where: str) -> list[str]:
    found = []
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    for name in required if isinstance(required, list) else ():
        if name not in value:
            found.append(f"{where}.{name}: is required")
    for name, item in value.items():
        if name in properties:
            found += problems(properties[name], item, f"{where}.{name}")
        elif schema.get("additionalProperties") is False:
            found.append(f"{where}.{name}: is not a parameter of this spec")
    return found


def _array_problems(schema: Mapping[str, Any], value: Sequence[Any], where: str) -> list[str]:
    found = []
    low = schema.get("minItems")
    if isinstance(low, int) and len(value) < low:
        found.append(f"{where}: must have at least {low} item(s)")
    items = schema.get("items")
    for index, item in enumerate(value):
        found += problems(items, item, f"{where}[{index}]")
    return found


def auth_problems(spec: Mapping[str, Any], auth: Mapping[str, Any] | None) -> list[str]:
    """Why AEP's connection spec `spec` would refuse a base connection's `auth`."""
    choices = [a for a in spec.get("authSpec") or () if isinstance(a, Mapping)]
    if auth is None:
        if choices:
            names = ", ".join(repr(a.get("name")) for a in choices)
            return [f"auth: this spec needs credentials ({names})"]
        return []
    if not choices:
        return ["auth: this spec takes no credentials"]
    name = str(auth.get("specName", ""))
    chosen = next((a for a in choices if str(a.get("name", "")).lower() == name.lower()), None)
    if chosen is None:
        names = ", ".join(repr(a.get("name")) for a in choices)
        return [f"auth.specName: {name!r} is not one of the spec's ({names})"]
    return problems(chosen.get("spec"), auth.get("params"), "auth.params")


def target_problems(spec: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """Why AEP's connection spec `spec` would refuse a target connection's `params`."""
    target = spec.get("targetSpec")
    if not isinstance(target, Mapping):
        return []
    return problems(target.get("spec"), dict(params), "params")


def encryption_problems(spec: Mapping[str, Any], encryption: Mapping[str, Any] | None) -> list[str]:
    """Why AEP's connection spec `spec` would refuse a base connection's file `encryption`
    (its `encryptionSpecs`, docs/aep-notes.md#destination-options); none when there is none."""
    if encryption is None:
        return []
    choices = [e for e in spec.get("encryptionSpecs") or () if isinstance(e, Mapping)]
    if not choices:
        return ["encryption: this spec takes no file encryption"]
    # Adobe's example names the spec "Encryption spec", not the spec's own name: any name goes.
    found = [
        problems(c.get("spec"), encryption.get("params"), "encryption.params") for c in choices
    ]
    return min(found, key=len)
