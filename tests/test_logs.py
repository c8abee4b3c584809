"""The log pipeline: tracebacks without frame locals, and redaction after rendering."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from pydantic import SecretStr

from exporter.destinations import AdlsGen2Destination
from exporter.logs import REDACTED, CurrentStderr, configure_logging

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


CONFIGURED = "cfg-Secret+value/9Kq2-logged-by-mistake"


@pytest.mark.parametrize("as_json", [True, False])
def test_configured_secret_values_are_scrubbed_anywhere_in_a_line(as_json: bool) -> None:
    """Under innocent keys, inside an exception's message and its rendered traceback, and in
    their base64 and URL-encoded forms: the values the settings registered."""
    AdlsGen2Destination(
        type="adls_gen2",
        url="https://mllake.dfs.core.windows.net",
        service_principal_id="sp",
        tenant="t",
        service_principal_key=SecretStr(CONFIGURED),
    )
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("info", json=as_json, stream=out)
    try:
        log = structlog.get_logger("test")
        encoded = base64.b64encode(CONFIGURED.encode()).decode()
        log.info("aep_answer", detail=f"value {CONFIGURED!r} is invalid", seen=[encoded])
        log.info("url", where="https://x.example/?k=" + quote(CONFIGURED, safe=""))
        try:
            raise ValueError(f"bad key {CONFIGURED}")
        except ValueError:
            log.exception("job_crashed")
    finally:
        structlog.configure(**saved)
    text = out.getvalue()
    assert "bad key [redacted]" in text  # the message is kept, the value is not
    for form in (CONFIGURED, encoded, quote(CONFIGURED, safe=""), quote(CONFIGURED)):
        assert form not in text


def test_events_asked_for_pass_below_the_level_and_the_others_do_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What `export` does on a terminal: warnings, plus the retries that explain a wait, in
    the readable renderer, written to whatever stderr is at the time (a spinner's proxy)."""
    saved = structlog.get_config()
    try:
        configure_logging("warning", json=False, stream=CurrentStderr(), also=("aep_token_retry",))
        log = structlog.get_logger("t")
        log.info("aep_token_retry", attempt=2, error="cannot connect to IMS")
        log.info("lane_created", flow_id="f")
        log.debug("aep_token_retry", attempt=0)  # `also` lowers the bar to info, not below
        log.warning("flow_disable_failed", flow_id="f")
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert "aep_token_retry" in err
    assert "attempt=2" in err
    assert "attempt=0" not in err
    assert "lane_created" not in err
    assert "flow_disable_failed" in err
