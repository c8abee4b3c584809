"""Reading AEP's answers: error envelopes, Retry-After, the ad hoc service's phrases and run
ids, and list filters that survive the filter language."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from aep_emulator.query import parse_list_query
from exporter.aep.adhoc import refusal, run_id_of
from exporter.aep.envelopes import error_for, parse_retry_after
from exporter.aep.facts import NOT_READY_MESSAGE
from exporter.aep.listing import id_batches, name_filters, next_target
from exporter.errors import (
    AdhocError,
    AdhocNotEnabled,
    AuthError,
    FlowDisabled,
    NotAMember,
    NotFoundError,
    NotReadyError,
    PreconditionFailed,
    RequestError,
    RunInProgress,
    ServerError,
    ThrottledError,
)

FLOW_404 = {
    "type": "https://ns.adobe.com/aep/errors/FLOW-1101-404",
    "title": "Resource not found",
    "status": 404,
    "report": {"detailed-message": "flows not found with id = [x]", "request-id": "r"},
    "errorMessage": "flows not found with id = [x]",
}


@pytest.mark.parametrize(
    ("status", "body", "cls", "message", "code"),
    [
        (401, {"error_code": "401013", "message": "Oauth token is not valid"}, AuthError,
         "Oauth token is not valid", "401013"),
        (404, FLOW_404, NotFoundError, "flows not found with id = [x]", "FLOW-1101-404"),
        (412, {"errorMessage": "Supplied version=[a] does not match", "errorDetails": "d"},
         PreconditionFailed, "Supplied version=[a] does not match", None),
        (400, {"message": "Invalid parameter: no"}, RequestError, "Invalid parameter: no", None),
        (400, {"type": "t", "status": 400, "title": "BadRequestError",
               "detail": "A valid content-type must be specified"}, RequestError,
         "A valid content-type must be specified", "BadRequestError"),
        (429, {"error_code": "429001", "message": "Too many requests"}, ThrottledError,
         "Too many requests", "429001"),
        (503, "<html>upstream down</html>", ServerError, "<html>upstream down</html>", None),
        (502, None, ServerError, "(no error body)", None),
    ],
)  # fmt: skip
def test_each_envelope_maps_to_its_error(
    status: int, body: Any, cls: type, message: str, code: str | None
) -> None:
    error = error_for(status, body, operation="flows.get", retry_after=3)
    assert type(error) is cls
    assert (error.message, error.code, error.status, error.operation) == (
        message,
        code,
        status,
        "flows.get",
    )
    assert error.retryable == (status in (412, 429) or status >= 500)
    assert str(error).startswith("flows.get: ")


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = 1_767_225_600.0
    later = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after(later, now) == 90
    assert parse_retry_after("-3", now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def adhoc(text: str) -> RequestError:
    return RequestError(text, status=400, operation="adhoc.run")


def test_adhoc_refusals_become_the_errors_the_engine_acts_on() -> None:
    ready = refusal(adhoc(NOT_READY_MESSAGE), "f1")
    assert isinstance(ready, NotReadyError)
    assert ready.retryable
    assert ready.retry_after == 600
    off = refusal(
        adhoc(
            "Invalid parameter: Flow for id f1 is incorrect. Error is "
            "[Adhoc run can not be executed for Flow spec=269ba276-16fc-47db-92b0-c1049a3c131f."
        ),
        "f1",
    )
    assert isinstance(off, AdhocNotEnabled)
    assert not off.retryable
    assert "dataset export is not enabled" in off.message
    assert "269ba276-16fc-47db-92b0-c1049a3c131f" in off.message
    for text in (
        "Invalid parameter: Run already going on for dataset d1 for order f1 with run id r-42",
        "run ALREADY going on for segment s for order f1 with run id: [r-42]",
    ):
        busy = refusal(adhoc(text), "f1")
        assert isinstance(busy, RunInProgress)
        assert busy.run_id == "r-42"
    unnamed = refusal(adhoc("Run already going on for dataset d1"), "f1")
    assert isinstance(unnamed, RunInProgress)
    assert unnamed.run_id == ""
    disabled = refusal(adhoc("Invalid parameter: Flow is disabled."), "f1")
    assert type(disabled) is FlowDisabled
    outsider = refusal(adhoc("Invalid parameter: Dataset d9 is not part of flow f1."), "f1")
    assert isinstance(outsider, NotAMember)
    assert outsider.dataset_id == "d9"
    busy = refusal(
        adhoc("Invalid parameter: Run already going on for dataset d7 for order f1 with run id r1"),
        "f1",
    )
    assert isinstance(busy, RunInProgress)
    assert (busy.dataset_id, busy.run_id) == ("d7", "r1")
    other = refusal(adhoc("Invalid parameter: something else entirely."), "f1")
    assert type(other) is AdhocError
    assert not other.retryable


def test_run_id_is_the_last_segment_of_the_status_url() -> None:
    body = {
        "destinations": [
            {
                "datasets": [
                    {"id": "other", "flowId": "f", "statusURL": "https://p/runs/wrong"},
                    {"id": "d", "flowId": "f", "statusURL": "https://p/data/runs/r-1/?x=1"},
                ]
            }
        ]
    }
    assert run_id_of(body, "f", "d") == "r-1"
    assert run_id_of({"destinations": [{"datasets": [{"id": "d"}]}]}, "f", "d") is None
    assert run_id_of("not json", "f", "d") is None


NAMES = ["plain", "a,b", ",lead", "=eq", "x+y &z=1#%/?", "ünï code", "a,b,c", "!bang,x", "<lt"]


@pytest.mark.parametrize("name", NAMES)
def test_name_filters_select_the_name_in_the_filter_language(name: str) -> None:
    query = parse_list_query(name_filters(name))  # the emulator's parser: AEP's language
    entities = [{"id": str(i), "name": n, "createdAt": i} for i, n in enumerate(NAMES)]
    matched = [e["name"] for e in entities if query.matches(e)]
    assert name in matched
    if "," not in name and name[0] not in "=!<>~":
        assert matched == [name]


def test_ids_are_batched_by_one_hundred_without_duplicates_or_unusable_ids() -> None:
    ids = [f"id-{i}" for i in range(250)] + ["id-3", "", "a,b", "=x"]
    batches = id_batches(ids)
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [i for batch in batches for i in batch] == [f"id-{i}" for i in range(250)]


def test_next_links_stay_on_the_platform_under_flow_service() -> None:
    base = "/data/foundation/flowservice"
    assert next_target("/flows?continuationToken=abc") == f"{base}/flows?continuationToken=abc"
    assert next_target(f"{base}/runs?continuationToken=a%2Bb&property=id==x") == (
        f"{base}/runs?continuationToken=a%2Bb&property=id==x"
    )
    assert next_target("https://evil.example/data/x/runs?t=1") == "/data/x/runs?t=1"
