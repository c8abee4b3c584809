"""Crash safety: SIGKILL the daemon at 20 random moments while it works through 300 jobs.

The emulator runs in this process (real clock, latency, faults, a not-ready window); the
daemon is a child process killed whenever the emulator has served a randomly chosen number
of requests, then restarted. At the end every job has exactly one outcome, and the
emulator saw one flow per distinct export and one accepted trigger per job.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from exporter.clock import SystemClock
from exporter.daemon.journal import FILE_NAME, summary
from exporter.emulator.app import serve
from exporter.emulator.settings import Knobs, Span
from tests.daemon_support import (
    daemon_process,
    drop_job,
    kill,
    results,
    start_daemon,
    triggers_by_job,
    until_results,
    write_config,
)

pytestmark = pytest.mark.slow
EXPORTS = 150  # distinct exports; each is run by two jobs, one per phase
KILLS = 20


@pytest.mark.timeout(600)
async def test_sigkill_at_twenty_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    knobs = Knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=0.2, max=1.0),
        latency_ms=Span(min=1, max=8),
        error_5xx_rate=0.03,
        error_429_rate=0.005,
        drop_rate=0.005,
        seed=7,
        # one flow per dataset until the engine's export lanes land (issue 9)
        max_destination_flows=100_000,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        datasets = [
            state.lake.create_dataset(
                "prod", f"features_{i:03d}", 20, rng=random.Random(i), now_ms=0
            ).id
            for i in range(EXPORTS)
        ]
        config = write_config(tmp_path, url)
        spool, log = tmp_path / "spool", tmp_path / "daemon.log"
        names: list[list[str]] = [[], []]

        def drop(phase: int) -> None:
            for i, dataset in enumerate(datasets):
                job = {
                    "id": f"p{phase}-{i:03d}",
                    "dataset_id": dataset,
                    "destination": "lake",
                    "path": f"ml/export{i % 7}",
                }
                names[phase].append(drop_job(spool, f"p{phase}-{i:03d}.json", job))

        # A phase takes about ten requests a job: half the kills land in each, anywhere.
        drop(0)
        running = await start_daemon(config, log)
        kills = 0
        try:
            for phase in (0, 1):
                if phase == 1:
                    await until_results(spool, names[0], deadline_s=240)
                    drop(1)
                start = state.journal_seq
                for offset in sorted(rng.sample(range(20, EXPORTS * 10), KILLS // 2)):
                    await state.served(start + offset)
                    await kill(running)
                    kills += 1
                    running = await start_daemon(config, log)
            await until_results(spool, names[0] + names[1], deadline_s=300)
        finally:
            await kill(running)
        async with daemon_process(config, tmp_path / "final.log") as final:
            pass  # one more start and stop: recovery must find nothing left to do
        assert final.proc.returncode is not None

        found = results(spool)
        everyone = names[0] + names[1]
        assert kills == KILLS
        assert sorted(found) == sorted(everyone), "every job has exactly one result file"
        assert {r["state"] for r in found.values()} == {"succeeded"}, {
            n: r["message"] for n, r in found.items() if r["state"] != "succeeded"
        }
        for folder in ("incoming", "processing"):
            assert list((spool / folder).iterdir()) == []
        counts, _ = summary(tmp_path / "state" / FILE_NAME)
        assert counts == {"succeeded": len(everyone)}

        # Counted in the emulator's state: a create whose answer was dropped still counts.
        flows = [f for box in state.sandboxes.values() for f in box.flows.values()]
        assert len(flows) == EXPORTS
        assert len({f["name"] for f in flows}) == EXPORTS
        per_job = triggers_by_job(state)
        assert per_job == {f"p{p}-{i:03d}": 1 for p in (0, 1) for i in range(EXPORTS)}
        assert sum(1 for _ in state.all_runs()) == len(everyone)
        # The runs each job reports are the runs the emulator started for it.
        assert len({r["run_id"] for r in found.values()}) == len(everyone)
