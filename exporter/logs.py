"""Logging: structlog, JSON lines when not on a terminal, readable on one; secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Collection, MutableMapping
from typing import Any, TextIO, cast

import structlog

from exporter.redaction import REDACTED as REDACTED  # tests and callers name it here
from exporter.redaction import SECRETS

SECRET_KEY = re.compile(
    r"secret|password|passwd|token|authorization|api[-_]?key|ssh[-_]?key|"
    r"connection[-_]?string|credential",
    re.IGNORECASE,
)
BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank values under secret-sounding keys, bearer tokens and the configured secret values
    (exporter/redaction.py) inside strings, at any depth (a rendered traceback is a list of
    frames of dicts)."""
    for key, value in list(event.items()):
        event[key] = _scrub(key, value)
    return event


def _scrub(key: str, value: Any) -> Any:
    if SECRET_KEY.search(key) and key not in ("event", "token_type"):
        return REDACTED
    if isinstance(value, str):
        value = BEARER.sub(r"\1" + REDACTED, value) if "Bearer" in value else value
        return SECRETS.scrub(value)
    if isinstance(value, MutableMapping):
        return {k: _scrub(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub("", v) for v in value]
    return value


# Tracebacks as data, without each frame's local variables: a frame's locals hold what the
# code was handling (a password being sent, an auth dict), under any name.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


class CurrentStderr:
    """Whatever `sys.stderr` is when a line is written: a live display (rich's spinner)
    swaps it for a proxy that prints above the spinner instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | CurrentStderr | None = None,
    also: Collection[str] = (),
) -> None:
    """Set up structlog once, at the edge. `json=None`: JSON unless `stream` is a terminal.
    `also`: events shown even below `level` (`export` on a terminal shows its retries)."""
    out = stream or sys.stderr
    as_json = not out.isatty() if json is None else json
    threshold = logging.getLevelNamesMapping()[level.upper()]

    def only_wanted(_: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        below = logging.getLevelNamesMapping()[method.upper()] < threshold
        if below and event.get("event") not in also:
            raise structlog.DropEvent
        return event

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            *([only_wanted] if also else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _TRACEBACKS if as_json else structlog.processors.format_exc_info,
            redact,  # after the traceback is rendered: its text is searched too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            min(threshold, logging.INFO) if also else threshold
        ),
        logger_factory=structlog.PrintLoggerFactory(cast("TextIO", out)),  # (a duck: ok)
        cache_logger_on_first_use=False,
    )
