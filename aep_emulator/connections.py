"""Flow Service: specs, exportable datasets, base, source and target connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jsonschema
from aiohttp import web

from aep_emulator.common import (
    items,
    json_ok,
    new_id,
    read_json,
    require_object,
    stamp,
    state_of,
)
from aep_emulator.encryption import ENCRYPTION_SPEC_NAME, EncryptionError, decode_public_key
from aep_emulator.errors import FlowError, not_found
from aep_emulator.facts import (
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    SPEC_BY_CONNECTION_ID,
    StorageSpec,
    StorageType,
)
from aep_emulator.gateway import caller
from aep_emulator.query import parse_list_query
from aep_emulator.specs import (
    AUTH_SPECS,
    CONNECTION_SPECS,
    FLOW_SPECS,
    secret_params,
    target_schema,
)
from aep_emulator.state import Sandbox

MASK = "****"


def invalid(message: str, code: int = 1400) -> FlowError:
    return FlowError(400, code, message)


def list_response(
    request: web.Request,
    entities: Iterable[dict[str, Any]],
    index: dict[str, dict[str, Any]] | None = None,
) -> web.Response:
    query = parse_list_query(request.query)
    ids = query.id_candidates()
    if ids is not None and index is not None:
        entities = [index[i] for i in ids if i in index]
    # Next links are relative to the service root, as Adobe's examples show them
    # (`/flows?continuationToken=...`):
    # https://developer.adobe.com/experience-platform-apis/references/destinations/
    base_path = request.path.removeprefix(FLOW_SERVICE_PATH)
    return json_ok(query.apply(entities, base_path=base_path))


def _required_text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"'{name}' is required and must be a non-empty string")
    return value


def _spec_ref(body: dict[str, Any]) -> dict[str, str]:
    ref = body.get("connectionSpec")
    if not isinstance(ref, dict) or not isinstance(ref.get("id"), str):
        raise FlowError(400, 1413, "Please provide a valid spec id")
    if "version" not in ref:
        raise FlowError(422, 1412, "connectionSpec.version is a required field")
    if not isinstance(ref["version"], str):
        raise invalid("connectionSpec.version must be a string")
    return {"id": ref["id"], "version": ref["version"]}


def _schema_errors(schema: dict[str, Any], value: Any, where: str) -> None:
    error = jsonschema.exceptions.best_match(_validator(id(schema), schema).iter_errors(value))
    if error is not None:
        field = ".".join(str(p) for p in error.absolute_path)
        place = f"{where}.{field}" if field else where
        raise invalid(f"{place}: {error.message}")


_VALIDATORS: dict[int, jsonschema.Draft7Validator] = {}


def _validator(key: int, schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    found = _VALIDATORS.get(key)
    if found is None:
        found = _VALIDATORS[key] = jsonschema.Draft7Validator(schema)
    return found


def _storage(spec_id: str) -> StorageSpec:
    found = SPEC_BY_CONNECTION_ID.get(spec_id)
    if found is None:
        raise FlowError(400, 1413, "Please provide a valid spec id")
    return found


def _entity(
    request: web.Request, body: dict[str, Any], name: str, spec_ref: dict[str, str]
) -> dict[str, Any]:
    description = body.get("description", "")
    if not isinstance(description, str):
        raise invalid("'description' must be a string")
    return {
        "id": new_id(),
        **stamp(request, caller(request)),
        "name": name,
        "description": description,
        "state": "enabled",
        "connectionSpec": spec_ref,
    }


def _created(entity: dict[str, Any]) -> web.Response:
    return json_ok({"id": entity["id"], "etag": entity["etag"]}, status=201)


# -- specs and exportable datasets ----------------------------------------------------------


async def list_connection_specs(request: web.Request) -> web.Response:
    return list_response(request, CONNECTION_SPECS.values(), CONNECTION_SPECS)


async def get_connection_spec(request: web.Request) -> web.Response:
    spec_id = request.match_info["id"]
    if spec_id not in CONNECTION_SPECS:
        raise not_found("connectionSpecs", spec_id)
    return items(CONNECTION_SPECS[spec_id])


async def list_flow_specs(request: web.Request) -> web.Response:
    return list_response(request, FLOW_SPECS.values(), FLOW_SPECS)


async def get_flow_spec(request: web.Request) -> web.Response:
    spec_id = request.match_info["id"]
    if spec_id not in FLOW_SPECS:
        raise not_found("flowSpecs", spec_id)
    return items(FLOW_SPECS[spec_id])


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"'{name}' must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


async def exportable_datasets(request: web.Request) -> web.Response:
    """`GET /connectionSpecs/{id}/configs?outputType=activationDatasets`: paged by start."""
    spec_id = request.match_info["id"]
    if spec_id not in CONNECTION_SPECS:
        raise not_found("connectionSpecs", spec_id)
    if spec_id != DATALAKE_SOURCE_SPEC_ID:
        raise invalid(
            f"Exportable datasets are listed with connection spec "
            f"{DATALAKE_SOURCE_SPEC_ID}, not {spec_id}",
            1413,
        )
    if request.query.get("outputType") != "activationDatasets":
        raise invalid("outputType=activationDatasets is required")
    start = _int_param(request, "start", 0, 0, 1_000_000_000)
    limit = _int_param(request, "limit", 20, 1, 100)
    who = caller(request)
    datasets = state_of(request).lake.list(who.sandbox.name)
    page = [d.to_catalog(who.org_id) for d in datasets[start : start + limit]]
    properties = request.query.get("properties")
    if properties:
        keep = {"id", *properties.split(",")}
        page = [{k: v for k, v in d.items() if k in keep} for d in page]
    total = len(datasets)
    return json_ok(
        {
            "items": page,
            "pageInfo": {
                "start": start,
                "end": start + len(page) - 1 if page else start,
                "total": total,
                "hasNext": start + len(page) < total,
            },
        }
    )


# -- base connections ----------------------------------------------------------------------


def _auth(storage: StorageSpec, auth: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Validated auth: the public view (secrets masked) and the stored secrets."""
    specs = AUTH_SPECS[storage.storage]
    if not specs:
        if auth not in (None, {}):
            raise invalid(f"{storage.name} connections take no auth")
        return None, {}
    if not isinstance(auth, dict) or not isinstance(auth.get("specName"), str):
        names = ", ".join(repr(s["name"]) for s in specs)
        raise invalid(f"auth.specName is required for {storage.name}: one of {names}")
    chosen = next((s for s in specs if s["name"].lower() == auth["specName"].lower()), None)
    if chosen is None:
        names = ", ".join(repr(s["name"]) for s in specs)
        raise invalid(f"auth.specName {auth['specName']!r} is not one of {names}")
    params = auth.get("params")
    if not isinstance(params, dict):
        raise invalid("auth.params must be an object")
    _schema_errors(chosen["spec"], params, "auth.params")
    if "port" in params and not 1 <= int(params["port"]) <= 65_535:
        raise invalid(f"auth.params.port must be between 1 and 65535, got {params['port']!r}")
    hidden = secret_params(storage.storage, chosen["name"])
    public = {k: (MASK if k in hidden else v) for k, v in params.items()}
    return {"specName": chosen["name"], "params": public}, dict(params)


