"""A full disk, on a small tmpfs each test mounts for its state and spool: the daemon neither
dies nor loses a job, /readyz says 503 while writes fail, and once space is freed every job
finishes with its result file. A failing spool scan (EMFILE) is waited out the same way."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.clock import FakeClock
from exporter.daemon.core import EXIT_OK
from exporter.daemon.storage import transient
from exporter.jobs import JobState
from exporter.sources.spool import RESULT_SUFFIX
from tests.conftest import Emulator
from tests.daemon_support import intake_of, spool_daemon, spool_of
from tests.test_admin import Admin, admin_daemon, ticking
from tests.test_daemon_intake import good_job, running, settings_for

DEADLINE = 30.0  # real seconds: a bound on a wait, never a sleep
WEEK_S = 7 * 86400


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: small enough to fill in a moment."""
    where = tmp_path / "disk"
    where.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount(8) here to mount a small tmpfs to fill")
    mounted = subprocess.run(  # noqa: S603 - fixed arguments
        [mount, "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:  # CI runs as root, where this works
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run([umount, "-l", str(where)], check=True)  # noqa: S603 - fixed arguments


@contextmanager
def full(disk: Path) -> Iterator[None]:
    """The file system of `disk` full to the last byte until the block ends."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (65536, 1024, 1):
            with pytest.raises(OSError, match="No space left"):  # noqa: PT012 - until it fails
                while True:
                    out.write(b"\0" * chunk)
    try:
        with pytest.raises(OSError, match="No space left"):
            (disk / "probe").write_bytes(b"x" * 4096)
        yield
    finally:
        filler.unlink()


async def readyz(admin: Admin) -> tuple[int, dict[str, Any]]:
    answer = await admin.call("GET", "/readyz", token=None)
    return answer.status, answer.body


async def until_readyz(admin: Admin, status: int) -> dict[str, Any]:
    """Ask /readyz until it answers `status`; pauses pass on the fake clock."""
    async with asyncio.timeout(DEADLINE):
        while True:
            code, body = await readyz(admin)
            if code == status:
                return body
            assert not admin.task.done(), "the daemon stopped"
            await admin.clock.sleep(0.5)


@asynccontextmanager
async def on_disk(emulator: Emulator, disk: Path) -> AsyncIterator[Admin]:
    async with admin_daemon(emulator, disk, max_in_flight=10) as admin, ticking(admin.clock):
        yield admin


async def test_a_full_disk_loses_no_job_and_readiness_says_so(
    emulator: Emulator, disk: Path
) -> None:
    datasets = await emulator.seed(rows=9, count=4)
    with capture_logs() as logs:
        async with on_disk(emulator, disk) as admin:
            daemon = admin.daemon
            spool = spool_of(daemon)
            staging = disk / "spool" / "staging"
            staging.mkdir()
            names = [f"job-{n}.json" for n in range(4)]
            for n, name in enumerate(names):
                (staging / name).write_bytes(good_job(datasets[n], n, timeout=WEEK_S))
            assert (await readyz(admin))[0] == 200

            # Two jobs start while there is room; the disk fills under them; two more are
            # dropped (renamed in: no space needed) onto the full disk.
            for name in names[:2]:
                (staging / name).rename(spool.dirs["incoming"] / name)
            async with asyncio.timeout(DEADLINE):
                while intake_of(daemon).claimed < 2:
                    await admin.clock.sleep(0.1)
            with full(disk):
                for name in names[2:]:
                    (staging / name).rename(spool.dirs["incoming"] / name)
                body = await until_readyz(admin, 503)
                assert "failed (Unwritable" in body["checks"]["journal"]
                # Alive, nothing filed, nothing lost: every job is in processing/ or incoming/.
                assert (await admin.call("GET", "/healthz", token=None)).status == 200
                assert not admin.task.done()
                waiting = {p.name for p in spool.dirs["processing"].iterdir()} | {
                    p.name for p in spool.dirs["incoming"].iterdir()
                }
                assert set(names) <= waiting
                assert daemon.counts.filed == 0
                assert daemon.faults.describe() is not None
            # Space freed: the retries go through without a restart.
            async with asyncio.timeout(DEADLINE), daemon.filed:
                await daemon.filed.wait_for(lambda: daemon.counts.filed >= len(names))
            await until_readyz(admin, 200)
            assert daemon.faults.describe() is None
            for name in names:
                result = json.loads((spool.dirs["done"] / f"{name}{RESULT_SUFFIX}").read_text())
                assert result["state"] == "succeeded", result
                assert result["records"] == 9
            assert list(spool.dirs["processing"].iterdir()) == []
            assert not admin.task.done()
    failed = [e for e in logs if e["event"] == "storage_write_failed"]
    assert failed, "no write failed: the disk was not full where it mattered"
    assert {e["operation"] for e in failed} <= {"journal", "result"}
    assert all("No space left" in e["error"] or "disk is full" in e["error"] for e in failed)
    assert any(e["event"] == "storage_write_recovered" for e in logs)
    assert not [e for e in logs if e["event"] == "task_died"]


async def until_logged(logs: list[MutableMapping[str, Any]], event: str, clock: FakeClock) -> None:
    async with asyncio.timeout(DEADLINE):
        while not any(e["event"] == event for e in logs):
            await clock.sleep(0.5)


async def test_the_daemon_starts_on_a_full_disk_and_goes_on_once_freed(
    emulator: Emulator, disk: Path
) -> None:
    """A journal that cannot even be created: the start waits rather than exit and loop."""
    (dataset,) = await emulator.seed(rows=3)
    staged = disk / "job.json"
    staged.write_bytes(good_job(dataset, 1, timeout=WEEK_S))
    daemon = spool_daemon(settings_for(emulator, disk), clock=emulator.clock)
    with capture_logs() as logs:
        with full(disk):
            task = asyncio.create_task(daemon.run())
            await until_logged(logs, "storage_write_failed", emulator.clock)
            assert not task.done()
            assert not daemon.ready.is_set()
        async with asyncio.timeout(DEADLINE):
            await daemon.ready.wait()
        staged.rename(spool_of(daemon).dirs["incoming"] / "job.json")
        async with asyncio.timeout(DEADLINE), daemon.filed:
            await daemon.filed.wait_for(lambda: daemon.counts.filed >= 1)
        daemon.stop()
        async with asyncio.timeout(DEADLINE):
            assert await task == EXIT_OK
    failed = [e for e in logs if e["event"] == "storage_write_failed"]
    assert {e["operation"] for e in failed} == {"journal"}
    result = json.loads((spool_of(daemon).dirs["done"] / f"job.json{RESULT_SUFFIX}").read_text())
    assert result["state"] == "succeeded"


async def test_a_stop_while_waiting_for_space_at_start_exits_0(
    emulator: Emulator, disk: Path
) -> None:
    daemon = spool_daemon(settings_for(emulator, disk), clock=emulator.clock)
    with capture_logs() as logs, full(disk):
        task = asyncio.create_task(daemon.run())
        await until_logged(logs, "storage_write_failed", emulator.clock)
        daemon.stop()
        async with asyncio.timeout(DEADLINE):
            assert await task == EXIT_OK
    assert not daemon.ready.is_set()


async def test_a_spool_scan_failing_with_emfile_is_retried_not_fatal(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dataset,) = await emulator.seed(rows=4)
    with capture_logs() as logs:
        async with running(emulator, tmp_path) as run:
            waiting = run.spool.waiting
            failures = 3

            def scarce(limit: int) -> list[Path]:
                nonlocal failures
                if failures:
                    failures -= 1
                    raise OSError(errno.EMFILE, "Too many open files")
                return waiting(limit)

            monkeypatch.setattr(run.spool, "waiting", scarce)
            run.drop("after.json", good_job(dataset, 1))
            await run.filed(1)
            assert run.result("done", "after.json")["state"] == "succeeded"
            assert not run.task.done()
            errors = run.daemon.metrics.registry.get_sample_value(
                "aep_exporter_storage_errors_total", {"operation": "intake"}
            )
            assert errors == 3
            assert run.daemon.faults.describe() is None
    failed = [e for e in logs if e["event"] == "intake_failed"]
    assert len(failed) == 3
    assert "Too many open files" in failed[0]["error"]
    assert any(e["event"] == "intake_recovered" for e in logs)


async def test_a_stop_while_an_outcome_cannot_be_written_ends_in_time_and_loses_nothing(
    emulator: Emulator, disk: Path
) -> None:
    """The unwritten outcome is abandoned after the grace period; the next start, with space
    again, files it without exporting a second time."""
    (dataset,) = await emulator.seed(rows=6)
    settings = settings_for(emulator, disk)
    daemon = spool_daemon(settings, clock=emulator.clock)
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        async with asyncio.timeout(DEADLINE):
            await daemon.ready.wait()
        incoming = spool_of(daemon).dirs["incoming"]
        (disk / "spool" / "staged.json").write_bytes(good_job(dataset, 1, id="stuck"))
        (disk / "spool" / "staged.json").rename(incoming / "stuck.json")
        journal = daemon.journal
        assert journal is not None
        async with asyncio.timeout(DEADLINE):
            while (record := await journal.get("stuck")) is None or (
                record.state is not JobState.RUNNING
            ):
                await emulator.clock.sleep(0.05)
        with full(disk):  # (filled without yielding to the loop: the job is still running)
            await until_logged(logs, "storage_write_failed", emulator.clock)
            assert daemon.counts.filed == 0
            daemon.stop()
            async with asyncio.timeout(DEADLINE):
                assert await task == EXIT_OK
            assert (spool_of(daemon).dirs["processing"] / "stuck.json").exists()
    failed = [e for e in logs if e["event"] == "storage_write_failed"]
    assert {e["operation"] for e in failed} <= {"journal", "result"}
    assert all(e["job_id"] == "stuck" for e in failed)
    (unwritten,) = [e for e in logs if e["event"] == "outcomes_unwritten"]
    assert unwritten["jobs"] == 1

    again = spool_daemon(settings, clock=emulator.clock)
    task = asyncio.create_task(again.run())
    async with asyncio.timeout(DEADLINE), again.filed:
        await again.filed.wait_for(lambda: again.counts.filed >= 1)
    again.stop()
    async with asyncio.timeout(DEADLINE):
        assert await task == EXIT_OK
    result = json.loads((spool_of(again).dirs["done"] / f"stuck.json{RESULT_SUFFIX}").read_text())
    assert result["state"] == "succeeded"
    assert len(list(emulator.state.all_runs())) == 1


async def test_a_state_folder_that_cannot_be_made_fails_the_start_at_once(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Waiting cures a full disk, not a path through a file: that start fails (exit 1)."""
    (tmp_path / "state").write_text("a file where the state folder should be")
    daemon = spool_daemon(settings_for(emulator, tmp_path), clock=emulator.clock)
    with pytest.raises(OSError, match=r"exists|Not a directory"):
        async with asyncio.timeout(DEADLINE):
            await daemon.run()


def test_only_what_waiting_can_cure_is_transient() -> None:
    assert transient(OSError(errno.ENOSPC, "No space left on device"))
    assert transient(OSError(errno.EMFILE, "Too many open files"))
    assert not transient(PermissionError(errno.EACCES, "Permission denied"))
    full_db = sqlite3.OperationalError("database or disk is full")
    full_db.sqlite_errorcode = 13
    assert transient(full_db)
    cannot_open = sqlite3.OperationalError("unable to open database file")
    cannot_open.sqlite_errorcode = 14
    assert not transient(cannot_open)
