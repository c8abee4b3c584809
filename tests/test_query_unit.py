"""The query step against FakeAep and virtual time: polling cadence, deadlines and failures,
without HTTP and without sleeping."""

from __future__ import annotations

import random
from typing import Any

from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine
from exporter.jobs import Job, JobState

CONFIG = EngineConfig(not_ready_wait_s=0, poll_min_s=5, poll_max_s=60, join_coalesce_s=0)


def query_job(**changes: Any) -> Job:
    return Job.model_validate(
        {"query": "SELECT 1", "destination": "lake", "path": "ml/x", "id": "q", **changes}
    )


def engine_for(aep: FakeAep, clock: FakeClock) -> Engine:
    return Engine(
        aep,
        {"lake": DlzDestination(type="dlz")},
        CONFIG,
        org_id="o",
        sandbox="prod",
        clock=clock,
        rng=random.Random(3),
    )


async def test_a_query_is_polled_with_backoff_then_its_table_is_exported() -> None:
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=0, run_duration_s=10)
    aep.query_duration_s = 300
    async with engine_for(aep, clock) as engine:
        outcome = await engine.run(query_job())
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert outcome.dataset_id == "ds-aep_exporter_q"
    assert aep.calls["queries.create"] == 1
    # Five minutes of query, polled from 5 s up to 60 s apart: a handful of reads, not 60.
    assert 3 <= aep.calls["queries.get"] <= 10
    assert outcome.query_duration_s is not None
    assert outcome.query_duration_s >= 300


async def test_a_failed_query_fails_the_job_with_its_errors_and_makes_no_flow() -> None:
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=0)
    aep.query_outcome = "failed"
    async with engine_for(aep, clock) as engine:
        outcome = await engine.run(query_job())
    assert outcome.state == JobState.FAILED
    assert [(e.code, e.message) for e in outcome.errors] == [
        ("42601", "syntax error at or near the fake")
    ]
    assert aep.calls["flows.create"] == aep.calls["adhoc.run"] == 0


async def test_the_jobs_deadline_cancels_a_query_that_runs_on() -> None:
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=0)
    aep.query_duration_s = 10_000
    async with engine_for(aep, clock) as engine:
        started = clock.monotonic()
        outcome = await engine.run(query_job(timeout=900))
    assert outcome.state == JobState.TIMED_OUT
    assert clock.monotonic() - started <= 900 + 1
    (query,) = aep.queries.values()
    assert query.killed
    assert aep.calls["flows.create"] == 0


async def test_a_query_naming_a_missing_sql_file_is_rejected_before_anything_is_sent() -> None:
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=0)
    async with engine_for(aep, clock) as engine:
        outcome = await engine.run(query_job(query="nightly.sql"))
    assert outcome.state == JobState.REJECTED
    assert "no queries_dir is configured" in outcome.message
    assert aep.calls["queries.create"] == 0
