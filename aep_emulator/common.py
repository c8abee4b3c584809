"""Small pieces every emulator handler uses: bodies in and out, ids, etags, stamps."""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from aep_emulator.errors import FlowError, ProblemError
from aep_emulator.gateway import STATE_KEY, Caller
from aep_emulator.state import EmulatorState

MAX_JSON_DEPTH = 64  # AEP's bodies nest a few levels; deeper ones would exhaust recursion later


def state_of(request: web.Request) -> EmulatorState:
    return request.app[STATE_KEY]


async def read_json(request: web.Request, *, require_content_type: bool = True) -> Any:
    """The request's JSON body, or the platform's 400/413 answer for a body it cannot read."""
    limit = state_of(request).knobs.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ProblemError(413, "PayloadTooLarge", f"Request body exceeds {limit} bytes")
    if require_content_type and request.content_type != "application/json":
        raise ProblemError(400, "BadRequestError", "A valid content-type must be specified")
    raw = bytearray()  # read(n) returns what has arrived so far, not n bytes: loop
    while len(raw) <= limit:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > limit:
        raise ProblemError(413, "PayloadTooLarge", f"Request body exceeds {limit} bytes")
    if not raw.strip():
        raise FlowError(400, 1405, "Request body is empty")
    try:
        body = json.loads(raw)
        deep = _too_deep(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlowError(400, 1400, f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        deep = True
    if deep:
        raise FlowError(400, 1400, f"Request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _too_deep(value: Any) -> bool:
    """Whether JSON nests deeper than MAX_JSON_DEPTH (iterative: no recursion to exhaust)."""
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


def require_object(body: Any, what: str = "Request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FlowError(400, 1400, f"{what} must be a JSON object")
    return body


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def json_ok(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json")


def raw_json(payload: bytes, status: int = 200) -> web.Response:
    return web.Response(body=payload, status=status, content_type="application/json")


def new_id() -> str:
    return str(uuid.uuid4())


def new_etag() -> str:
    # AEP's etags are quoted strings whose quotes are part of the value.
    return f'"{uuid.uuid4().hex[:8]}-0000-0200-0000-{uuid.uuid4().hex[:12]}"'


def stamp(request: web.Request, who: Caller) -> dict[str, Any]:
    """The audit fields every Flow Service entity carries, for a new entity."""
    now = state_of(request).clock.now_ms()
    user = f"{who.client_id}@AdobeID"
    etag = new_etag()
    return {
        "createdAt": now,
        "updatedAt": now,
        "createdBy": user,
        "updatedBy": user,
        "createdClient": who.client_id,
        "updatedClient": who.client_id,
        "sandboxId": who.sandbox.id,
        "sandboxName": who.sandbox.name,
        "imsOrgId": who.org_id,
        "version": etag,
        "etag": etag,
    }


def touch(request: web.Request, who: Caller, entity: dict[str, Any]) -> str:
    """Mark an entity updated: new etag, new update stamp. Returns the new etag."""
    etag = new_etag()
    entity.update(
        updatedAt=state_of(request).clock.now_ms(),
        updatedBy=f"{who.client_id}@AdobeID",
        updatedClient=who.client_id,
        version=etag,
        etag=etag,
    )
    return etag


def items(entity: dict[str, Any]) -> web.Response:
    """GET-by-id answers are wrapped in a one-item list, as AEP's are."""
    return json_ok({"items": [entity]})
