"""Every fault knob through real HTTP, and the emulator's control API.

Time is the fake clock's: the rate limiter's buckets fill as `emulator.clock.advance` moves it,
so a 429 storm is just requests sent without advancing time. Latency is observed by recording
the middleware's sleeps rather than timing them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from aep_emulator import middleware
from aep_emulator.settings import DEFAULT_CLIENT_ID, Knobs
from exporter.aep.facts import FLOW_SERVICE_PATH, StorageType
from tests.conftest import EMULATOR_SECRET, Answer, Emulator, default_knobs
from tests.workflow import base_connection, flow, source_connection, target_connection

CONNECTION_SPECS = "/connectionSpecs"


def gateway_429(answer: Answer) -> None:
    assert answer.status == 429, answer.body
    assert answer.body == {"error_code": "429001", "message": "Too many requests"}


def flow_error(answer: Answer, status: int, code: int) -> None:
    assert answer.status == status, answer.body
    assert answer.body["type"] == f"https://ns.adobe.com/aep/errors/FLOW-{code}-{status}"
    assert answer.body["status"] == status
    assert answer.body["report"]["detailed-message"]


async def created(emulator: Emulator, path: str, body: dict[str, Any]) -> str:
    made = await emulator.fs("POST", path, json_body=body)
    assert made.status == 201, made.body
    return str(made.body["id"])


async def flow_parts(emulator: Emulator) -> tuple[str, str]:
    """A DLZ source and target connection, ready for a flow."""
    (dataset,) = await emulator.seed(rows=3)
    base = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(StorageType.DLZ, base))
    return source, target


async def patch_knobs(emulator: Emulator, **changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await emulator.control("PATCH", "/config", changes)
    return answer


async def add_fault(emulator: Emulator, **fault: Any) -> None:
    await emulator.control("POST", "/faults", fault)


async def journal(emulator: Emulator, query: str = "") -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (await emulator.control("GET", f"/journal{query}"))["entries"]
    return entries


async def post_dropped(emulator: Emulator, path: str, body: dict[str, Any]) -> None:
    """POST (never retried by aiohttp) and expect the connection to be cut with no answer."""
    with pytest.raises(aiohttp.ClientConnectionError):
        await emulator.fs("POST", path, json_body=body)


# -- rate limiting ------------------------------------------------------------------------------


@pytest.fixture
def knobs(request: pytest.FixtureRequest) -> Knobs:
    changes: dict[str, Any] = getattr(request, "param", {})
    return default_knobs(**changes)


LIMITED = {"rate_limit_rps": 0.5, "rate_limit_burst": 3}


@pytest.mark.parametrize("knobs", [LIMITED], indirect=True)
async def test_a_burst_passes_then_429_with_a_retry_after_that_matches_the_bucket(
    emulator: Emulator,
) -> None:
    await emulator.token()  # IMS is not rate limited, and not counted
    for _ in range(3):
        assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    storm = [await emulator.fs("GET", CONNECTION_SPECS) for _ in range(5)]
    for answer in storm:
        gateway_429(answer)
        # An empty bucket refills one token in 1 / 0.5 = 2 s.
        assert answer.headers["Retry-After"] == "2"
    await emulator.clock.advance(1.9)
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))
    await emulator.clock.advance(0.1)
    assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))


@pytest.mark.parametrize("knobs", [LIMITED], indirect=True)
async def test_retry_after_counts_the_part_of_a_token_already_refilled(
    emulator: Emulator,
) -> None:
    for _ in range(3):
        assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    await emulator.clock.advance(1.5)  # 0.75 of a token back: 0.5 s to go, rounded up to 1
    answer = await emulator.fs("GET", CONNECTION_SPECS)
    gateway_429(answer)
    assert answer.headers["Retry-After"] == "1"


@pytest.mark.parametrize("knobs", [LIMITED], indirect=True)
async def test_the_bucket_refills_up_to_the_burst_only(emulator: Emulator) -> None:
    await emulator.clock.advance(3_600)
    for _ in range(3):
        assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))


@pytest.mark.parametrize("knobs", [{"rate_limit_rps": 1}], indirect=True)
async def test_the_burst_defaults_to_the_rate(emulator: Emulator) -> None:
    assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))


@pytest.mark.parametrize("knobs", [{**LIMITED, "retry_after": "never"}], indirect=True)
async def test_retry_after_never_leaves_the_header_out(emulator: Emulator) -> None:
    for _ in range(3):
        await emulator.fs("GET", CONNECTION_SPECS)
    answer = await emulator.fs("GET", CONNECTION_SPECS)
    gateway_429(answer)
    assert "Retry-After" not in answer.headers


@pytest.mark.parametrize("knobs", [{**LIMITED, "retry_after": "random"}], indirect=True)
async def test_retry_after_random_sometimes_sends_it(emulator: Emulator) -> None:
    for _ in range(3):
        await emulator.fs("GET", CONNECTION_SPECS)
    storm = [await emulator.fs("GET", CONNECTION_SPECS) for _ in range(40)]
    sent = [a.headers.get("Retry-After") for a in storm]
    assert all(a.status == 429 for a in storm)
    assert None in sent
    assert "2" in sent
    assert set(sent) == {None, "2"}


@pytest.mark.parametrize("knobs", [{"rate_limit_rps": 1, "rate_limit_burst": 2}], indirect=True)
async def test_buckets_are_per_org(emulator: Emulator) -> None:
    for _ in range(2):
        assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))
    # Another org has its own bucket: it passes the limiter and meets the gateway's check.
    other = await emulator.fs(
        "GET", CONNECTION_SPECS, headers={"x-gw-ims-org-id": "OTHER0000000000000000@AdobeOrg"}
    )
    assert other.status == 403
    assert other.body["error_code"] == "403025"


@pytest.mark.parametrize("knobs", [{"rate_limit_rps": 1, "rate_limit_burst": 1}], indirect=True)
async def test_the_control_api_and_ims_are_never_throttled(emulator: Emulator) -> None:
    for _ in range(5):
        await emulator.control("GET", "/health")
        answer = await emulator.request(
            "POST",
            "/ims/token/v3",
            form={
                "grant_type": "client_credentials",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": EMULATOR_SECRET,
                "scope": "openid",
            },
            auth=False,
        )
        assert answer.status == 200


async def test_the_rate_limit_can_be_switched_on_and_off_at_run_time(emulator: Emulator) -> None:
    for _ in range(5):
        assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    await patch_knobs(emulator, rate_limit_rps=1, rate_limit_burst=1)
    assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    gateway_429(await emulator.fs("GET", CONNECTION_SPECS))
    await patch_knobs(emulator, rate_limit_rps=None)
    assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200


# -- random faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{"error_429_rate": 1}], indirect=True)
async def test_error_429_rate_one_throttles_every_platform_call(emulator: Emulator) -> None:
    for method, path in (("GET", "/flows"), ("GET", "/runs"), ("POST", "/connections")):
        answer = await emulator.fs(method, path, json_body={})
        gateway_429(answer)
        assert answer.headers["Retry-After"] == "1"
    entries = await journal(emulator)
    assert [(e["op"], e["status"]) for e in entries] == [
        ("ims.token", 200),  # IMS is journaled, and never faulted
        ("flows.list", 429),
        ("runs.list", 429),
        ("connections.create", 429),
    ]


@pytest.mark.parametrize("knobs", [{"error_5xx_rate": 1}], indirect=True)
async def test_error_5xx_rate_one_answers_server_errors_in_the_flow_envelope(
    emulator: Emulator,
) -> None:
    codes = {500: 1102, 502: 1102, 503: 1103, 504: 1104}
    seen = set()
    for _ in range(30):
        answer = await emulator.fs(
            "POST", "/connections", json_body=base_connection(StorageType.DLZ)
        )
        assert answer.status in codes, answer.body
        flow_error(answer, answer.status, codes[answer.status])
        seen.add(answer.status)
    assert len(seen) >= 3  # drawn, not fixed
    # The faults hit before the handler: nothing was created.
    await patch_knobs(emulator, error_5xx_rate=0)
    assert (await emulator.fs("GET", "/connections")).body["items"] == []


@pytest.mark.parametrize("knobs", [{"error_5xx_rate": 0.5, "seed": 99}], indirect=True)
async def test_a_fractional_rate_mixes_faults_and_answers(emulator: Emulator) -> None:
    statuses = [(await emulator.fs("GET", CONNECTION_SPECS)).status for _ in range(40)]
    assert 200 in statuses
    assert any(s >= 500 for s in statuses)
    assert set(statuses) <= {200, 500, 502, 503, 504}


@pytest.mark.parametrize("knobs", [{"drop_rate": 1}], indirect=True)
async def test_drop_rate_one_cuts_every_connection_and_journals_599(emulator: Emulator) -> None:
    for _ in range(4):
        await post_dropped(emulator, "/connections", base_connection(StorageType.DLZ))
    entries = await journal(emulator, "?op=connections.create")
    assert [e["status"] for e in entries] == [599] * 4
    # The emulator itself is fine.
    await patch_knobs(emulator, drop_rate=0)
    assert (await emulator.fs("GET", "/connections")).status == 200


# -- scripted faults ----------------------------------------------------------------------------


async def test_a_drop_after_processing_loses_the_create_response_but_not_the_flow(
    emulator: Emulator,
) -> None:
    source, target = await flow_parts(emulator)
    await add_fault(emulator, action="drop_after", op="flows.create")
    body = flow(StorageType.DLZ, source, target, name="lost-response")
    await post_dropped(emulator, "/flows", body)
    found = await emulator.fs("GET", "/flows", params={"property": "name==lost-response"})
    assert found.status == 200
    (item,) = found.body["items"]
    assert item["name"] == "lost-response"
    assert (await journal(emulator, "?op=flows.create"))[-1]["status"] == 599
    # The fault was used up: the next create is answered.
    again = await emulator.fs("POST", "/flows", json_body={**body, "name": "answered"})
    assert again.status == 201, again.body


async def test_a_drop_before_processing_creates_nothing(emulator: Emulator) -> None:
    source, target = await flow_parts(emulator)
    await add_fault(emulator, action="drop", op="flows.create")
    await post_dropped(emulator, "/flows", flow(StorageType.DLZ, source, target, name="dropped"))
    assert (await emulator.fs("GET", "/flows")).body["items"] == []


async def test_a_status_fault_hits_exactly_count_matching_requests(emulator: Emulator) -> None:
    await add_fault(emulator, action="status", status=503, op="connections.list", count=2)
    assert (await emulator.control("GET", "/faults"))["faults"][0]["count"] == 2
    # Requests to other operations pass and do not use the fault up.
    assert (await emulator.fs("GET", "/flows")).status == 200
    assert (await emulator.fs("GET", CONNECTION_SPECS)).status == 200
    flow_error(await emulator.fs("GET", "/connections"), 503, 1103)
    assert (await emulator.control("GET", "/faults"))["faults"][0]["count"] == 1
    flow_error(await emulator.fs("GET", "/connections"), 503, 1103)
    assert (await emulator.control("GET", "/faults"))["faults"] == []
    assert (await emulator.fs("GET", "/connections")).status == 200


async def test_a_scripted_429_sends_the_retry_after_it_was_given(emulator: Emulator) -> None:
    await add_fault(emulator, action="status", status=429, retry_after=7, op="flows.list")
    answer = await emulator.fs("GET", "/flows")
    gateway_429(answer)
    assert answer.headers["Retry-After"] == "7"
    await add_fault(emulator, action="status", status=429, op="flows.list")
    answer = await emulator.fs("GET", "/flows")
    gateway_429(answer)
    assert "Retry-After" not in answer.headers


@pytest.mark.parametrize(("status", "code"), [(500, 1102), (502, 1102), (503, 1103)])
async def test_scripted_server_errors_use_the_flow_envelope(
    emulator: Emulator, status: int, code: int
) -> None:
    await add_fault(emulator, action="status", status=status)
    flow_error(await emulator.fs("GET", "/flows"), status, code)
    assert (await emulator.fs("GET", "/flows")).status == 200


async def test_faults_match_on_method_and_path_prefix(emulator: Emulator) -> None:
    await add_fault(
        emulator,
        action="status",
        status=500,
        method="delete",
        path_prefix=f"{FLOW_SERVICE_PATH}/connections/",
        count=5,
    )
    assert (await emulator.fs("GET", "/connections")).status == 200  # method differs
    flow_error(await emulator.fs("GET", "/connections/abc"), 404, 1101)  # method differs
    flow_error(await emulator.fs("DELETE", "/flows/abc"), 404, 1101)  # path differs
    flow_error(await emulator.fs("DELETE", "/connections/abc"), 500, 1102)
    assert (await emulator.control("GET", "/faults"))["faults"][0]["count"] == 4


async def test_faults_only_hit_platform_calls(emulator: Emulator) -> None:
    await add_fault(emulator, action="status", status=503, count=1)
    await emulator.token()  # IMS passes
    await emulator.control("GET", "/health")  # so does the control API
    flow_error(await emulator.fs("GET", "/flows"), 503, 1103)


async def test_faults_come_before_the_gateway(emulator: Emulator) -> None:
    # A congested edge answers before looking at credentials.
    await add_fault(emulator, action="status", status=503)
    answer = await emulator.fs("GET", "/flows", auth=False)
    flow_error(answer, 503, 1103)
    assert (await emulator.fs("GET", "/flows", auth=False)).status == 403


async def test_faults_are_tried_in_the_order_they_were_added(emulator: Emulator) -> None:
    await add_fault(emulator, action="status", status=502, op="flows.list")
    await add_fault(emulator, action="status", status=504, op="flows.list")
    flow_error(await emulator.fs("GET", "/flows"), 502, 1102)
    flow_error(await emulator.fs("GET", "/flows"), 504, 1103)
    assert (await emulator.fs("GET", "/flows")).status == 200


async def test_faults_can_be_cleared(emulator: Emulator) -> None:
    await add_fault(emulator, action="status", status=503, count=100)
    assert await emulator.control("DELETE", "/faults") == {"faults": 0}
    assert (await emulator.fs("GET", "/flows")).status == 200


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"action": "explode"},
        {"action": "status", "count": "many"},
        {"action": "status", "status": "five hundred"},
        {"action": "drop", "unknown": 1},
    ],
)
async def test_invalid_faults_are_refused(emulator: Emulator, fault: dict[str, Any]) -> None:
    async with emulator.session.post(f"{emulator.url}/_emulator/faults", json=fault) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] == "invalid fault"
    assert body["details"]
    assert (await emulator.control("GET", "/faults"))["faults"] == []


# -- latency ------------------------------------------------------------------------------------


class SleepRecorder:
    """Stands in for the middleware's `asyncio`: records sleeps instead of taking them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> SleepRecorder:
    recorder = SleepRecorder()
    monkeypatch.setattr(middleware, "asyncio", recorder)
    return recorder


