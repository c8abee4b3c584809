"""IMS token issuance and the Adobe I/O gateway's header checks."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

from aiohttp import web

from aep_emulator.errors import FlowError, GatewayError, OAuthError
from aep_emulator.state import EmulatorState, Sandbox, Token

DEFAULT_SANDBOX = "prod"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling a platform API, as the gateway established it."""

    org_id: str
    client_id: str
    sandbox: Sandbox


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def issue_token(state: EmulatorState, client_id: str) -> tuple[str, int]:
    """A JWT-shaped opaque token (clients must not rely on its content) and its lifetime."""
    knobs = state.knobs
    lifetime = knobs.token_lifetime_s
    now = state.clock.now()
    claims = {
        "client_id": client_id,
        "org": knobs.org_id,
        "iat": int(now * 1000),
        "expires_in": int(lifetime * 1000),
        "type": "access_token",
    }
    token = ".".join((_b64({"alg": "none", "typ": "JWT"}), _b64(claims), secrets.token_urlsafe(24)))
    state.tokens[token] = Token(knobs.org_id, client_id, now + lifetime)
    return token, max(1, int(lifetime))


async def ims_token(request: web.Request) -> web.Response:
    """`POST /ims/token/v3`: OAuth server-to-server client credentials."""
    state: EmulatorState = request.app[STATE_KEY]
    form = dict(request.query)
    if request.can_read_body:
        if request.content_type != "application/x-www-form-urlencoded":
            raise OAuthError(
                400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded"
            )
        try:
            posted = await request.post()
        except (ValueError, LookupError):  # undecodable bytes, or an unknown charset
            raise OAuthError(400, "invalid_request", "the form body cannot be decoded") from None
        form.update({k: v for k, v in posted.items() if isinstance(v, str)})
    grant = form.get("grant_type")
    if grant is None:
        raise OAuthError(400, "invalid_request", "missing grant_type parameter")
    if grant != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type", f"unsupported grant_type {grant!r}")
    for name in ("client_id", "client_secret", "scope"):
        if not form.get(name):
            raise OAuthError(400, "invalid_request", f"missing {name} parameter")
    knobs = state.knobs
    if form["client_id"] != knobs.client_id:
        raise OAuthError(400, "invalid_client", "invalid client_id parameter")
    # Bytes, not str: compare_digest refuses str with non-ASCII characters.
    if not secrets.compare_digest(form["client_secret"].encode(), knobs.client_secret.encode()):
        raise OAuthError(401, "invalid_client", "invalid client_secret parameter")
    token, expires_in = issue_token(state, form["client_id"])
    return web.json_response(
        {"access_token": token, "token_type": "bearer", "expires_in": expires_in}
    )


def authenticate(request: web.Request, state: EmulatorState) -> Caller:
    """Apply the gateway's checks, in the gateway's order, to a platform call."""
    auth = request.headers.get("Authorization")
    if not auth:
        raise GatewayError(403, "403010", "Oauth token is missing.")
    scheme, _, token = auth.partition(" ")
    found = state.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
    if found is None or found.expires_at <= state.clock.now():
        raise GatewayError(401, "401013", "Oauth token is not valid")
    api_key = request.headers.get("x-api-key")
    if not api_key:
        raise GatewayError(403, "403000", "Api Key is required")
    if api_key != found.client_id:
        raise GatewayError(403, "403003", "Api Key is invalid")
    org = request.headers.get("x-gw-ims-org-id")
    if not org:
        raise GatewayError(400, "400003", "Missing header: x-gw-ims-org-id")
    if org != found.org_id:
        raise GatewayError(403, "403025", "Profile is not valid")
    name = request.headers.get("x-sandbox-name", DEFAULT_SANDBOX)
    if name not in state.knobs.sandboxes:
        raise FlowError(404, 2100, f"Sandbox {name!r} not found for org {org}")
    return Caller(org, found.client_id, state.sandbox(org, name))


# The answer when the credential's roles lack a permission: Flow Service's FLOW-2120-403 (its
# error catalogue, docs/aep-notes.md#permissions).
FORBIDDEN_MESSAGE = (
    "You do not have sufficient permissions to perform the operation. Please contact your "
    "administrator to resolve permissions and try again."
)
_READS = frozenset({"GET", "HEAD"})


def required_permission(operation: str, method: str) -> str | None:
    """The permission a platform call needs (docs/aep-notes.md#permissions), by its route
    name: listing exportable datasets needs View Datasets, other Flow Service reads View
    Destinations, and every change and ad hoc run Manage and Activate Dataset Destinations.
    The landing zone's own API needs none of the three."""
    if operation == "connectionSpecs.configs":
        return "view-datasets"
    if operation == "adhoc.run":
        return "manage-dataset-destinations"
    if operation.startswith("landingzone."):
        return None
    return "view-destinations" if method.upper() in _READS else "manage-dataset-destinations"


def authorize(request: web.Request, state: EmulatorState, operation: str) -> None:
    """Refuse a call that needs a permission the credential lacks (`denied_permissions`)."""
    needed = required_permission(operation, request.method)
    if needed is not None and needed in state.knobs.denied_permissions:
        raise FlowError(403, 2120, FORBIDDEN_MESSAGE)


STATE_KEY = web.AppKey("state", EmulatorState)
CALLER_KEY = web.RequestKey("caller", Caller)


def caller(request: web.Request) -> Caller:
    return request[CALLER_KEY]
