"""The journal's upkeep: finished jobs past their retention are pruned and the file shrinks
(never an unfinished job), at start and periodically; a corrupt journal stops the daemon with
an exit code systemd does not restart on, and says how to recover."""

from __future__ import annotations

import asyncio
import configparser
import json
import sqlite3
import time
from pathlib import Path

from exporter.daemon.core import EXIT_DATAERR, EXIT_OK, RETAIN_EVERY_S
from exporter.daemon.journal import FILE_NAME, Journal
from exporter.daemon.journal_file import SCHEMA
from exporter.jobs import JobState, Outcome
from tests.conftest import Emulator
from tests.daemon_support import spool_daemon
from tests.test_daemon_cli import cli, write_config
from tests.test_daemon_intake import settings_for

DAY_S = 86400.0
SPEC = {"dataset_id": "ds", "destination": "lake", "path": "ml/x", "labels": {"pad": "p" * 400}}
SERVICE = Path(__file__).resolve().parents[1] / "config" / "aep-exporter.service"


def on_disk(path: Path) -> int:
    """Bytes of the journal with its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def count(path: Path, sql: str = "SELECT COUNT(*) FROM jobs") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def fill(journal: Journal, finished: int, *, updated: float) -> None:
    for n in range(finished):
        job_id = f"old-{n}"
        await journal.add(job_id, source="spool", name=f"{job_id}.json", spec=SPEC)
        await journal.finish(Outcome(job_id=job_id, state=JobState.FAILED, message="x" * 300))
    await journal._run(
        lambda: journal._db().execute("UPDATE jobs SET updated = ?", (updated,)).fetchall()
    )
    await journal._run(
        lambda: journal._db().execute("UPDATE events SET at = ?", (updated,)).fetchall()
    )


async def test_prune_deletes_old_finished_jobs_keeps_running_ones_and_shrinks_the_file(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path)
    now = time.time()
    try:
        await fill(journal, 400, updated=now - 40 * DAY_S)
        # Unfinished and as old: kept whatever its age.
        await journal.add("running-old", source="spool", name="r.json", spec=SPEC)
        await journal.advance("running-old", JobState.FLOW_READY)
        await journal._run(
            lambda: (
                journal._db()
                .execute(
                    "UPDATE jobs SET updated = ? WHERE job_id = 'running-old'", (now - 90 * DAY_S,)
                )
                .fetchall()
            )
        )
        await journal.add("recent", source="http", name="recent", spec=SPEC)
        await journal.finish(Outcome(job_id="recent", state=JobState.CANCELLED))
        await journal._run(
            lambda: journal._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        )
        path = journal.path
        size_before = on_disk(path)
        assert count(path) == 402

        pruned = await journal.prune(before=now - 30 * DAY_S)

        assert pruned == 400
        assert count(path) == 2
        assert (await journal.get("running-old")) is not None
        assert (await journal.get("recent")) is not None
        assert [r.job_id for r in await journal.unfinished()] == ["running-old"]
        assert count(path, "SELECT COUNT(*) FROM events WHERE job_id LIKE 'old-%'") == 0
        assert count(path, "SELECT COUNT(*) FROM events WHERE job_id = 'running-old'") == 2
        assert on_disk(path) < size_before / 4, (on_disk(path), size_before)
        assert await journal.prune(before=now - 30 * DAY_S) == 0
    finally:
        await journal.close()


async def test_the_daemon_prunes_at_start_and_periodically_and_shrinks_an_old_journal(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A journal made before auto_vacuum was set is rebuilt once, so pruning shrinks it."""
    settings = settings_for(emulator, tmp_path, journal_retention_days=30)
    # (Rare rescans: fake time then crosses hours in a few steps.)
    settings = settings.model_copy(
        update={"daemon": settings.daemon.model_copy(update={"rescan_s": 3600.0})}
    )
    state = settings.daemon.state_dir
    state.mkdir()
    path = state / FILE_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    journal = await Journal.open(state)
    clock_now = emulator.clock.time()
    try:
        await fill(journal, 300, updated=clock_now - 31 * DAY_S)
        await journal.add("young", source="http", name="young", spec=SPEC)
        await journal.finish(Outcome(job_id="young", state=JobState.CANCELLED))
        await journal._run(
            lambda: (
                journal._db()
                .execute(
                    "UPDATE jobs SET updated = ? WHERE job_id = 'young'",
                    (clock_now - 30 * DAY_S + 3600,),  # an hour inside its retention
                )
                .fetchall()
            )
        )
    finally:
        await journal.close()
    size_before = on_disk(path)
    daemon = spool_daemon(settings, clock=emulator.clock)
    task = asyncio.create_task(daemon.run())

    async def kept() -> list[str]:
        assert daemon.journal is not None
        return [r.job_id for r in await daemon.journal.page(limit=1000)]

    async with asyncio.timeout(20):
        await daemon.ready.wait()
        started = emulator.clock.time()
        # (Asked through the daemon's own connection: a reader of its own would hold back
        # the checkpoint that shrinks the file.)
        while len(await kept()) > 1:  # the first round runs as the daemon starts
            await emulator.clock.sleep(1)
    assert on_disk(path) < size_before / 4, (path.stat().st_size, on_disk(path), size_before)
    assert count(path, "PRAGMA auto_vacuum") == 2
    # Kept at start; past its retention an hour later, pruned at the next periodic round.
    async with asyncio.timeout(20):
        while await kept():
            await emulator.clock.sleep(600)
    assert emulator.clock.time() - clock_now > 3600
    # The next round, not the one after (however long the prune itself took on a busy machine).
    assert emulator.clock.time() - started < 2 * RETAIN_EVERY_S
    daemon.stop()
    async with asyncio.timeout(20):
        assert await task == EXIT_OK


