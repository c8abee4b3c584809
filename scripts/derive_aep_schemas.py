"""Derive prose-free validation schemas from Adobe's AEP OpenAPI files.

Reads ``flow-service.yaml``, ``destinations.yaml`` and ``ad-hoc-activation.yaml`` from
``--source`` (default ``../shared/aep-openapi`` next to the repository) and writes
``tests/aep_schemas.json``: for every API (keyed by file stem) the paths, methods,
parameters, request-body schema and response schemas, plus the component schemas they
reference.  All human-readable text (descriptions, summaries, titles, examples, vendor
``x-*`` extensions, ``info``, ``servers`` and ``tags``) is removed; only the machine-checkable
structure is kept (names, types, formats, enums, required lists, patterns, bounds,
``nullable``, ``$ref`` and combinators).

The output is deterministic: re-running on the same input gives a byte-identical file.
Only the standard library and PyYAML are needed; the tests never read the source folder
(except the one re-derivation test, which skips when it is absent).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "aep-openapi"
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "aep_schemas.json"

API_FILES = ("ad-hoc-activation", "destinations", "flow-service")
SOURCE_REPOSITORY = "github.com/AdobeDocs/experience-platform-apis"
SOURCE_PATH = "static/swagger-specs/"
SOURCE_COMMIT = "16c60cd7a5617582fc21500f5ab3edf0e2ee308b"

HTTP_METHODS = ("delete", "get", "head", "options", "patch", "post", "put", "trace")

# Longest string value allowed in the output (pattern values excepted): anything longer is
# almost certainly prose that slipped through.
MAX_STRING_LENGTH = 120
# More than this many space-separated words in one string also counts as prose.
MAX_WORDS = 8

# OpenAPI 3.0 Schema Object keywords whose value is a literal kept as-is.
_LITERAL_KEYWORDS = frozenset(
    {
        "default",
        "deprecated",
        "enum",
        "exclusiveMaximum",
        "exclusiveMinimum",
        "format",
        "maxItems",
        "maxLength",
        "maxProperties",
        "maximum",
        "minItems",
        "minLength",
        "minProperties",
        "minimum",
        "multipleOf",
        "nullable",
        "pattern",
        "readOnly",
        "required",
        "type",
        "uniqueItems",
        "writeOnly",
    }
)
# Keywords holding one sub-schema (additionalProperties may also be a boolean).
_SCHEMA_KEYWORDS = frozenset({"additionalProperties", "items", "not"})
# Keywords holding a list of sub-schemas.
_SCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf"})
# Prose and presentation keywords that are dropped on purpose.
_PROSE_KEYWORDS = frozenset(
    {"description", "example", "examples", "externalDocs", "summary", "title", "xml"}
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style scalars: only true/false are booleans, no timestamps.

    PyYAML implements YAML 1.1, where ``on``/``off``/``yes``/``no`` are booleans and
    ``2020-01-01`` is a date; OpenAPI documents expect JSON-compatible scalars.
    """


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class Deriver:
    """Strips one OpenAPI document down to its validation-relevant structure."""

    def __init__(self, api: str, document: dict[str, Any]) -> None:
        self.api = api
        self.document = document
        self.components: dict[str, Any] = document.get("components") or {}
        self.used_schemas: set[str] = set()
        self.notes: set[str] = set()  # source irregularities worked around

    # -- schemas -----------------------------------------------------------------------

    def schema(self, node: Any, where: str) -> Any:
        """Return a copy of an OpenAPI 3.0 Schema Object without prose."""
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise ValueError(f"{self.api}: schema at {where} is not an object: {node!r}")
        out: dict[str, Any] = {}
        for key, value in node.items():
            here = f"{where}/{key}"
            if key == "$ref":
                out[key] = self.schema_ref(value, here)
            elif key in _LITERAL_KEYWORDS:
                out[key] = value
            elif key == "properties":
                out[key] = {
                    str(name): self.schema(sub, f"{here}/{name}") for name, sub in value.items()
                }
            elif key in _SCHEMA_KEYWORDS:
                out[key] = self.schema(value, here)
            elif key in _SCHEMA_LIST_KEYWORDS:
                out[key] = [self.schema(sub, f"{here}/{i}") for i, sub in enumerate(value)]
            elif key == "discriminator":
                out[key] = {k: v for k, v in value.items() if k in ("mapping", "propertyName")}
            elif key in _PROSE_KEYWORDS or str(key).startswith("x-"):
                continue
            else:
                # Not an OpenAPI 3.0 schema keyword (e.g. draft-07 "$schema", or a field
                # written one level too high): it has no validation meaning, so drop it.
                self.notes.add(f"dropped non-keyword {key!r} (at {where})")
        return out

    def schema_ref(self, ref: Any, where: str) -> str:
        prefix = "#/components/schemas/"
        if not isinstance(ref, str) or not ref.startswith(prefix):
            raise ValueError(f"{self.api}: unsupported $ref {ref!r} at {where}")
        name = ref[len(prefix) :]
        if name not in (self.components.get("schemas") or {}):
            raise ValueError(f"{self.api}: dangling $ref {ref!r} at {where}")
        self.used_schemas.add(name)
        return ref

    def resolve(self, node: Any, kind: str) -> Any:
        """Follow a ``#/components/<kind>/<name>`` reference (parameters, responses, ...)."""
        seen: set[str] = set()
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            prefix = f"#/components/{kind}/"
            if not isinstance(ref, str) or not ref.startswith(prefix) or ref in seen:
                raise ValueError(f"{self.api}: unsupported {kind} $ref {ref!r}")
            seen.add(ref)
            node = (self.components.get(kind) or {})[ref[len(prefix) :]]
        return node

    # -- operations --------------------------------------------------------------------

    def parameter(self, node: Any, where: str) -> dict[str, Any]:
        param = self.resolve(node, "parameters")
        out: dict[str, Any] = {
            "in": param["in"],
            "name": param["name"],
            "required": bool(param.get("required", param["in"] == "path")),
        }
        if "schema" in param:
            out["schema"] = self.schema(param["schema"], f"{where}/schema")
        for key in ("explode", "style"):
            if key in param:
                out[key] = param[key]
        return out

    def parameters(self, path_item: dict[str, Any], operation: dict[str, Any], where: str) -> Any:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for source in (path_item.get("parameters") or [], operation.get("parameters") or []):
            for index, node in enumerate(source):
                param = self.parameter(node, f"{where}/parameters/{index}")
                # Operation-level parameters override path-level ones (OpenAPI 3.0 4.7.9).
                merged[(param["in"], param["name"].lower())] = param
        return [merged[key] for key in sorted(merged)]

    def content_schema(self, content: Any, where: str) -> Any:
        """The ``application/json`` schema of a content map, or None."""
        if not content:
            return None
        for media_type in sorted(content):
            if media_type.split(";")[0].strip().lower() == "application/json":
                media = content[media_type] or {}
                if media.get("schema") is not None:
                    return self.schema(media["schema"], f"{where}/{media_type}/schema")
                return None
        return None

    def operation(self, path_item: dict[str, Any], method: str, where: str) -> dict[str, Any]:
        operation = path_item[method]
        out: dict[str, Any] = {
            "parameters": self.parameters(path_item, operation, where),
            "responses": {},
        }
        operation_id = operation.get("operationId")
        if isinstance(operation_id, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", operation_id):
            out["operationId"] = operation_id
        if "requestBody" in operation:
            body = self.resolve(operation["requestBody"], "requestBodies")
            out["requestBody"] = {
                "required": bool(body.get("required", False)),
                "schema": self.content_schema(body.get("content"), f"{where}/requestBody"),
            }
        for status, response in (operation.get("responses") or {}).items():
            if str(response.get("$ref", "")).startswith("#/components/schemas/"):
                # Mis-indented YAML in the source: the response's schema ``$ref`` sits on
                # the Response Object itself and ``content.<type>.schema`` is empty.  Read
                # it as the intended response schema.
                self.notes.add(f"response $ref read as schema (at {where}/responses/{status})")
                response = {"content": {"application/json": {"schema": {"$ref": response["$ref"]}}}}
            resolved = self.resolve(response, "responses")
            out["responses"][str(status)] = self.content_schema(
                resolved.get("content"), f"{where}/responses/{status}"
            )
        return out

    def derive(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for template, path_item in (self.document.get("paths") or {}).items():
            methods = {
                method: self.operation(path_item, method, f"{template}/{method}")
                for method in HTTP_METHODS
                if method in path_item
            }
            if methods:
                paths[template] = methods
        # Pull in component schemas transitively.
        components: dict[str, Any] = {}
        all_schemas = self.components.get("schemas") or {}
        while pending := sorted(self.used_schemas - components.keys()):
            for name in pending:
                components[name] = self.schema(all_schemas[name], f"components/schemas/{name}")
        servers = self.document.get("servers") or []
        base_path = ""
        if servers and isinstance(servers[0].get("url"), str):
            base_path = urlparse(servers[0]["url"]).path.rstrip("/")
        return {
            "basePath": base_path,
            "components": {"schemas": components},
            "openapi": str(self.document.get("openapi", "")),
            "paths": paths,
        }


def iter_strings(node: Any, key: str = "") -> Iterable[tuple[str, str]]:
    """Yield (parent key, string) for every string value and object key in ``node``."""
    if isinstance(node, str):
        yield key, node
    elif isinstance(node, dict):
        for name, value in node.items():
            yield "<key>", name
            yield from iter_strings(value, name)
    elif isinstance(node, list):
        for value in node:
            yield from iter_strings(value, key)


def prose_violations(derived: Any) -> list[str]:
    """Strings that look like prose (too long or too many words), patterns excepted."""
    problems = []
    for key, text in iter_strings(derived):
        if key == "pattern":
            continue
        if len(text) > MAX_STRING_LENGTH or len(text.split()) > MAX_WORDS:
            problems.append(f"{key}: {text[:80]!r}")
    return problems


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data = yaml.load(handle, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an OpenAPI document")
    return data


def derive(source: Path) -> tuple[dict[str, Any], list[str]]:
    """Return the derived document and notes on source irregularities worked around."""
    apis: dict[str, Any] = {}
    notes: list[str] = []
    for stem in API_FILES:
        deriver = Deriver(stem, load_yaml(source / f"{stem}.yaml"))
        apis[stem] = deriver.derive()
        notes.extend(f"{stem}: {item}" for item in sorted(deriver.notes))
    derived = {
        "apis": apis,
        "source": {
            "commit": SOURCE_COMMIT,
            "copyright": "Copyright Adobe",
            "files": [f"{SOURCE_PATH}{stem}.yaml" for stem in API_FILES],
            "license": "Apache-2.0",
            "note": "derived by scripts/derive_aep_schemas.py; descriptions removed",
            "repository": SOURCE_REPOSITORY,
        },
    }
    return derived, notes


def render(derived: dict[str, Any]) -> str:
    return json.dumps(derived, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="fail if the output file is not up to date"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="list source irregularities worked around"
    )
    args = parser.parse_args(argv)

    derived, notes = derive(args.source)
    problems = prose_violations(derived)
    if problems:
        print("derived schemas still contain prose:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    if args.verbose:
        print("source irregularities worked around:", *notes, sep="\n  ", file=sys.stderr)
    text = render(derived)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; re-run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
