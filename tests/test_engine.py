"""The export engine end to end: real HTTP against the emulator, faults on, virtual time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from exporter.aep.client import HttpAep
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress
from exporter.jobs import Job, JobState
from tests.aepclient_support import config_for
from tests.conftest import Emulator, default_knobs

ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=30,
    status_unreadable_s=120,
)


def job(dataset: str, **changes: Any) -> Job:
    return Job.model_validate(
        {"dataset_id": dataset, "destination": "lake", "path": "ml/features", **changes}
    )


async def counts(emulator: Emulator) -> dict[str, Counter[int]]:
    ops: dict[str, Counter[int]] = {}
    for entry in (await emulator.control("GET", "/journal"))["entries"]:
        ops.setdefault(entry["op"], Counter())[entry["status"]] += 1
    return ops


def runs_started(emulator: Emulator) -> int:
    return sum(1 for _ in emulator.state.all_runs())


@pytest.fixture
async def engine(emulator: Emulator) -> AsyncIterator[Engine]:
    config = config_for(emulator, rate_limit_rps=200, max_concurrency=32)
    async with HttpAep.from_config(config, clock=emulator.clock, rng=random.Random(5)) as api:
        eng = Engine(
            api,
            {"lake": DlzDestination(type="dlz")},
            ENGINE,
            org_id=config.org_id,
            sandbox=config.sandbox,
            clock=emulator.clock,
            rng=random.Random(6),
        )
        async with eng:
            yield eng


async def test_a_job_exports_reports_and_parks_its_flow(emulator: Emulator, engine: Engine) -> None:
    (dataset,) = await emulator.seed(rows=120)
    seen: list[Progress] = []

    async def on_state(progress: Progress) -> None:
        seen.append(progress)

    outcome = await engine.run(job(dataset), on_state)
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert (outcome.records, outcome.files) == (120, 1)
    assert outcome.bytes > 0
    assert [p.state for p in seen] == [JobState.FLOW_READY, JobState.TRIGGERING, JobState.RUNNING]
    assert seen[-1].run_id == outcome.run_id
    assert seen[1].intent_ms is not None
    files = (await emulator.control("GET", f"/runs/{outcome.run_id}"))["files"]
    assert len(files) == 1
    ops = await counts(emulator)
    assert ops["flows.create"] == Counter({201: 1})
    # The wait was measured from createdAt: no "not ready" answer, one trigger.
    assert ops["adhoc.run"] == Counter({200: 1})
    flow = (await emulator.fs("GET", f"/flows/{outcome.flow_id}")).body["items"][0]
    assert flow["state"] == "disabled"
    assert flow["scheduleParams"]["startTime"] > emulator.clock.time() + 300 * 86400
    # What `export` counts down: the window from the flow's creation, as AEP keeps it.
    window_ends = flow["createdAt"] / 1000 + ENGINE.not_ready_wait_s
    assert seen[0].ready_at == pytest.approx(window_ends, abs=1)


async def test_the_flow_is_reused_and_reenabled_for_the_next_job(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=10)
    first = await engine.run(job(dataset))
    second = await engine.run(job(dataset, id="again"))
    assert first.state == second.state == JobState.SUCCEEDED
    assert first.flow_id == second.flow_id
    assert first.run_id != second.run_id
    ops = await counts(emulator)
    assert ops["flows.create"] == Counter({201: 1})
    assert ops["connections.create"] == Counter({201: 1})
    assert ops["flows.action"][200] == 3  # disable, enable, disable


async def test_a_second_process_finds_the_flow_by_name(emulator: Emulator, engine: Engine) -> None:
    (dataset,) = await emulator.seed(rows=10)
    assert (await engine.run(job(dataset))).state == JobState.SUCCEEDED
    config = config_for(emulator)
    async with HttpAep.from_config(config, clock=emulator.clock) as api:
        other = Engine(
            api,
            {"lake": DlzDestination(type="dlz")},
            ENGINE,
            org_id=config.org_id,
            sandbox="prod",
            clock=emulator.clock,
        )
        async with other:
            assert (await other.run(job(dataset, id="elsewhere"))).state == JobState.SUCCEEDED
    assert (await counts(emulator))["flows.create"] == Counter({201: 1})


async def test_a_hundred_jobs_for_one_export_share_one_flow_and_one_run(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=10)
    outcomes = await asyncio.gather(*(engine.run(job(dataset, id=f"j{i}")) for i in range(100)))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    assert len({o.flow_id for o in outcomes}) == 1
    assert len({o.run_id for o in outcomes}) == 1
    ops = await counts(emulator)
    assert ops["flows.create"] == Counter({201: 1})
    assert ops["sourceConnections.create"] == Counter({201: 1})
    assert runs_started(emulator) == 1


async def test_jobs_for_different_datasets_run_concurrently(
    emulator: Emulator, engine: Engine
) -> None:
    datasets = await emulator.seed(rows=5, count=12)
    started = emulator.clock.monotonic()
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    ops = await counts(emulator)
    # One lane: one flow, one source connection holding all twelve, one ad hoc call.
    assert ops["flows.create"] == Counter({201: 1})
    assert ops["sourceConnections.create"] == Counter({201: 1})
    assert ops["adhoc.run"] == Counter({200: 1})
    assert len({o.run_id for o in outcomes}) == 12
    # One not-ready window and one run's time (plus the coalescing windows), not twelve.
    assert emulator.clock.monotonic() - started < 60 + 5 + 60 + ENGINE.join_window_s + 1


def with_knobs(**values: Any) -> pytest.MarkDecorator:
    """Run the test against an emulator with these knobs (overrides the `knobs` fixture)."""
    return pytest.mark.parametrize("knobs", [default_knobs(**values)], ids=["knobs"])


@with_knobs(not_ready_window_s=180)
async def test_not_ready_answers_are_waited_out_with_backoff(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=10)
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED
    ops = await counts(emulator)
    assert ops["adhoc.run"][200] == 1
    assert 1 <= ops["adhoc.run"][400] <= 12
    assert runs_started(emulator) == 1


@with_knobs(rate_limit_rps=4, rate_limit_burst=2, retry_after="always")
async def test_a_429_storm_with_retry_after(emulator: Emulator, engine: Engine) -> None:
    datasets = await emulator.seed(rows=5, count=6)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    ops = await counts(emulator)
    throttled = sum(c[429] for c in ops.values())
    assert throttled > 0
    assert ops["flows.create"][201] == 1
    assert runs_started(emulator) == 6
    limiter = engine.api.transport.limiter  # type: ignore[attr-defined]
    assert limiter.stats.throttled > 0
    assert limiter.rate < 200


@with_knobs(rate_limit_rps=4, rate_limit_burst=2, retry_after="never")
async def test_a_429_storm_without_retry_after(emulator: Emulator, engine: Engine) -> None:
    datasets = await emulator.seed(rows=5, count=6)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    ops = await counts(emulator)
    assert sum(c[429] for c in ops.values()) > 0
    assert ops["flows.create"][201] == 1
    assert runs_started(emulator) == 6


@with_knobs(error_5xx_rate=0.15, seed=11)
async def test_server_errors_everywhere(emulator: Emulator, engine: Engine) -> None:
    datasets = await emulator.seed(rows=5, count=8)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    ops = await counts(emulator)
    assert sum(c[s] for c in ops.values() for s in (500, 502, 503, 504)) > 0
    assert ops["flows.create"][201] == 1
    assert runs_started(emulator) == 8


@with_knobs(drop_rate=0.15, seed=3)
async def test_dropped_connections_before_and_after_the_call_took_effect(
    emulator: Emulator, engine: Engine
) -> None:
    datasets = await emulator.seed(rows=5, count=8)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    ops = await counts(emulator)
    assert sum(c[599] for c in ops.values()) > 0
    flows = (await emulator.fs("GET", "/flows", params={"count": "true"})).body["count"]
    assert flows == 1
    assert runs_started(emulator) == 8


@pytest.mark.parametrize(
    "op",
    ["flows.create", "sourceConnections.create", "targetConnections.create", "connections.create"],
)
async def test_a_lost_create_response_leaves_exactly_one_entity(
    emulator: Emulator, engine: Engine, op: str
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    await emulator.control("POST", "/faults", {"action": "drop_after", "op": op})
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED, outcome
    collection = op.split(".")[0]
    listed = await emulator.fs("GET", f"/{collection}", params={"count": "true"})
    assert listed.body["count"] == 1
    assert (await counts(emulator))[op] == Counter({599: 1})


async def test_a_lost_trigger_response_adopts_the_run_it_started(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    await emulator.control("POST", "/faults", {"action": "drop_after", "op": "adhoc.run"})
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert runs_started(emulator) == 1
    assert (await counts(emulator))["adhoc.run"] == Counter({599: 1})


@with_knobs(token_lifetime_s=40, run_duration_s={"min": 400, "max": 400})
async def test_tokens_expire_and_renew_while_a_run_is_polled(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED
    ops = await counts(emulator)
    assert ops["ims.token"][200] >= 5
    assert ops["runs.list"][200] >= 5
    assert all(401 not in c for c in ops.values())


@with_knobs(run_failure_rate=1.0)
async def test_a_failed_run_fails_the_job_with_aeps_errors(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.FAILED
    assert [e.code for e in outcome.errors] == ["ACTIVATION_BATCH-0000-FAILED"]
    assert outcome.files == outcome.records == 0
    flow = (await emulator.fs("GET", f"/flows/{outcome.flow_id}")).body["items"][0]
    assert flow["state"] == "enabled"  # only a successful one-off run parks the flow


@with_knobs(run_partial_rate=1.0)
async def test_success_with_errors_is_reported_as_partial(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED
    assert outcome.partial
    assert outcome.errors
    assert outcome.records == 5


@with_knobs(run_duration_s={"min": 1e7, "max": 1e7})
async def test_a_run_that_never_finishes_times_out_at_the_deadline(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    started = emulator.clock.monotonic()
    outcome = await engine.run(job(dataset, timeout=3600))
    assert outcome.state == JobState.TIMED_OUT
    assert outcome.run_id is not None
    assert 3600 <= emulator.clock.monotonic() - started < 3600 + ENGINE.poll_max_s * 2
    polls = (await counts(emulator))["runs.list"][200]
    assert 20 <= polls <= 200  # backed off towards poll_max_s, not every second


async def test_status_unreadable_for_too_long_fails_the_job_without_retriggering(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)

    async def on_state(progress: Progress) -> None:
        if progress.state == JobState.RUNNING:  # the run's status becomes unreadable
            await emulator.control(
                "POST",
                "/faults",
                {"action": "status", "status": 503, "op": "runs.list", "count": 10_000},
            )

    outcome = await engine.run(job(dataset), on_state)
    assert outcome.state == JobState.FAILED
    assert "could not be read" in outcome.message
    assert (await counts(emulator))["adhoc.run"] == Counter({200: 1})


async def test_dataset_export_not_enabled_is_a_clear_permanent_failure(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    await emulator.control(
        "PATCH", "/config", {"adhoc_disabled_flow_specs": ["cd2fc47e-e838-4f38-a581-8fff2f99b63a"]}
    )
    outcome = await engine.run(job(dataset))
    assert outcome.state == JobState.FAILED
    assert "dataset export is not enabled" in outcome.message
    assert (await counts(emulator))["adhoc.run"] == Counter({400: 1})


async def test_an_unknown_destination_is_rejected_without_calling_aep(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    before = (await emulator.control("GET", "/stats"))["requests"]
    outcome = await engine.run(job(dataset, destination="nowhere"))
    assert outcome.state == JobState.REJECTED
    assert "nowhere" in outcome.message
    assert (await emulator.control("GET", "/stats"))["requests"] == before


async def test_a_scheduled_job_moves_the_dataset_and_reports_the_schedules_run(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    once = await engine.run(job(dataset))
    daily = await engine.run(job(dataset, mode="hourly:6", id="promoted", timeout=8 * 3600))
    assert daily.state == JobState.SUCCEEDED, daily
    assert once.flow_id != daily.flow_id  # another lane: the schedule is part of it
    flows = (await emulator.fs("GET", "/flows")).body["items"]
    # The dataset left the one-off lane (its only member: the lane is gone).
    assert [f["id"] for f in flows] == [daily.flow_id]
    flow = flows[0]
    assert flow["state"] == "enabled"
    schedule = flow["scheduleParams"]
    assert (schedule["timeUnit"], schedule["interval"]) == ("hour", 6)
    assert schedule["endTime"] - emulator.clock.time() > 150 * 86400
    # No ad hoc run for the scheduled job: the schedule's first slot exported it in full.
    assert (await counts(emulator))["adhoc.run"] == Counter({200: 1})
    run = emulator.state.sandboxes[(emulator.knobs.org_id, "prod")].runs[daily.run_id or ""]
    assert (run.created - schedule["startTime"]) % (6 * 3600) == 0
    assert daily.records == 5


async def test_a_scheduled_lanes_end_is_renewed_before_it_passes(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    outcome = await engine.run(job(dataset, mode="daily", timeout=2 * 86400))
    assert outcome.state == JobState.SUCCEEDED
    flow = (await emulator.fs("GET", f"/flows/{outcome.flow_id}")).body["items"][0]
    end = flow["scheduleParams"]["endTime"]
    assert await engine.lanes.renew() == 0  # far from its end: nothing to do
    await emulator.clock.sleep(end - emulator.clock.time() - 20 * 86400)
    assert await engine.lanes.renew() == 1
    emulator._token = None  # the test's own token expired in those months
    renewed = (await emulator.fs("GET", f"/flows/{outcome.flow_id}")).body["items"][0]
    assert renewed["scheduleParams"]["endTime"] > end + 100 * 86400
    assert renewed["scheduleParams"]["interval"] == 1


async def test_a_one_off_export_leaves_the_datasets_schedule_alone(
    emulator: Emulator, engine: Engine
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    daily = await engine.run(job(dataset, mode="daily", timeout=2 * 86400))
    once = await engine.run(job(dataset, id="now-too"))
    assert daily.state == once.state == JobState.SUCCEEDED
    assert daily.flow_id != once.flow_id
    flow = (await emulator.fs("GET", f"/flows/{daily.flow_id}")).body["items"][0]
    source = await emulator.fs("GET", f"/sourceConnections/{flow['sourceConnectionIds'][0]}")
    assert [d["dataSetId"] for d in source.body["items"][0]["params"]["datasets"]] == [dataset]
