"""A job id is an idempotency key: the same job dropped again after it finished is refused
with the run it already had, never answered with a copy of the old result (through the spool
and through the admin API); the start-up shortcut that files a crash's journaled outcome stays."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.daemon.journal import Journal
from exporter.jobs import TERMINAL, Job, JobState, Outcome
from exporter.sources.spool import RESULT_SUFFIX
from tests.conftest import Emulator
from tests.daemon_support import spool_daemon, spool_of
from tests.test_admin import admin_daemon, job
from tests.test_daemon_intake import good_job, running, settings_for


async def test_a_job_file_dropped_again_after_it_finished_is_rejected_not_faked(
    emulator: Emulator, tmp_path: Path
) -> None:
    (dataset,) = await emulator.seed(rows=7)
    raw = good_job(dataset, 1)
    async with running(emulator, tmp_path) as run:
        run.drop("daily.json", raw)
        await run.filed(1)
        first = run.result("done", "daily.json")
        assert first["state"] == "succeeded"
        runs_before = len(list(emulator.state.all_runs()))

        run.drop("daily.json", raw)  # the same name, the same content: the same job id
        await run.filed(2)

        assert run.names("done") == ["daily.json", f"daily.json{RESULT_SUFFIX}"]
        again = run.result("rejected", "daily.json")
        assert again["state"] == "rejected"
        assert again["run_id"] is None  # no run id a consumer could take for a fresh export
        message = again["message"]
        assert f"job id {first['job_id']!r} was already submitted" in message
        assert f"succeeded as run {first['run_id']}" in message
        assert "give the job another id" in message
        assert len(list(emulator.state.all_runs())) == runs_before  # no export, no fake one
        assert run.daemon.counts.rejected == 1


async def test_a_finished_job_submitted_again_over_http_is_409(
    emulator: Emulator, tmp_path: Path
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path) as admin:
        assert (await admin.submit(job(dataset, 1))).status == 202
        done = await admin.until_state("job-1", TERMINAL)
        assert done["state"] == "succeeded"
        again = await admin.submit(job(dataset, 1))
    assert again.status == 409
    assert again.body["error"] == "duplicate"
    assert again.body["job"]["run_id"] == done["run_id"]
    assert len(list(emulator.state.all_runs())) == 1


async def test_at_start_a_finished_but_unfiled_job_is_filed_with_its_outcome(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The shortcut kept for recovery: a crash between journaling the outcome and filing it."""
    (dataset,) = await emulator.seed(rows=5)
    settings = settings_for(emulator, tmp_path)
    daemon = spool_daemon(settings, clock=emulator.clock)
    spool_of(daemon).ensure()
    raw = good_job(dataset, 3)
    parsed = Job.model_validate(json.loads(raw))
    (spool_of(daemon).dirs["processing"] / "crashed.json").write_bytes(raw)
    journal = await Journal.open(settings.daemon.state_dir)
    try:
        await journal.add(parsed.job_id, source="spool", name="crashed.json", spec=json.loads(raw))
        for state in (JobState.FLOW_READY, JobState.TRIGGERING, JobState.RUNNING):
            await journal.advance(parsed.job_id, state, run_id="run-before-the-crash")
        await journal.finish(
            Outcome(job_id=parsed.job_id, state=JobState.SUCCEEDED, run_id="run-before-the-crash")
        )
    finally:
        await journal.close()
    async with running(emulator, tmp_path) as run:
        await run.filed(1)  # admitted by intake, first thing
        result = run.result("done", "crashed.json")
    assert result["state"] == "succeeded"
    assert result["run_id"] == "run-before-the-crash"
    assert list(emulator.state.all_runs()) == []