async def test_no_latency_by_default(emulator: Emulator, sleeps: SleepRecorder) -> None:
    for _ in range(3):
        assert (await emulator.fs("GET", "/flows")).status == 200
    assert sleeps.delays == []


@pytest.mark.parametrize("knobs", [{"latency_ms": {"min": 20, "max": 20}}], indirect=True)
async def test_a_fixed_latency_delays_every_platform_call(
    emulator: Emulator, sleeps: SleepRecorder
) -> None:
    await emulator.token()
    await emulator.control("GET", "/health")
    assert sleeps.delays == []  # IMS and the control API are not delayed
    for _ in range(3):
        assert (await emulator.fs("GET", "/flows")).status == 200
    assert sleeps.delays == [0.02, 0.02, 0.02]


@pytest.mark.parametrize("knobs", [{"latency_ms": {"min": 10, "max": 30}}], indirect=True)
async def test_a_latency_span_is_drawn_per_request(
    emulator: Emulator, sleeps: SleepRecorder
) -> None:
    for _ in range(20):
        await emulator.fs("GET", "/flows")
    assert len(sleeps.delays) == 20
    assert all(0.01 <= d <= 0.03 for d in sleeps.delays)
    assert len(set(sleeps.delays)) > 10


@pytest.mark.parametrize("knobs", [{"slow_rate": 1, "slow_ms": 250}], indirect=True)
async def test_slow_rate_one_slows_every_call_by_slow_ms(
    emulator: Emulator, sleeps: SleepRecorder
) -> None:
    await emulator.fs("GET", "/flows")
    await emulator.fs("POST", "/connections", json_body={})
    assert sleeps.delays == [0.25, 0.25]


