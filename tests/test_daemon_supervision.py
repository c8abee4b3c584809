"""Supervision: a background task that dies stops the daemon with 70, never half-alive;
a stop request ends it with 0 and a job that crashes ends visibly."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.daemon.core import EXIT_OK, EXIT_SOFTWARE
from exporter.jobs import JobState
from tests.conftest import Emulator
from tests.daemon_support import spool_daemon
from tests.test_daemon_intake import good_job, settings_for


async def test_intake_dying_stops_the_daemon_with_70(emulator: Emulator, tmp_path: Path) -> None:
    settings = settings_for(emulator, tmp_path)
    settings = settings.model_copy(
        update={"daemon": settings.daemon.model_copy(update={"watch": False})}
    )
    daemon = spool_daemon(settings, clock=emulator.clock)
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await daemon.ready.wait()
        # Someone deletes the spool: intake cannot go on, and must not pretend to.
        await asyncio.to_thread(shutil.rmtree, tmp_path / "spool")
        async with asyncio.timeout(30):
            code = await task
    assert code == EXIT_SOFTWARE
    died = [e for e in logs if e["event"] == "task_died"]
    assert [e["task"] for e in died] == ["intake"]
    assert "FileNotFoundError" in died[0]["error"]
    assert any(e["event"] == "daemon_stopped" for e in logs)


async def test_stop_returns_0_and_closes_everything(emulator: Emulator, tmp_path: Path) -> None:
    daemon = spool_daemon(settings_for(emulator, tmp_path), clock=emulator.clock)
    task = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    daemon.stop()
    daemon.stop()  # idempotent
    async with asyncio.timeout(30):
        assert await task == EXIT_OK
    assert daemon.journal is not None
    with pytest.raises(RuntimeError):
        await daemon.journal.get("anything")  # closed


async def test_a_job_that_crashes_fails_visibly_and_the_daemon_goes_on(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    daemon = spool_daemon(settings_for(emulator, tmp_path), clock=emulator.clock)
    calls = 0
    original = daemon.engine.run

    async def flaky(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ZeroDivisionError("a bug")
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon.engine, "run", flaky)
    task = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    incoming = tmp_path / "spool" / "incoming"
    for n in range(2):
        (incoming / f".j{n}.tmp").write_bytes(good_job(dataset, n, id=f"j{n}"))
        (incoming / f".j{n}.tmp").rename(incoming / f"j{n}.json")
    async with asyncio.timeout(60), daemon.filed:
        await daemon.filed.wait_for(lambda: daemon.counts.filed >= 2)
    daemon.stop()
    async with asyncio.timeout(30):
        assert await task == EXIT_OK
    failed = list((tmp_path / "spool" / "failed").glob("*.result.json"))
    done = list((tmp_path / "spool" / "done").glob("*.result.json"))
    assert len(failed) == 1
    assert len(done) == 1
    assert "internal error: ZeroDivisionError('a bug')" in failed[0].read_text()
    assert JobState.FAILED.value in failed[0].read_text()


async def test_a_job_task_that_dies_stops_the_daemon_with_70(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a crash of the export (that fails the job) but of the daemon's own bookkeeping
    after it: the job's task must not end dead and unnoticed."""
    (dataset,) = await emulator.seed(rows=5)
    daemon = spool_daemon(settings_for(emulator, tmp_path), clock=emulator.clock)

    async def broken(*args: object) -> None:
        raise KeyError("a bug in writing the outcome")

    monkeypatch.setattr(daemon.runner, "_complete", broken)
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await daemon.ready.wait()
        incoming = tmp_path / "spool" / "incoming"
        (incoming / ".j.tmp").write_bytes(good_job(dataset, 1, id="j1"))
        (incoming / ".j.tmp").rename(incoming / "j1.json")
        async with asyncio.timeout(60):
            code = await task
    assert code == EXIT_SOFTWARE
    died = [e for e in logs if e["event"] == "task_died"]
    assert [e["task"] for e in died] == ["job:j1"]
    assert "a bug in writing the outcome" in died[0]["error"]
    assert daemon.health.dead == ["job:j1"]
