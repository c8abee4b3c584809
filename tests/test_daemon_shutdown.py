"""Graceful shutdown: SIGTERM with jobs in every state loses nothing and exits 0 in time;
a second signal exits at once; what was left resumes at the next start."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from aep_emulator.app import serve
from aep_emulator.settings import Knobs, Span
from aep_emulator.state import EmulatorState
from exporter.clock import SystemClock
from exporter.daemon.journal import FILE_NAME, summary
from tests.conftest import emulator_knobs
from tests.daemon_support import (
    drop_job,
    kill,
    results,
    start_daemon,
    triggers_by_job,
    until_results,
    write_config,
)

pytestmark = pytest.mark.slow
GRACE_S = 2.0


def drop(spool: Path, datasets: list[str], prefix: str) -> list[str]:
    return [
        drop_job(
            spool,
            f"{prefix}-{i:02d}.json",
            {
                "id": f"{prefix}-{i:02d}",
                "dataset_id": dataset,
                "destination": "lake",
                "path": f"ml/{prefix}{i}",
            },
        )
        for i, dataset in enumerate(datasets)
    ]


async def add_fault(url: str, fault: dict[str, object]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/_emulator/faults", json=fault) as resp,
    ):
        assert resp.status == 201


def seed(state: EmulatorState, count: int, start: int) -> list[str]:
    return [
        state.lake.create_dataset(
            "prod", f"f{start + i}", 10, rng=random.Random(start + i), now_ms=0
        ).id
        for i in range(count)
    ]


@pytest.mark.timeout(300)
async def test_sigterm_with_jobs_in_every_state(tmp_path: Path) -> None:
    knobs = emulator_knobs(
        not_ready_window_s=0.2,
        run_duration_s=Span(min=0.1, max=0.2),
        seed=3,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        config = write_config(
            tmp_path,
            url,
            daemon={"max_in_flight": 12, "shutdown_grace_s": GRACE_S},
            engine={"not_ready_wait_s": 0.2},
        )
        spool, log = tmp_path / "spool", tmp_path / "daemon.log"
        finished = drop(spool, seed(state, 4, 0), "early")
        running = await start_daemon(config, log)
        await until_results(spool, finished, deadline_s=60)

        # Now runs last ten minutes, three triggers hang on the wire, and there are more jobs
        # than the daemon takes on: jobs end up running, triggering and waiting unclaimed.
        state.knobs = Knobs.model_validate(
            {**state.knobs.model_dump(), "run_duration_s": {"min": 600, "max": 600}}
        )
        await add_fault(
            url, {"action": "delay", "op": "adhoc.run", "delay_ms": 600_000, "count": 3}
        )
        runs_before = sum(1 for _ in state.all_runs())
        late = drop(spool, seed(state, 20, 100), "late")
        await running.until("run_triggered", count=4 + 9)
        assert sum(1 for _ in state.all_runs()) == runs_before + 9
        before = {p.name for p in (spool / "incoming").iterdir()}
        stopped_at = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(GRACE_S + 10):
            code = await running.proc.wait()
        took = time.monotonic() - stopped_at
        assert code == 0
        assert took < GRACE_S + 5

        events = [e["event"] for e in await running.events()]
        assert "daemon_stopped" in events
        # Nothing lost: every late job is waiting, or journaled and in processing/.
        waiting = {p.name for p in (spool / "incoming").iterdir()}
        processing = {p.name for p in (spool / "processing").iterdir()}
        assert waiting | processing == set(late)
        assert waiting <= before
        assert len(processing) == 12  # max_in_flight were claimed
        counts, records = summary(tmp_path / "state" / FILE_NAME, recent=100)
        assert counts.get("succeeded") == 4
        unfinished = [r for r in records if r.state.value not in ("succeeded",)]
        assert {r.name for r in unfinished} == processing
        states = [r.state.value for r in unfinished]
        # Nine runs were started and three triggers held; a job whose run id arrived just
        # before the signal may not have journaled "running" yet: it adopts its run later.
        assert set(states) == {"running", "triggering"}
        assert states.count("triggering") >= 3
        assert len(states) == 12

        # Restart with short waits: everything finishes, each job triggered exactly once.
        state.knobs = Knobs.model_validate(
            {
                **state.knobs.model_dump(),
                "run_duration_s": {"min": 0.1, "max": 0.2},
                "not_ready_window_s": 0.2,
            }
        )
        state.clock.offset += 700  # the long runs left going on in AEP are over by now
        running = await start_daemon(config, log)
        try:
            await until_results(spool, late, deadline_s=120)
        finally:
            running.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(GRACE_S + 10):
                assert await running.proc.wait() == 0
        found = results(spool)
        assert {found[n]["state"] for n in finished + late} == {"succeeded"}
        assert set(triggers_by_job(state).values()) == {1}
        assert len(triggers_by_job(state)) == len(finished) + len(late)


@pytest.mark.timeout(120)
async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    # Every call hangs for a minute, so the first SIGTERM has requests to wait for.
    knobs = emulator_knobs(slow_rate=1.0, slow_ms=60_000, seed=4)
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        config = write_config(tmp_path, url, daemon={"shutdown_grace_s": 30})
        drop(tmp_path / "spool", seed(state, 2, 0), "stuck")
        running = await start_daemon(config, tmp_path / "daemon.log")
        try:
            await running.until("daemon_ready")
            await state.received(2)  # both jobs have a call held on the wire
            running.proc.send_signal(signal.SIGTERM)
            await running.until("daemon_stopping")
            assert running.proc.returncode is None  # waiting out the grace period
            running.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await running.proc.wait() == 128 + signal.SIGTERM
        finally:
            await kill(running)


async def test_a_stop_the_daemon_began_itself_still_gives_a_signal_its_grace(
    tmp_path: Path,
) -> None:
    # A task dies (intake: the spool is deleted) while calls hang on the wire: the daemon
    # begins its graceful stop by itself. A SIGTERM then (systemctl stop, say) is the first
    # signal, not the second: it must not cut the grace short; a second one does.
    knobs = emulator_knobs(slow_rate=1.0, slow_ms=60_000, seed=5)
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        config = write_config(
            tmp_path, url, daemon={"shutdown_grace_s": 30, "watch": False, "rescan_s": 0.2}
        )
        drop(tmp_path / "spool", seed(state, 2, 0), "stuck")
        running = await start_daemon(config, tmp_path / "daemon.log")
        try:
            await running.until("daemon_ready")
            await state.received(2)
            await asyncio.to_thread(shutil.rmtree, tmp_path / "spool")
            await running.until("daemon_stopping")
            running.proc.send_signal(signal.SIGTERM)
            await running.until("signal_received")
            (first,) = [e for e in await running.events() if e["event"] == "signal_received"]
            assert first["then"] == "graceful stop"
            assert running.proc.returncode is None  # still waiting out the grace period
            running.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                assert await running.proc.wait() == 128 + signal.SIGTERM
        finally:
            await kill(running)
        events = await running.events()
        assert [e["task"] for e in events if e["event"] == "task_died"] == ["intake"]