def test_a_corrupt_journal_exits_65_with_how_to_recover_and_systemd_does_not_restart(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "[admin]\nport = 0\n")
    (tmp_path / "state").mkdir()
    journal = tmp_path / "state" / FILE_NAME
    journal.write_bytes(b"this is not an SQLite database, it is a stray log file\n" * 100)
    done = cli("run", "--config", config)
    assert done.returncode == EXIT_DATAERR == 65, done.stderr[-2000:]
    lines = [
        json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line[:1] == "{"
    ]
    (corrupt,) = [e for e in lines if e["event"] == "journal_corrupt"]
    assert str(journal) in corrupt["error"]
    assert "not a database" in corrupt["error"]
    assert f"mv {journal} {journal}.corrupt" in corrupt["recovery"]
    assert "Lost: the record of finished jobs" in corrupt["recovery"]
    assert journal.read_bytes().startswith(b"this is not")  # left as it was for inspection
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(SERVICE.read_text())
    assert "65" in unit["Service"]["RestartPreventExitStatus"].split()


async def test_a_retention_shorter_than_the_round_is_kept_to_within_a_quarter_of_itself(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A busy daemon kept an hour's jobs (0.04 days, 57.6 min) prunes every 14.4 min, not 6 h.
    settings = settings_for(emulator, tmp_path, journal_retention_days=0.04)
    settings = settings.model_copy(
        update={"daemon": settings.daemon.model_copy(update={"rescan_s": 3600.0})}
    )
    daemon = spool_daemon(settings, clock=emulator.clock)
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(20):
        await daemon.ready.wait()
    assert daemon.journal is not None
    finished_at = emulator.clock.time()
    await daemon.journal.add("done", source="http", name="done", spec=SPEC)
    await daemon.journal.finish(Outcome(job_id="done", state=JobState.CANCELLED))
    async with asyncio.timeout(20):
        while await daemon.journal.page(limit=10):
            await emulator.clock.sleep(60)
    gone_after = emulator.clock.time() - finished_at
    # Past its retention, at the next round: a quarter of the retention later at most, plus
    # the test's steps of 60 s (virtual time runs on while the prune works in its thread);
    # six hours' rounds would have kept it until 21,600 s.
    keep_s = 0.04 * DAY_S
    assert keep_s <= gone_after <= keep_s * 1.25 + 180, gone_after
    daemon.stop()
    async with asyncio.timeout(20):
        assert await task == EXIT_OK