@pytest.mark.parametrize("knobs", [{"slow_rate": 0.5, "slow_ms": 100}], indirect=True)
async def test_slow_rate_slows_some_calls(emulator: Emulator, sleeps: SleepRecorder) -> None:
    for _ in range(40):
        await emulator.fs("GET", "/flows")
    assert 0 < len(sleeps.delays) < 40
    assert set(sleeps.delays) == {0.1}


@pytest.mark.parametrize("knobs", [{"latency_ms": {"min": 5, "max": 5}}], indirect=True)
async def test_a_delay_fault_adds_to_the_latency(emulator: Emulator, sleeps: SleepRecorder) -> None:
    await add_fault(emulator, action="delay", delay_ms=40, op="flows.list")
    assert (await emulator.fs("GET", "/flows")).status == 200
    assert (await emulator.fs("GET", "/flows")).status == 200
    assert sleeps.delays == pytest.approx([0.045, 0.005])


@pytest.mark.parametrize("knobs", [{"latency_ms": {"min": 20, "max": 20}}], indirect=True)
async def test_latency_really_waits(emulator: Emulator) -> None:
    await emulator.headers()  # the token, fetched undelayed
    started = time.monotonic()
    assert (await emulator.fs("GET", "/flows")).status == 200
    # A lower bound only, with a margin for clock granularity: this cannot flake.
    assert time.monotonic() - started >= 0.019


