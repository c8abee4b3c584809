"""AEP's error envelopes, as the emulator answers them.

Four shapes are in use at Adobe (docs/aep-notes.md): the gateway's `{error_code, message}` for
header and token problems, Flow Service's `FLOW-<code>-<status>` problem document, the ad hoc
service's `{message}`, and IMS's OAuth `{error, error_description}`. Handlers raise one of the
exceptions below; the error middleware renders it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_FLOW_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Resource not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable entity",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class EmulatorError(Exception):
    """An answer other than success. `body()` is the JSON the client receives."""

    status: int = 400

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self, request_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        return {}

    def response(self, request_id: str) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body(request_id)).encode(),
            content_type="application/json",
            headers={"x-request-id": request_id, **self.headers()},
        )


class GatewayError(EmulatorError):
    """Adobe I/O gateway: missing or bad token, API key or org header; throttling."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(status, message)
        self.code = code
        self.retry_after = retry_after

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error_code": self.code, "message": self.message}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class FlowError(EmulatorError):
    """Flow Service's problem document, e.g. `FLOW-1101-404`."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        entity_id: str | None = None,
        entity_type: str | None = None,
    ) -> None:
        super().__init__(status, message)
        self.code = code
        self.entity_id = entity_id
        self.entity_type = entity_type

    @property
    def error_type(self) -> str:
        return f"https://ns.adobe.com/aep/errors/FLOW-{self.code}-{self.status}"

    def body(self, request_id: str) -> dict[str, Any]:
        report: dict[str, Any] = {"detailed-message": self.message, "request-id": request_id}
        if self.entity_id is not None:
            report["id"] = self.entity_id
        if self.entity_type is not None:
            report["type"] = self.entity_type
        return {
            "type": self.error_type,
            "title": _FLOW_TITLES.get(self.status, "Error"),
            "status": self.status,
            "report": report,
            "errorMessage": self.message,
            "errorDetails": self.message,
        }


class AdhocError(EmulatorError):
    """The ad hoc activation service's `{message}` envelope."""

    def body(self, request_id: str) -> dict[str, Any]:
        return {"message": self.message}


class OAuthError(EmulatorError):
    """IMS token endpoint errors (RFC 6749 section 5.2)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(status, description)
        self.error = error

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.message}


class ProblemError(EmulatorError):
    """The platform's RFC 7807 answer for requests it cannot read (content type, body)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(status, detail)
        self.title = title

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "type": "http://ns.adobe.com/aep/errors/request",
            "status": self.status,
            "title": self.title,
            "detail": self.message,
        }


def not_found(entity_type: str, entity_id: str) -> FlowError:
    return FlowError(
        404,
        1101,
        f"{entity_type} not found with id = [{entity_id}]",
        entity_id=entity_id,
        entity_type=entity_type,
    )


def bad_request(code: int, message: str) -> FlowError:
    return FlowError(400, code, message)
