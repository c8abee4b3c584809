"""The request pipeline: journal, faults, error envelopes, gateway checks.

Order matters (outermost first, see MIDDLEWARES): the journal sees the final status of every
request, injected faults included; errors from faults, the gateway and handlers all become
AEP-shaped envelopes, and anything unexpected a 500 with no traceback; faults hit platform
calls before the gateway checks them, as a congested edge would.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from aep_emulator.errors import EmulatorError, FlowError, GatewayError, ProblemError
from aep_emulator.gateway import CALLER_KEY, STATE_KEY, authenticate, authorize
from aep_emulator.state import EmulatorState, ScriptedFault

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTROL_PREFIX = "/_emulator"
PLATFORM_PREFIX = "/data/"

log = structlog.get_logger("aep_emulator")


def _op(request: web.Request) -> str:
    route = request.match_info.route
    return route.name or ("unknown" if route.resource is None else route.resource.canonical)


@web.middleware
async def journal_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    status = 599  # a dropped connection: no status was ever sent
    state.arrived()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        state.record(
            request.method,
            request.path,
            status,
            _op(request),
            request.headers.get("x-sandbox-name", "prod"),
            request.headers.get("x-request-id", ""),
        )


class Dropped(Exception):
    """The connection was closed on purpose, with no answer."""


def _drop(request: web.Request) -> web.StreamResponse:
    if request.transport is not None:
        request.transport.abort()
    raise Dropped


def _take_fault(state: EmulatorState, request: web.Request) -> ScriptedFault | None:
    op = _op(request)
    for fault in state.faults:
        if fault.matches(op, request.method, request.path):
            fault.count -= 1
            if fault.count <= 0:
                state.faults.remove(fault)
            return fault
    return None


def _retry_after(state: EmulatorState, wait: float) -> int | None:
    mode = state.knobs.retry_after
    if mode == "never" or (mode == "random" and state.rng.random() < 0.5):
        return None
    return max(1, math.ceil(wait))


def _rate_limited(state: EmulatorState, org: str) -> float:
    """Token bucket per org: 0 when a request may pass, else seconds until it could."""
    rps = state.knobs.rate_limit_rps
    if rps is None:
        return 0.0
    burst = state.knobs.rate_limit_burst or rps
    now = state.clock.base.monotonic()
    tokens, last = state.rate_buckets.get(org, (burst, now))
    tokens = min(burst, tokens + (now - last) * rps)
    if tokens >= 1:
        state.rate_buckets[org] = (tokens - 1, now)
        return 0.0
    state.rate_buckets[org] = (tokens, now)
    return (1 - tokens) / rps


def _throttle(state: EmulatorState, wait: float) -> GatewayError:
    return GatewayError(429, "429001", "Too many requests", retry_after=_retry_after(state, wait))


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(PLATFORM_PREFIX):
        return await handler(request)
    state = request.app[STATE_KEY]
    knobs, rng = state.knobs, state.rng
    fault = _take_fault(state, request)
    delay = knobs.latency_ms.draw(rng) / 1000
    if rng.random() < knobs.slow_rate:
        delay += knobs.slow_ms / 1000
    if fault is not None and fault.action == "delay":
        delay += fault.delay_ms / 1000
    if delay > 0:
        await asyncio.sleep(delay)
        if request.transport is None or request.transport.is_closing():
            # The client gave up while the call was held: like a gateway, never act on it.
            return _drop(request)
    if fault is not None and fault.action == "drop":
        return _drop(request)
    if fault is not None and fault.action == "status":
        if fault.status == 429:
            raise GatewayError(429, "429001", "Too many requests", retry_after=fault.retry_after)
        raise FlowError(
            fault.status,
            1102 if fault.status < 503 else 1103,
            "Injected fault: the service is temporarily unavailable",
        )
    wait = _rate_limited(state, request.headers.get("x-gw-ims-org-id", ""))
    if wait > 0:
        raise _throttle(state, wait)
    if rng.random() < knobs.error_429_rate:
        raise _throttle(state, 1.0)
    if rng.random() < knobs.error_5xx_rate:
        status = rng.choice((500, 502, 503, 504))
        raise FlowError(
            status,
            {500: 1102, 502: 1102, 503: 1103, 504: 1104}[status],
            "Injected fault: internal error, please retry",
        )
    drop_after = fault is not None and fault.action == "drop_after"
    if not drop_after and rng.random() < knobs.drop_rate:
        drop_after = rng.random() < 0.5
        if not drop_after:
            return _drop(request)
    response = await handler(request)
    if drop_after:
        return _drop(request)
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> EmulatorError:
    """aiohttp's own refusals (routing, body size) in AEP's envelopes."""
    if exc.status == 404:
        return FlowError(404, 1101, f"No API at {request.method} {request.path}")
    if exc.status == 405:
        return FlowError(405, 1100, f"Method {request.method} is not allowed on {request.path}")
    if exc.status == 413:
        return ProblemError(413, "PayloadTooLarge", "Request body is too large")
    return FlowError(exc.status, 1100, exc.reason)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    try:
        response = await handler(request)
    except EmulatorError as exc:
        return exc.response(request_id)
    except web.HTTPException as exc:
        if request.path.startswith(CONTROL_PREFIX) and exc.content_type == "application/json":
            raise  # the control API's own answers (ControlError, its JSON 404s)
        return _http_error(request, exc).response(request_id)
    except (Dropped, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("emulator_handler_failed", path=request.path, method=request.method)
        return FlowError(500, 1102, "Internal server error").response(request_id)
    response.headers["x-request-id"] = request_id
    return response


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PLATFORM_PREFIX):
        request[CALLER_KEY] = authenticate(request, request.app[STATE_KEY])
        authorize(request, request.app[STATE_KEY], _op(request))
    return await handler(request)


MIDDLEWARES = (journal_middleware, error_middleware, fault_middleware, gateway_middleware)