# -- token lifetime -----------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{"token_lifetime_s": 30}], indirect=True)
async def test_the_token_lifetime_knob(emulator: Emulator) -> None:
    headers = await emulator.headers()
    await emulator.clock.advance(29.5)
    assert (await emulator.fs("GET", "/flows", auth=False, headers=headers)).status == 200
    await emulator.clock.advance(0.5)
    answer = await emulator.fs("GET", "/flows", auth=False, headers=headers)
    assert answer.status == 401
    assert answer.body["error_code"] == "401013"


async def test_the_control_clock_also_expires_tokens(emulator: Emulator) -> None:
    headers = await emulator.headers()
    await emulator.control("POST", "/clock", {"advance": emulator.knobs.token_lifetime_s})
    answer = await emulator.fs("GET", "/flows", auth=False, headers=headers)
    assert answer.status == 401


# -- control API --------------------------------------------------------------------------------


@dataclass
class ControlAnswer:
    status: int
    body: Any
    text: str


async def control_raw(
    emulator: Emulator, method: str, path: str, body: Any = None
) -> ControlAnswer:
    """A control API call whatever its status (`emulator.control` insists on success)."""
    async with emulator.session.request(
        method, f"{emulator.url}/_emulator{path}", json=body
    ) as resp:
        text = await resp.text()
        return ControlAnswer(resp.status, json.loads(text), text)


