"""AEP's error answers, and aiohttp's failures to get one, read into `exporter.errors` types.

Five shapes are in use (docs/aep-notes.md): the gateway's `{error_code, message}`, Flow
Service's problem document (`type` ending in `FLOW-<code>-<status>`, with `errorMessage`), the
older `{errorMessage, errorDetails}`, the ad hoc service's `{message}`, RFC 7807's
`{title, detail}` and IMS's OAuth `{error, error_description}`. The status picks the class,
the body the message and code.
"""

from __future__ import annotations

import email.utils
import json
import re
import socket
from collections.abc import Mapping
from typing import Any

import aiohttp
from yarl import URL

from exporter.errors import (
    AepError,
    AuthError,
    NotFoundError,
    PreconditionFailed,
    RequestError,
    ServerError,
    ThrottledError,
    TransportError,
)
from exporter.redaction import SECRETS

_FLOW_TYPE = re.compile(r"(FLOW-\d+-\d+)$")
_MAX_TEXT = 500


class ConnectError(TransportError):
    """No connection could be made: the request was never sent, so sending it again is safe."""


class TlsError(ConnectError):
    """The server's certificate could not be verified. Trying again will not help."""

    retryable = False


class DnsError(ConnectError):
    """The host name does not resolve. A name that does not exist will not start to (trying
    again only delays the answer); a resolver's "try again" (EAI_AGAIN) is retried."""

    retryable = False


def transport_error(exc: BaseException, *, operation: str, peer: str) -> TransportError:
    """aiohttp's exception (or a timeout) as ours; raise it `from exc`."""
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return TlsError(f"TLS verification of {peer} failed: {what}", operation=operation)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        error = DnsError(f"cannot resolve {peer}'s host name: {what}", operation=operation)
        error.retryable = exc.os_error.errno == socket.EAI_AGAIN
        return error
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ConnectError(f"cannot connect to {peer}: {what}", operation=operation)
    return TransportError(f"no answer from {peer}: {what}", operation=operation)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from `now` (epoch seconds): delta-seconds or an HTTP-date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a zone-less one is read the same way
        return None
    return max(0.0, when.timestamp() - now)


def decode_body(raw: bytes) -> Any:
    """JSON if the bytes are JSON, else the text (for messages), else None when empty."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return raw.decode("utf-8", errors="replace")


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def describe(body: Any) -> tuple[str, str | None]:
    """The human message and machine code of an error body, whichever envelope it uses, with
    every configured secret scrubbed: AEP's validation errors echo the rejected value."""
    message, code = _describe(body)
    return SECRETS.scrub(message), SECRETS.scrub(code) if code else code


def _describe(body: Any) -> tuple[str, str | None]:
    if isinstance(body, str):
        return body.strip()[:_MAX_TEXT] or "(empty answer)", None
    if not isinstance(body, Mapping):
        return "(no error body)", None
    if "error_code" in body:  # gateway
        return _text(body.get("message")) or "gateway error", str(body["error_code"])
    if "error" in body and "error_description" in body:  # IMS (OAuth)
        error = _text(body.get("error"))
        return f"{error}: {_text(body.get('error_description')) or ''}".strip(": "), error
    kind = _text(body.get("type")) or ""
    found = _FLOW_TYPE.search(kind)
    report = body.get("report")
    detailed = _text(report.get("detailed-message")) if isinstance(report, Mapping) else None
    message = (
        _text(body.get("errorMessage"))
        or detailed
        or _text(body.get("message"))
        or _text(body.get("detail"))
        or _text(body.get("title"))
    )
    code = found.group(1) if found else _text(body.get("title")) if "detail" in body else None
    return (message or json.dumps(body)[:_MAX_TEXT]), code


def error_for(
    status: int,
    body: Any,
    *,
    operation: str,
    retry_after: float | None = None,
) -> AepError:
    """The `AepError` subclass for an HTTP error answer."""
    message, code = describe(body)
    cls: type[AepError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 412:
        cls = PreconditionFailed
    elif status == 429:
        cls = ThrottledError
    elif status >= 500:
        cls = ServerError
    else:
        cls = RequestError
    return cls(message, status=status, code=code, operation=operation, retry_after=retry_after)


def redirect_refused(
    status: int, headers: Mapping[str, str], *, operation: str, peer: str
) -> RequestError:
    """A 3xx answer: redirects are never followed (a request body may carry secrets, and a
    redirect could send it to another origin). Only the target's origin is named."""
    location = URL(headers.get("Location", ""))
    where = f"{location.scheme}://{location.host}" if location.is_absolute() else "elsewhere"
    return RequestError(
        f"{peer} answered HTTP {status}, a redirect to {where}; redirects are not followed: "
        "check the configured URL",
        status=status,
        operation=operation,
    )