async def create_connection(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    name = _required_text(body, "name")
    spec_ref = _spec_ref(body)
    storage = _storage(spec_ref["id"])
    public_auth, secret = _auth(storage, body.get("auth"))
    encryption, public_key = await _encryption(storage, body)
    entity = _entity(request, body, name, spec_ref)
    if public_auth is not None:  # auth is an object in both spec files, never null
        entity["auth"] = public_auth
    if encryption is not None:
        entity["encryption"] = encryption
    box = caller(request).sandbox
    box.connections[entity["id"]] = entity
    box.secrets[entity["id"]] = secret
    if public_key is not None:
        box.encryption_keys[entity["id"]] = public_key
    return _created(entity)


async def _encryption(
    storage: StorageSpec, body: dict[str, Any]
) -> tuple[dict[str, Any] | None, bytes | None]:
    """The base connection's file encryption, checked against the connection spec's encryption
    spec: its public view and the OpenPGP public key (None when `encryptionAlgo` is NONE).

    Adobe's pages name the body field `encryption` in some translations and `encryptionSpecs`
    in others (docs/aep-notes.md#destination-options): both are taken, and it reads back as
    `encryption`."""
    given = [k for k in ("encryption", "encryptionSpecs") if body.get(k) is not None]
    if not given:
        return None, None
    if len(given) > 1:
        raise invalid("give 'encryption' or 'encryptionSpecs', not both")
    where, value = given[0], body[given[0]]
    specs = CONNECTION_SPECS[storage.connection_spec_id]["encryptionSpecs"]
    if not specs:
        raise invalid(f"{storage.name} connections take no file encryption")
    if not isinstance(value, dict) or not isinstance(value.get("params"), dict):
        raise invalid(f"{where}.params must be an object with encryptionAlgo and publicKey")
    spec_name = value.get("specName", ENCRYPTION_SPEC_NAME)
    if not isinstance(spec_name, str):
        raise invalid(f"{where}.specName must be a string")
    params = value["params"]
    _schema_errors(specs[0]["spec"], params, f"{where}.params")
    public = {"specName": spec_name, "params": dict(params)}
    if params["encryptionAlgo"] == "NONE":
        return public, None
    try:
        # gpg reads the key: in a thread, so a slow gpg never holds up the event loop.
        key = await asyncio.to_thread(decode_public_key, params["publicKey"])
    except EncryptionError as exc:
        raise invalid(f"{where}.params.publicKey: {exc}") from None
    return public, key


# -- source connections --------------------------------------------------------------------


async def create_source_connection(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    name = _required_text(body, "name")
    spec_ref = _spec_ref(body)
    if spec_ref["id"] != DATALAKE_SOURCE_SPEC_ID:
        raise FlowError(
            400,
            1413,
            f"Dataset exports read from the data lake: "
            f"connectionSpec.id must be {DATALAKE_SOURCE_SPEC_ID}",
        )
    params = body.get("params")
    if not isinstance(params, dict):
        raise invalid("'params' with a 'datasets' list is required")
    _schema_errors(
        CONNECTION_SPECS[DATALAKE_SOURCE_SPEC_ID]["sourceSpec"]["spec"], params, "params"
    )
    who = caller(request)
    lake = state_of(request).lake
    for item in params["datasets"]:
        if lake.get(who.sandbox.name, item["dataSetId"]) is None:
            raise invalid(
                f"Dataset {item['dataSetId']} not found in sandbox {who.sandbox.name}", 1415
            )
    entity = _entity(request, body, name, spec_ref)
    # No base connection: baseConnectionId is left out (a string, never null, in
    # flow-service.yaml); inheritedAttributes is required (destinations.yaml) and empty.
    entity.update(params=params, inheritedAttributes={})
    if isinstance(body.get("data"), dict):
        entity["data"] = body["data"]
    who.sandbox.source_connections[entity["id"]] = entity
    return _created(entity)


# -- target connections --------------------------------------------------------------------


def _target_params(storage: StorageType, params: Any, allow_json_plain: bool) -> None:
    if not isinstance(params, dict):
        raise invalid("'params' must be an object")
    normalized = dict(params)
    for key in ("datasetFileType", "compression"):
        if isinstance(normalized.get(key), str):
            normalized[key] = normalized[key].upper()
    _schema_errors(target_schema(storage), normalized, "params")
    if (
        normalized["datasetFileType"] == "JSON"
        and normalized["compression"] == "NONE"
        and (not allow_json_plain)
    ):
        raise invalid(
            "JSON files are exported compressed only: use compression GZIP with "
            "datasetFileType JSON"
        )
    for key in ("path", "remotePath"):
        value = params.get(key)
        if isinstance(value, str) and ".." in value.split("/"):
            raise invalid(f"params.{key} must not contain '..' segments")


async def create_target_connection(request: web.Request) -> web.Response:
    body = require_object(await read_json(request))
    name = _required_text(body, "name")
    base_id = _required_text(body, "baseConnectionId")
    spec_ref = _spec_ref(body)
    storage = _storage(spec_ref["id"])
    box = caller(request).sandbox
    base = box.connections.get(base_id)
    if base is None:
        raise invalid(f"Base connection {base_id} not found", 1416)
    if base["connectionSpec"]["id"] != spec_ref["id"]:
        raise FlowError(
            400,
            1413,
            f"Base connection {base_id} is a "
            f"{_storage(base['connectionSpec']['id']).name} connection, not "
            f"{storage.name}",
        )
    _target_params(
        storage.storage, body.get("params"), state_of(request).knobs.allow_json_uncompressed
    )
    entity = _entity(request, body, name, spec_ref)
    entity.update(
        baseConnectionId=base_id,
        params=body["params"],
        inheritedAttributes={
            "baseConnection": {"id": base_id, "connectionSpec": base["connectionSpec"]}
        },
    )
    box.target_connections[entity["id"]] = entity
    return _created(entity)


# -- the shared list / get / delete ---------------------------------------------------------


@dataclass(frozen=True)
class Collection:
    """One entity collection of a sandbox, for the operations all of them share."""

    path: str
    select: Callable[[Sandbox], dict[str, dict[str, Any]]]
    users: Callable[[Sandbox, str], list[str]]
    # Brings the sandbox up to date before a read or delete (flows: scheduled runs).
    refresh: Callable[[web.Request], Awaitable[None]] | None = None
    # Forgets what the sandbox keeps about an entity besides its JSON, once it is deleted.
    forget: Callable[[Sandbox, str], None] | None = None

    async def list(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            await self.refresh(request)
        found = self.select(caller(request).sandbox)
        return list_response(request, found.values(), found)

    async def get(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            await self.refresh(request)
        return items(self.lookup(request))

    def lookup(self, request: web.Request) -> dict[str, Any]:
        entity_id = request.match_info["id"]
        entity = self.select(caller(request).sandbox).get(entity_id)
        if entity is None:
            raise not_found(self.path, entity_id)
        return entity

    async def delete(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            await self.refresh(request)
        entity = self.lookup(request)
        box = caller(request).sandbox
        flows = self.users(box, entity["id"])
        if flows:
            raise FlowError(
                400,
                1418,
                f"The {self.path} entity {entity['id']} is in use by "
                f"flows {sorted(flows)} and cannot be deleted",
                entity_id=entity["id"],
                entity_type=self.path,
            )
        del self.select(box)[entity["id"]]
        box.secrets.pop(entity["id"], None)
        box.encryption_keys.pop(entity["id"], None)
        if self.forget is not None:
            self.forget(box, entity["id"])
        return web.Response(status=202)


def _flows_using(field: str) -> Callable[[Sandbox, str], list[str]]:
    def users(box: Sandbox, entity_id: str) -> list[str]:
        return [f["id"] for f in box.flows.values() if entity_id in f[field]]

    return users


def _flows_using_base(box: Sandbox, base_id: str) -> list[str]:
    targets = {t["id"] for t in box.target_connections.values() if t["baseConnectionId"] == base_id}
    return [f["id"] for f in box.flows.values() if targets & set(f["targetConnectionIds"])]


CONNECTIONS = Collection("connections", lambda b: b.connections, _flows_using_base)
SOURCE_CONNECTIONS = Collection(
    "sourceConnections", lambda b: b.source_connections, _flows_using("sourceConnectionIds")
)
TARGET_CONNECTIONS = Collection(
    "targetConnections", lambda b: b.target_connections, _flows_using("targetConnectionIds")
)
