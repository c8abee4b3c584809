"""`export`'s note for a rerun: what it keeps, when it is ignored, and a rerun that adopts the
run a stopped command's ad hoc call started (the emulator over HTTP, on the fake clock)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console

from aep_emulator.settings import DEFAULT_CLIENT_ID
from exporter.aep.config import AepConfig
from exporter.clock import FakeClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Progress
from exporter.jobs import Job, JobState
from exporter.oneshot import _export
from exporter.oneshot_state import ExportNote, default_folder
from exporter.settings import Settings
from tests.conftest import EMULATOR_SECRET, Emulator


def note(folder: Path, clock: FakeClock, job_id: str = "j") -> ExportNote:
    return ExportNote(folder, job_id=job_id, org_id="o", sandbox="prod", clock=clock)


async def test_the_note_keeps_a_step_to_resume_from_and_ids_only(tmp_path: Path) -> None:
    clock = FakeClock()
    mine = note(tmp_path, clock)
    mine.save(Progress(JobState.FLOW_READY, flow_id="f"))  # nothing to resume from yet
    assert mine.load(max_age_s=60) is None
    mine.save(Progress(JobState.TRIGGERING, flow_id="f", intent_ms=5))
    assert mine.load(max_age_s=60) == Progress(JobState.TRIGGERING, flow_id="f", intent_ms=5)
    mine.save(Progress(JobState.RUNNING, flow_id="f", run_id="r"))
    assert mine.load(max_age_s=60) == Progress(JobState.RUNNING, flow_id="f", run_id="r")
    assert set(json.loads(mine.path.read_text())) == {
        "job_id",
        "state",
        "flow_id",
        "run_id",
        "intent_ms",
        "saved",
    }
    assert note(tmp_path, clock, "other").load(max_age_s=60) is None  # another job's
    await clock.advance(61)
    assert mine.load(max_age_s=60) is None  # older than the job's timeout
    mine.path.write_text("{not json")
    assert mine.load(max_age_s=600) is None  # unreadable: start afresh
    mine.clear()
    mine.clear()  # idempotent
    assert not mine.path.exists()


def test_the_notes_live_under_the_xdg_state_folder(tmp_path: Path) -> None:
    assert default_folder({"XDG_STATE_HOME": str(tmp_path)}) == (
        tmp_path / "aep-exporter" / "exports"
    )
    assert default_folder({}).parts[-4:] == (".local", "state", "aep-exporter", "exports")


async def test_a_rerun_adopts_the_run_a_stopped_trigger_started(
    emulator: Emulator, tmp_path: Path
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    settings = Settings.model_construct(
        aep=AepConfig(
            platform_url=emulator.url,
            ims_url=emulator.url,
            client_id=DEFAULT_CLIENT_ID,
            client_secret=SecretStr(EMULATOR_SECRET),
            org_id=emulator.knobs.org_id,
        ),
        engine=EngineConfig(not_ready_wait_s=60, poll_max_s=60),
        destinations={"lake": DlzDestination(type="dlz")},
    )
    job = Job(dataset_id=dataset, destination="lake", path="ml/x")
    quiet = Console(file=io.StringIO())
    notes = tmp_path / "notes"
    first = await _export(settings, job, quiet, wait=False, clock=emulator.clock, notes=notes)
    assert first.state == JobState.RUNNING
    (run,) = emulator.state.all_runs()
    await emulator.clock.advance(60)  # the run ends meanwhile: a new trigger would be accepted
    # As if the command had been stopped after its ad hoc call went out, before the answer.
    stopped = ExportNote(
        notes,
        job_id=job.job_id,
        org_id=settings.aep.org_id,
        sandbox=settings.aep.sandbox,
        clock=emulator.clock,
    )
    stopped.save(Progress(JobState.TRIGGERING, flow_id=first.flow_id, intent_ms=1))
    again = await _export(settings, job, quiet, wait=True, clock=emulator.clock, notes=notes)
    assert again.state == JobState.SUCCEEDED
    assert again.run_id == first.run_id == run.id  # adopted, not triggered again
    assert len(list(emulator.state.all_runs())) == 1
    assert not stopped.path.exists()  # the job ended: its note is gone
    assert "resuming" in quiet.file.getvalue()  # type: ignore[attr-defined]
