"""A Data Distiller query before the export, end to end: the real client over HTTP against the
emulator's Query Service, which runs the SQL with DuckDB over its data lake; virtual time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.aep.client import HttpAep
from exporter.daemon.journal import Journal
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress
from exporter.engine.query import query_name
from exporter.errors import ConfigError
from exporter.jobs import ORDER, Job, JobState
from tests.aepclient_support import config_for
from tests.conftest import Emulator

ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=30,
    status_unreadable_s=120,
)
# Per country: how many customers and their spend, next to the other dataset's mean spend.
JOIN_SQL = """
SELECT o.country, count(*) AS customers, round(sum(o.monetary_90d), 2) AS spend,
       round(any_value(r.mean_spend), 4) AS reference_spend
FROM orders o
JOIN (SELECT country, avg(monetary_90d) AS mean_spend FROM reference GROUP BY country) r
  ON o.country = r.country
WHERE o.frequency_30d >= CAST($min_frequency AS INTEGER)
GROUP BY o.country
"""


def query_job(sql: str, **changes: Any) -> Job:
    return Job.model_validate(
        {"query": sql, "destination": "lake", "path": "ml/queried", **changes}
    )


async def ops(emulator: Emulator) -> dict[str, Counter[int]]:
    found: dict[str, Counter[int]] = {}
    for entry in (await emulator.control("GET", "/journal"))["entries"]:
        found.setdefault(entry["op"], Counter())[entry["status"]] += 1
    return found


async def seed(emulator: Emulator, name: str, rows: int, seed: int) -> str:
    made = await emulator.control(
        "POST", "/datasets", {"rows": rows, "name": name, "sandbox": "prod", "seed": seed}
    )
    return str(made["datasets"][0]["id"])


def batches(emulator: Emulator, dataset_id: str) -> list[Path]:
    ds = emulator.state.lake.get("prod", dataset_id)
    assert ds is not None
    return [b.path for b in ds.batches]


async def exported(emulator: Emulator, run_id: str | None) -> pa.Table:
    files = (await emulator.control("GET", f"/runs/{run_id}"))["files"]
    assert files, "the run wrote no files"
    return pa.concat_tables([pq.read_table(f) for f in files])


async def served_op(emulator: Emulator, op: str) -> None:
    """Return once the emulator has answered a request of `op`."""
    seen = emulator.state.journal_seq
    while not any(e.op == op for e in emulator.state.journal):
        seen += 1
        await emulator.state.served(seen)


def by_country(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda r: r["country"])


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


async def test_a_ctas_job_joins_two_datasets_and_exports_what_duckdb_computes(
    emulator: Emulator, engine: Engine
) -> None:
    orders = await seed(emulator, "orders", 400, 11)
    reference = await seed(emulator, "reference", 300, 12)
    seen: list[JobState] = []

    async def on_state(progress: Progress) -> None:
        seen.append(progress.state)

    job = query_job(JOIN_SQL, id="weekly-features", query_params={"min_frequency": "1"})
    outcome = await engine.run(job, on_state)

    assert outcome.state == JobState.SUCCEEDED, outcome
    assert seen[:2] == [JobState.QUERYING, JobState.FLOW_READY]
    assert outcome.query_id is not None
    assert outcome.query_rows == outcome.records
    assert outcome.dataset_id not in (None, orders, reference)
    # The same SQL, computed independently over the source batches.
    con = duckdb.connect()
    con.register("orders", pa.concat_tables([pq.read_table(p) for p in batches(emulator, orders)]))
    con.register(
        "reference", pa.concat_tables([pq.read_table(p) for p in batches(emulator, reference)])
    )
    expected = con.sql(JOIN_SQL, params={"min_frequency": "1"}).to_arrow_table()
    assert expected.num_rows > 3
    got = await exported(emulator, outcome.run_id)
    assert got.schema.names == expected.schema.names
    assert by_country(got) == by_country(expected)
    # The query went out once, named after the job, with its value as a parameter.
    (query,) = emulator_queries(emulator)
    assert query.request["name"] == query_name(job)
    assert query.request["queryParameters"] == {"min_frequency": "1"}
    assert "1" not in query.request["sql"].replace("$min_frequency", "")


def emulator_queries(emulator: Emulator) -> list[Any]:
    return list(emulator.state.queries.values())


async def test_insert_into_appends_and_the_next_incremental_export_carries_only_new_rows(
    emulator: Emulator, engine: Engine
) -> None:
    source = await seed(emulator, "events", 200, 21)
    first = query_job(
        "SELECT person_id, country, monetary_90d FROM events WHERE country = $country",
        id="refresh@2026-12-01T02:00:00Z",
        query_table="features_{slot_date}",
        query_params={"country": "US"},
        mode="daily",
        export_now=True,
    )
    full = await engine.run(first)
    assert full.state == JobState.SUCCEEDED, full
    assert emulator.state.lake.get("prod", str(full.dataset_id)) is not None
    full_rows = await exported(emulator, full.run_id)
    assert set(full_rows.column("country").to_pylist()) == {"US"}

    second = query_job(
        "SELECT person_id, country, monetary_90d FROM events WHERE country = $country",
        id="refresh@2026-12-02T02:00:00Z",
        query_into="insert",
        query_table="features_20261201",
        query_params={"country": "GB"},
        mode="daily",
        export_now=True,
    )
    increment = await engine.run(second)
    assert increment.state == JobState.SUCCEEDED, increment
    assert increment.dataset_id == full.dataset_id
    assert increment.flow_id == full.flow_id
    new_rows = await exported(emulator, increment.run_id)
    # Only the appended batch: the GB rows, none of the US rows exported before.
    assert set(new_rows.column("country").to_pylist()) == {"GB"}
    assert new_rows.num_rows == increment.query_rows == increment.records > 0
    source_gb = sum(
        pq.read_table(p).column("country").to_pylist().count("GB")
        for p in batches(emulator, source)
    )
    assert new_rows.num_rows == source_gb


@pytest.mark.parametrize(
    ("sql", "code", "phrase"),
    [
        ("SELECT person_id FROM events WHERE", "42601", "syntax error"),
        ("SELECT person_id FROM no_such_table", "42P01", "no_such_table"),
    ],
)
async def test_a_failing_query_reports_the_services_message_and_exports_nothing(
    emulator: Emulator, engine: Engine, sql: str, code: str, phrase: str
) -> None:
    await seed(emulator, "events", 20, 31)
    outcome = await engine.run(query_job(sql))
    assert outcome.state == JobState.FAILED, outcome
    assert outcome.query_id is not None
    assert [e.code for e in outcome.errors] == [code]
    assert phrase in outcome.message
    assert phrase in outcome.errors[0].message
    counted = await ops(emulator)
    assert "flows.create" not in counted
    assert "adhoc.run" not in counted


async def test_a_query_past_the_jobs_deadline_times_out_is_cancelled_and_exports_nothing(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 20, 41)
    await emulator.control("PATCH", "/config", {"query_duration_s": {"min": 5000, "max": 5000}})
    outcome = await engine.run(query_job("SELECT * FROM events", timeout=600))
    assert outcome.state == JobState.TIMED_OUT, outcome
    (query,) = emulator_queries(emulator)
    assert query.state == "KILLED"
    assert "adhoc.run" not in await ops(emulator)


async def test_the_services_own_timeout_fails_the_job_with_its_message(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 20, 42)
    await emulator.control(
        "PATCH", "/config", {"query_duration_s": {"min": 900, "max": 900}, "query_timeout_s": 300}
    )
    outcome = await engine.run(query_job("SELECT * FROM events"))
    assert outcome.state == JobState.FAILED, outcome
    assert [e.code for e in outcome.errors] == ["53400"]
    assert "timed out" in outcome.message


async def test_a_resumed_job_adopts_its_query_instead_of_sending_it_again(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 50, 51)
    job = query_job("SELECT person_id, country FROM events", id="resumed")
    marks: list[int] = []

    async def crash_after_submit(progress: Progress) -> None:
        if progress.state == JobState.FLOW_READY:
            raise RuntimeError("the process died here")
        if progress.state == JobState.QUERYING and progress.intent_ms is not None:
            marks.append(progress.intent_ms)

    with pytest.raises(RuntimeError):
        await engine.run(job, crash_after_submit)
    (mark,) = marks
    resumed = await engine.run(job, resume=Progress(JobState.QUERYING, intent_ms=mark))
    assert resumed.state == JobState.SUCCEEDED, resumed
    assert len(emulator_queries(emulator)) == 1
    assert (await ops(emulator))["queries.create"] == Counter({202: 1})
    assert resumed.records == 50


def test_a_job_with_a_query_names_no_dataset_and_keeps_old_ids() -> None:
    # Ids derived before query fields existed (computed with the previous release).
    plain = Job.model_validate({"dataset_id": "abc", "destination": "lake", "path": "p"})
    assert plain.job_id == "job-a6de2a0c8b4294b173181286"
    daily = Job.model_validate(
        {
            "dataset_id": "abc",
            "destination": "lake",
            "path": "p",
            "mode": "daily",
            "labels": {"a": "b"},
        }
    )
    assert daily.job_id == "job-847d493903e6aa2808e82d19"
    with pytest.raises(ValueError, match="drop dataset_id"):
        Job.model_validate(
            {"dataset_id": "abc", "query": "SELECT 1", "destination": "lake", "path": "p"}
        )
    with pytest.raises(ValueError, match="set by the exporter"):
        query_job("SELECT 1", query_params={"job_id": "x"})
    with pytest.raises(ValueError, match="query_into=insert needs query_table"):
        query_job("SELECT 1", query_into="insert")
    with pytest.raises(ValueError, match="table name"):
        query_job("SELECT 1", query_table="x; DROP TABLE y")


async def test_journals_written_before_the_query_step_resume_and_query_jobs_journal_it(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path)
    try:
        # As the previous release left them: jobs mid-way, no `querying` anywhere.
        old = {"dataset_id": "ds", "destination": "lake", "path": "ml/x"}
        for job_id, state in (("a", JobState.FLOW_READY), ("b", JobState.TRIGGERING)):
            await journal.add(job_id, source="spool", name=f"{job_id}.json", spec=old)
            for step in ORDER[2 : ORDER.index(state) + 1]:  # flow_ready onwards
                await journal.advance(job_id, step, flow_id="f", intent_ms=5)
        unfinished = {r.job_id: r for r in await journal.unfinished()}
        assert {k: r.state for k, r in unfinished.items()} == {
            "a": JobState.FLOW_READY,
            "b": JobState.TRIGGERING,
        }
        assert Job.model_validate(unfinished["a"].spec).job_id == Job.model_validate(old).job_id
        await journal.advance("b", JobState.RUNNING, run_id="r")
        running = await journal.get("b")
        assert running is not None
        assert running.state == JobState.RUNNING
        # A query job: querying comes between received and flow_ready, and a resumed job
        # announcing it again later does not move it back.
        spec = {"query": "SELECT 1", "destination": "lake", "path": "ml/x"}
        await journal.add("q", source="spool", name="q.json", spec=spec)
        await journal.advance("q", JobState.QUERYING, intent_ms=7)
        await journal.advance("q", JobState.FLOW_READY, flow_id="f")
        await journal.advance("q", JobState.QUERYING, intent_ms=9)
        record = await journal.get("q")
        assert record is not None
        assert record.state == JobState.FLOW_READY
        assert Job.model_validate(record.spec).has_query
    finally:
        await journal.close()


async def test_cancelling_a_job_cancels_its_query_in_query_service(emulator: Emulator) -> None:
    await seed(emulator, "events", 20, 61)
    await emulator.control("PATCH", "/config", {"query_duration_s": {"min": 600, "max": 600}})
    config = config_for(emulator)
    async with HttpAep.from_config(config, clock=emulator.clock) as api:
        eng = Engine(
            api,
            {"lake": DlzDestination(type="dlz")},
            ENGINE,
            org_id=config.org_id,
            sandbox=config.sandbox,
            clock=emulator.clock,
        )
        assert eng.queries is not None
        async with eng:
            job = query_job("SELECT * FROM events", id="c")
            task = asyncio.create_task(eng.run(job))
            await served_op(emulator, "queries.get")  # the query is running, polled
            await eng.queries.cancel("c")  # what the runner does before cancelling the task
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    (query,) = emulator_queries(emulator)
    assert query.state == "KILLED"
    assert (await ops(emulator))["queries.patch"] == Counter({202: 1})


def test_a_schedule_with_a_query_fires_jobs_whose_table_and_parameters_follow_the_slot() -> None:
    from datetime import UTC, datetime

    from exporter.daemon.config import ScheduleConfig
    from exporter.engine.query import parameters, table_of
    from exporter.sources.schedules import slot_job_id

    config = ScheduleConfig.model_validate(
        {
            "name": "events-refresh",
            "cron": "0 2 * * *",
            "job": {
                "query": "daily-events.sql",
                "query_table": "features_{slot_date}",
                "destination": "lake",
                "path": "features/events",
                "mode": "daily",
                "export_now": True,
            },
        }
    )
    # What the scheduler submits for a slot (exporter/sources/schedules.py, `fire`).
    slot = datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    spec = {
        **config.job.model_dump(mode="json", exclude_unset=True),
        "id": slot_job_id("events-refresh", slot),
    }
    job = Job.model_validate(spec)
    assert table_of(job) == "features_20261202"
    assert parameters(job) == {
        "job_id": "events-refresh@2026-12-02T02:00:00Z",
        "slot": "2026-12-02T02:00:00Z",
        "slot_date": "2026-12-02",
        "previous_date": "2026-12-01",
    }
    unscheduled = query_job("SELECT 1", query_table="t_{slot_date}")
    with pytest.raises(ConfigError, match="not a scheduled one"):
        table_of(unscheduled)


async def test_parameter_values_are_bound_not_spliced_into_the_sql(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 30, 71)
    sneaky = "US' OR '1'='1"
    outcome = await engine.run(
        query_job(
            "SELECT person_id, country FROM events WHERE country = $country",
            query_params={"country": sneaky},
        )
    )
    # Bound as a value, the text matches no country: an empty result, nothing to export.
    assert outcome.query_rows == 0
    (query,) = emulator_queries(emulator)
    assert sneaky not in query.request["sql"]


async def test_the_client_pages_through_queries_and_reads_query_services_refusals(
    emulator: Emulator,
) -> None:
    from exporter.aep.queries import HttpQueries
    from exporter.errors import RequestError

    await seed(emulator, "events", 10, 81)
    config = config_for(emulator)
    async with HttpAep.from_config(config, clock=emulator.clock) as api:
        queries = HttpQueries(api.transport, page_size=1)
        body = {"dbName": "prod:all", "sql": "SELECT 1 AS one", "name": "same"}
        made = [await queries.submit_query(body) for _ in range(3)]
        await queries.submit_query({**body, "name": "other"})
        assert [m.state for m in made] == ["SUBMITTED"] * 3
        found = await queries.queries_named("same", made[0].created_ms)
        assert [q.id for q in found] == [m.id for m in made]  # oldest first, over 3 pages
        assert await queries.queries_named("same", made[-1].created_ms + 1) == []
        with pytest.raises(RequestError, match=r"queryParameters has no value for: \$day"):
            await queries.submit_query({**body, "sql": "SELECT $day AS d"})
        assert await queries.get_query("no-such-query") is None
        assert await queries.dataset_of_table("events") is not None
        assert await queries.dataset_of_table("no_such_table") is None
    listed = [e for e in emulator.state.journal if e.op == "queries.list"]
    assert len(listed) >= 3


async def test_a_lost_submit_answer_adopts_the_query_and_failed_polls_are_retried(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 40, 91)
    # The query is made but its answer never arrives; then two status reads fail.
    await emulator.control("POST", "/faults", {"action": "drop_after", "op": "queries.create"})
    await emulator.control(
        "POST", "/faults", {"action": "status", "status": 503, "op": "queries.get", "count": 2}
    )
    outcome = await engine.run(query_job("SELECT person_id FROM events", id="lost-answer"))
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert outcome.records == 40
    (query,) = emulator_queries(emulator)  # adopted by its name, not sent again
    assert outcome.query_id == query.id
    counted = await ops(emulator)
    assert counted["queries.create"] == Counter({599: 1})
    assert counted["queries.get"][503] == 2


async def test_a_job_resumed_past_its_query_neither_sends_it_again_nor_loses_it(
    emulator: Emulator, engine: Engine
) -> None:
    await seed(emulator, "events", 25, 92)
    job = query_job("SELECT person_id FROM events", id="resumed-late")
    first = await engine.run(job)
    assert first.state == JobState.SUCCEEDED, first
    # The process died after the run was journaled: the restart polls the same run.
    again = await engine.run(
        job, resume=Progress(JobState.RUNNING, flow_id=first.flow_id, run_id=first.run_id)
    )
    assert again.state == JobState.SUCCEEDED, again
    assert (again.run_id, again.query_id, again.dataset_id) == (
        first.run_id,
        first.query_id,
        first.dataset_id,
    )
    assert len(emulator_queries(emulator)) == 1
