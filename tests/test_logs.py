"""The log pipeline: tracebacks without frame locals, and redaction after rendering."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from exporter.logs import REDACTED, configure_logging

SECRET = "hunter2-Zq8x-very-secret"


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """JSON log lines written to a buffer; structlog's configuration restored after."""
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    yield out
    structlog.configure(**saved)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def connect(auth_args: tuple[str, str]) -> None:
    password = auth_args[1]  # a local under an innocent and under a telling name
    raise ConnectionError(f"cannot connect as {auth_args[0]} ({len(password)} chars)")


def test_a_rendered_traceback_carries_no_frame_locals(logged: io.StringIO) -> None:
    log = structlog.get_logger("test")
    try:
        connect(("ml", SECRET))
    except ConnectionError:
        log.exception("redis_connect_failed")
    (line,) = lines(logged)
    assert SECRET not in logged.getvalue()
    frames = line["exception"][0]["frames"]
    assert [f["name"] for f in frames][-1] == "connect"  # the traceback is there
    assert all("locals" not in frame for frame in frames)


def test_redaction_reaches_into_nested_values_after_rendering(logged: io.StringIO) -> None:
    log = structlog.get_logger("test")
    log.info(
        "request_failed",
        body={"auth": {"params": {"password": SECRET, "domain": "sftp.example.com"}}},
        headers=[{"Authorization": f"Bearer {SECRET}"}, f"Bearer {SECRET}"],
    )
    (line,) = lines(logged)
    assert SECRET not in logged.getvalue()
    assert line["body"]["auth"]["params"] == {"password": REDACTED, "domain": "sftp.example.com"}
    assert line["headers"] == [{"Authorization": REDACTED}, f"Bearer {REDACTED}"]