async def test_config_shows_every_knob_but_the_secret(emulator: Emulator) -> None:
    config = await emulator.control("GET", "/config")
    assert "client_secret" not in config
    assert set(config) == set(Knobs.model_fields) - {"client_secret"}
    assert config["client_id"] == DEFAULT_CLIENT_ID
    assert config["not_ready_window_s"] == 60
    assert config["run_duration_s"] == {"min": 5.0, "max": 5.0}


async def test_patching_the_config_changes_knobs_and_keeps_the_rest(emulator: Emulator) -> None:
    answer = await patch_knobs(emulator, error_429_rate=0.25, latency_ms={"min": 1, "max": 2})
    assert answer["error_429_rate"] == 0.25
    assert answer["latency_ms"] == {"min": 1.0, "max": 2.0}
    assert answer["not_ready_window_s"] == 60
    assert emulator.knobs.error_429_rate == 0.25
    assert (await emulator.control("GET", "/config")) == answer


async def test_a_new_secret_is_used_but_never_shown(emulator: Emulator) -> None:
    answer = await control_raw(emulator, "PATCH", "/config", {"client_secret": "rotated-secret"})
    assert answer.status == 200
    assert "rotated-secret" not in answer.text
    assert "client_secret" not in answer.body
    form = {
        "grant_type": "client_credentials",
        "client_id": DEFAULT_CLIENT_ID,
        "scope": "openid",
    }
    old = await emulator.request(
        "POST", "/ims/token/v3", form={**form, "client_secret": EMULATOR_SECRET}, auth=False
    )
    assert old.status == 401
    new = await emulator.request(
        "POST", "/ims/token/v3", form={**form, "client_secret": "rotated-secret"}, auth=False
    )
    assert new.status == 200


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"error_5xx_rate": -0.1}, "error_5xx_rate"),
        ({"retry_after": "sometimes"}, "retry_after"),
        ({"rate_limit_rps": 0}, "rate_limit_rps"),
        ({"latency_ms": {"min": 10, "max": 1}}, "latency_ms"),
        ({"latency_ms": "fast"}, "latency_ms"),
        ({"max_body_bytes": "big"}, "max_body_bytes"),
        ({"no_such_knob": 1}, "no_such_knob"),
        ({"client_secret": 12345}, "client_secret"),
    ],
)
async def test_invalid_knob_values_are_refused_with_details(
    emulator: Emulator, changes: dict[str, Any], field: str
) -> None:
    before = await emulator.control("GET", "/config")
    answer = await control_raw(emulator, "PATCH", "/config", changes)
    assert answer.status == 400, answer.body
    assert answer.body["error"] == "invalid knob values"
    assert any(field in map(str, d["loc"]) for d in answer.body["details"]), answer.body
    assert EMULATOR_SECRET not in answer.text
    assert (await emulator.control("GET", "/config")) == before


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 50_000])
async def test_unreadable_control_bodies_are_refused(emulator: Emulator, body: bytes) -> None:
    async with emulator.session.patch(
        f"{emulator.url}/_emulator/config",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()


async def test_the_journal_records_method_path_status_and_op(emulator: Emulator) -> None:
    started_ms = int(emulator.clock.time() * 1000)
    await emulator.fs("GET", "/flows")
    await emulator.clock.advance(2)
    await emulator.fs("GET", "/flows/nope", sandbox="dev")
    await emulator.fs("POST", "/connections", json_body={"name": 1})
    await emulator.control("GET", "/health")  # the control API is not journaled
    entries = await journal(emulator)
    assert [(e["method"], e["path"], e["status"], e["op"], e["sandbox"]) for e in entries] == [
        ("POST", "/ims/token/v3", 200, "ims.token", "prod"),
        ("GET", f"{FLOW_SERVICE_PATH}/flows", 200, "flows.list", "prod"),
        ("GET", f"{FLOW_SERVICE_PATH}/flows/nope", 404, "flows.get", "dev"),
        ("POST", f"{FLOW_SERVICE_PATH}/connections", 400, "connections.create", "prod"),
    ]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert [e["time_ms"] - started_ms for e in entries] == [0, 0, 2_000, 2_000]


async def test_the_journal_since_and_op_filters(emulator: Emulator) -> None:
    await emulator.token()  # seq 1
    for _ in range(3):
        await emulator.fs("GET", "/flows")  # seq 2, 3, 4
    await emulator.fs("GET", "/connections")  # seq 5
    answer = await emulator.control("GET", "/journal?since=3")
    assert [e["seq"] for e in answer["entries"]] == [4, 5]
    assert answer["last_seq"] == 5
    assert (await emulator.control("GET", "/journal?since=5"))["entries"] == []
    flows = await journal(emulator, "?op=flows.list&since=2")
    assert [e["seq"] for e in flows] == [3, 4]
    bad = await control_raw(emulator, "GET", "/journal?since=yesterday")
    assert bad.status == 400
    assert bad.body["error"] == "since must be an integer"


@pytest.mark.parametrize("knobs", [{"journal_size": 3}], indirect=True)
async def test_the_journal_keeps_the_last_journal_size_entries(emulator: Emulator) -> None:
    for _ in range(5):
        await emulator.fs("GET", "/flows")  # after the token: seq 2..6
    answer = await emulator.control("GET", "/journal")
    assert [e["seq"] for e in answer["entries"]] == [4, 5, 6]
    assert answer["last_seq"] == 6
    await patch_knobs(emulator, journal_size=2)
    assert [e["seq"] for e in await journal(emulator)] == [5, 6]


async def test_stats_count_requests_by_op_and_status(emulator: Emulator) -> None:
    await emulator.fs("GET", "/flows")
    await emulator.fs("GET", "/flows")
    await emulator.fs("GET", "/flows/nope")
    await emulator.fs("GET", "/nothing-here")
    await add_fault(emulator, action="status", status=503, op="flows.list")
    await emulator.fs("GET", "/flows")
    stats = await emulator.control("GET", "/stats")
    assert stats == {
        "ops": {
            "ims.token": {"200": 1},
            "flows.list": {"200": 2, "503": 1},
            "flows.get": {"404": 1},
            "unknown": {"404": 1},
        },
        "requests": 6,
    }


async def test_reset_forgets_entities_tokens_faults_and_the_journal(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed(rows=2)
    await created(emulator, "/connections", base_connection(StorageType.DLZ))
    await add_fault(emulator, action="status", status=503, op="runs.list")
    old_headers = await emulator.headers()
    assert await emulator.control("POST", "/reset") == {"reset": True}
    assert await journal(emulator) == []
    assert (await emulator.control("GET", "/faults"))["faults"] == []
    assert (await emulator.fs("GET", "/flows", auth=False, headers=old_headers)).status == 401
    emulator._token = None  # the old one was forgotten
    assert (await emulator.fs("GET", "/connections")).body["items"] == []
    assert (await emulator.fs("GET", "/runs")).status == 200  # the fault is gone
    # Datasets survive a plain reset, and go with `datasets: true`.
    assert emulator.state.lake.get("prod", dataset) is not None
    await emulator.control("POST", "/reset", {"datasets": True})
    assert emulator.state.lake.get("prod", dataset) is None


async def test_the_clock_can_be_read_and_advanced(emulator: Emulator) -> None:
    start = await emulator.control("GET", "/clock")
    assert start == {"now": emulator.clock.time(), "offset": 0.0}
    moved = await emulator.control("POST", "/clock", {"advance": 90})
    assert moved == {"now": start["now"] + 90, "offset": 90.0}
    assert (await emulator.control("GET", "/clock")) == moved
    # Entities are stamped with the emulated time.
    made = await created(emulator, "/connections", base_connection(StorageType.DLZ))
    item = (await emulator.fs("GET", f"/connections/{made}")).body["items"][0]
    assert item["createdAt"] == int((start["now"] + 90) * 1000)


@pytest.mark.parametrize("advance", [-1, "10", True, None])
async def test_the_clock_refuses_bad_advances(emulator: Emulator, advance: Any) -> None:
    answer = await control_raw(emulator, "POST", "/clock", {"advance": advance})
    assert answer.status == 400
    assert "advance" in answer.body["error"]
    assert (await emulator.control("GET", "/clock"))["offset"] == 0.0


async def test_unknown_control_paths_are_not_found(emulator: Emulator) -> None:
    answer = await control_raw(emulator, "GET", "/nothing")
    assert answer.status == 404
    missing_dataset = await control_raw(emulator, "POST", "/datasets/nope/batches", {"rows": 1})
    assert missing_dataset.status == 404
    assert missing_dataset.body == {"error": "no dataset nope"}
    missing_run = await control_raw(emulator, "GET", "/runs/nope")
    assert missing_run.body == {"error": "no run nope"}
