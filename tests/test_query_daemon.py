"""Crash safety of the query step: the daemon is SIGKILLed while its job's query runs in the
emulator, and restarted; the restart adopts the query by its name, so Query Service ran one
query and the lake was exported once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from aep_emulator.app import serve
from aep_emulator.settings import Span
from exporter.clock import SystemClock
from tests.conftest import emulator_knobs
from tests.daemon_support import (
    drop_job,
    kill,
    results,
    runs_by_dataset,
    start_daemon,
    until_results,
    write_config,
)


@pytest.mark.timeout(120)
async def test_sigkill_during_the_query_leaves_one_query_and_one_export(tmp_path: Path) -> None:
    # The query takes 1.5 s of real time: the kill lands while it is in progress.
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=0.2, max=0.2),
        seed=3,
        query_duration_s=Span(min=1.5, max=1.5),
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        state.lake.create_dataset("prod", "events", 60, rng=random.Random(1), now_ms=0)
        config = write_config(tmp_path, url)
        spool, log = tmp_path / "spool", tmp_path / "daemon.log"
        job = {
            "id": "nightly@2026-12-01T02:00:00Z",
            "query": "SELECT person_id, country FROM events "
            "WHERE snapshot_date < CAST($slot_date AS DATE)",
            "query_table": "events_{slot_date}",
            "destination": "lake",
            "path": "ml/queried",
        }
        name = drop_job(spool, "nightly.json", job)
        running = await start_daemon(config, log)
        try:
            await running.until("query_submitted", deadline_s=30)
        finally:
            await kill(running)
        (query,) = state.queries.values()
        assert query.state in ("SUBMITTED", "IN_PROGRESS")  # killed mid-query
        running = await start_daemon(config, log)
        try:
            await until_results(spool, [name], deadline_s=60)
        finally:
            await kill(running)
        (finished,) = [e for e in running.lines if e.get("event") == "job_finished"]
        assert finished["query_id"] == query.id  # the canonical line names the query
        (result,) = results(spool).values()
        assert result["state"] == "succeeded", result
        assert len(state.queries) == 1  # adopted, not sent again
        assert result["query_id"] == query.id
        assert result["records"] == 60
        assert runs_by_dataset(state) == {result["dataset_id"]: 1}
        table = state.lake.get("prod", result["dataset_id"])
        assert table is not None
        assert table.name == "events_20261201"
        assert table.rows == 60
