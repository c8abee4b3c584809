"""Crash safety: SIGKILL the daemon at 20 random moments while it works through 300 jobs.

The emulator runs in this process (real clock, latency, faults, a not-ready window); the
daemon is a child process killed whenever the emulator has served a randomly chosen number
of requests, then restarted. At the end every job has exactly one outcome, and the
emulator saw one flow per lane, one run per job (batched: counted per dataset, each dataset
exported once per phase), and no source connection that no flow uses.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from aep_emulator.app import serve
from aep_emulator.settings import Span
from exporter.clock import SystemClock
from exporter.daemon.journal import FILE_NAME, summary
from tests.conftest import emulator_knobs
from tests.daemon_support import (
    daemon_process,
    drop_job,
    kill,
    results,
    runs_by_dataset,
    start_daemon,
    until_results,
    write_config,
)

pytestmark = pytest.mark.slow
EXPORTS = 150  # distinct exports; each is run by two jobs, one per phase
KILLS = 20


@pytest.mark.timeout(600)
async def test_sigkill_at_twenty_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=0.2, max=1.0),
        latency_ms=Span(min=1, max=8),
        error_5xx_rate=0.03,
        error_429_rate=0.005,
        drop_rate=0.005,
        seed=7,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        datasets = [
            state.lake.create_dataset(
                "prod", f"features_{i:03d}", 20, rng=random.Random(i), now_ms=0
            ).id
            for i in range(EXPORTS)
        ]
        # Orphaned source connections are deleted at once (one daemon: no other may be
        # about to use one).
        config = write_config(tmp_path, url, engine={"orphan_age_s": 0, "join_coalesce_s": 0.2})
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

        # Lanes spend about one request a job (membership changes and triggers are batched,
        # each restart adds a few dozen): half the kills land in each phase, anywhere in
        # its first requests — lane creation, joins, batched triggers, polling.
        drop(0)
        running = await start_daemon(config, log)
        kills = 0
        try:
            for phase in (0, 1):
                if phase == 1:
                    await until_results(spool, names[0], deadline_s=240)
                    drop(1)
                start = state.journal_seq
                for offset in sorted(rng.sample(range(10, EXPORTS), KILLS // 2)):
                    await asyncio.wait_for(state.served(start + offset), 60)
                    await kill(running)
                    kills += 1
                    running = await start_daemon(config, log)
            await until_results(spool, names[0] + names[1], deadline_s=300)
        finally:
            await kill(running)
        async with daemon_process(config, tmp_path / "final.log") as final:
            # one more start and stop: recovery finds nothing left to do, and the start's
            # tidy-up deletes source connections a cut-short membership change left behind
            await final.until("lane_tidy", deadline_s=30)
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
        boxes = list(state.sandboxes.values())
        flows = [f for box in boxes for f in box.flows.values()]
        assert len(flows) == 7  # one lane per path
        assert len({f["name"] for f in flows}) == 7
        assert runs_by_dataset(state) == dict.fromkeys(datasets, 2)  # one run per job
        # The runs each job reports are the runs the emulator started for its dataset.
        assert len({r["run_id"] for r in found.values()}) == len(everyone)
        runs = {r.id: r.dataset_id for box in boxes for r in box.runs.values()}
        for i, dataset in enumerate(datasets):
            assert {runs[found[names[p][i]]["run_id"]] for p in (0, 1)} == {dataset}
        # No orphan: every source connection is the one its flow uses.
        used = {f["sourceConnectionIds"][0] for f in flows}
        assert {s for box in boxes for s in box.source_connections} == used
