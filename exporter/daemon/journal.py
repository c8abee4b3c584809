"""The journal: every job and every state it reached, in SQLite (WAL), in the state folder.

It is written before the action each state enables (the trigger intent before the
trigger, the run id as soon as it is known), with `synchronous=FULL`, so after a crash —
of the process or the machine — every unfinished job can be resumed from where it was.
SQLite runs in one dedicated thread; the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from exporter.clock import Clock, SystemClock
from exporter.daemon.journal_file import (
    Corrupt,
    check_integrity,
    connect,
    vacuum_incrementally,
)
from exporter.daemon.storage import Faults
from exporter.errors import ExporterError
from exporter.jobs import ORDER, TERMINAL, JobState, Outcome, check_transition

T = TypeVar("T")
log = structlog.get_logger("exporter.daemon")
FILE_NAME = "journal.sqlite3"


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    source: str
    name: str
    spec: dict[str, Any]
    state: JobState
    flow_id: str | None
    run_id: str | None
    intent_ms: int | None
    outcome: dict[str, Any] | None
    created: float
    updated: float

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            job_id=row["job_id"],
            source=row["source"],
            name=row["name"],
            spec=json.loads(row["spec"]),
            state=JobState(row["state"]),
            flow_id=row["flow_id"],
            run_id=row["run_id"],
            intent_ms=row["intent_ms"],
            outcome=json.loads(row["outcome"]) if row["outcome"] else None,
            created=row["created"],
            updated=row["updated"],
        )


class Unwritable(ExporterError):
    """The daemon's writes are failing now (a full disk): what `check_writable` raises."""


class Journal:
    """Async façade over one SQLite connection owned by a dedicated thread."""

    def __init__(
        self, path: Path, *, faults: Faults | None = None, clock: Clock | None = None
    ) -> None:
        self.path = path
        self.faults = faults
        self.clock = clock or SystemClock()  # stamps rows: what retention compares with
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(
        cls, state_dir: Path, *, faults: Faults | None = None, clock: Clock | None = None
    ) -> Journal:
        """Open (or create) the journal in `state_dir`. `faults`: the daemon's record of
        failing writes, which `check_writable` reports; `clock`: the daemon's."""
        journal = cls(state_dir / FILE_NAME, faults=faults, clock=clock)

        def start() -> sqlite3.Connection:
            state_dir.mkdir(parents=True, exist_ok=True)
            try:
                conn = connect(journal.path)
            except sqlite3.OperationalError:
                raise  # a full disk, a lock: worth waiting out
            except sqlite3.DatabaseError as exc:  # not a database, malformed
                raise Corrupt(journal.path, str(exc)) from None
            try:
                check_integrity(conn, journal.path)
                vacuum_incrementally(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            journal._conn = await journal._run(start)
        except BaseException:
            journal._executor.shutdown(wait=False)
            raise
        return journal

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the journal is closed")
        return self._conn

    async def add(
        self,
        job_id: str,
        *,
        source: str,
        name: str,
        spec: dict[str, Any],
        state: JobState = JobState.RECEIVED,
        outcome: Outcome | None = None,
    ) -> bool:
        """Record a new job; False (and nothing written) when the id is known already."""
        now = self.clock.time()

        def insert() -> bool:
            db = self._db()
            with db:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, source, name, spec, state, outcome, "
                    "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        source,
                        name,
                        json.dumps(spec),
                        state.value,
                        outcome.model_dump_json() if outcome else None,
                        now,
                        now,
                    ),
                )
                if cur.rowcount:
                    db.execute(
                        "INSERT INTO events (job_id, state, at) VALUES (?, ?, ?)",
                        (job_id, state.value, now),
                    )
                return bool(cur.rowcount)

        return await self._run(insert)

    async def get(self, job_id: str) -> JobRecord | None:
        def read() -> JobRecord | None:
            row = self._db().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else JobRecord.from_row(row)

        return await self._run(read)

    async def advance(
        self,
        job_id: str,
        state: JobState,
        *,
        flow_id: str | None = None,
        run_id: str | None = None,
        intent_ms: int | None = None,
        detail: str = "",
    ) -> None:
        """Move a job forward. Going back to a state it passed (a resumed job re-announcing
        its flow) only fills in what is new; an illegal move raises."""
        now = self.clock.time()

        def write() -> None:
            db = self._db()
            with db:
                row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise KeyError(job_id)
                current = JobState(row["state"])
                moves = (
                    ORDER.index(state) > ORDER.index(current)
                    if (state in ORDER and current in ORDER)
                    else True
                )
                if moves:
                    check_transition(current, state)
                db.execute(
                    "UPDATE jobs SET state = ?, flow_id = COALESCE(?, flow_id), "
                    "run_id = COALESCE(?, run_id), intent_ms = COALESCE(?, intent_ms), "
                    "updated = ? WHERE job_id = ?",
                    ((state if moves else current).value, flow_id, run_id, intent_ms, now, job_id),
                )
                if moves:
                    db.execute(
                        "INSERT INTO events (job_id, state, at, detail) VALUES (?,?,?,?)",
                        (job_id, state.value, now, detail),
                    )

        await self._run(write)

    async def finish(self, outcome: Outcome) -> None:
        """Record the terminal outcome; idempotent for the same outcome."""
        now = self.clock.time()

        def write() -> None:
            db = self._db()
            with db:
                row = db.execute(
                    "SELECT state FROM jobs WHERE job_id = ?", (outcome.job_id,)
                ).fetchone()
                if row is None:
                    raise KeyError(outcome.job_id)
                current = JobState(row["state"])
                if current in TERMINAL:
                    return
                check_transition(current, outcome.state)
                db.execute(
                    "UPDATE jobs SET state = ?, flow_id = COALESCE(?, flow_id), "
                    "run_id = COALESCE(?, run_id), outcome = ?, updated = ? WHERE job_id = ?",
                    (
                        outcome.state.value,
                        outcome.flow_id,
                        outcome.run_id,
                        outcome.model_dump_json(),
                        now,
                        outcome.job_id,
                    ),
                )
                db.execute(
                    "INSERT INTO events (job_id, state, at, detail) VALUES (?,?,?,?)",
                    (outcome.job_id, outcome.state.value, now, outcome.message),
                )

        await self._run(write)

    async def page(
        self,
        *,
        states: Collection[JobState] = (),
        source: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """Jobs newest first (by creation time, then id), optionally of some states and one
        source; `before` is the (created, job_id) of the last job of the previous page."""
        return await self.search(states=states, source=source, before=before, limit=limit)

    async def search(
        self,
        *,
        states: Collection[JobState] = (),
        source: str | None = None,
        destination: str | None = None,
        text: str = "",
        before: tuple[float, str] | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """`page`, also by the destination the job's spec names and by a piece of its id
        (`text`, matched literally, case-sensitive): the status page's filters."""
        where: list[str] = []
        args: list[Any] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        if source is not None:
            where.append("source = ?")
            args.append(source)
        if destination is not None:
            where.append("json_extract(spec, '$.destination') = ?")
            args.append(destination)
        if text:
            where.append("instr(job_id, ?) > 0")  # not LIKE: '%' and '_' are plain here
            args.append(text)
        if before is not None:
            where.append("(created, job_id) < (?, ?)")
            args += list(before)
        sql = (
            "SELECT * FROM jobs"  # noqa: S608 - only placeholders are interpolated
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY created DESC, job_id DESC LIMIT ?"
        )
        args.append(limit)

        def read() -> list[JobRecord]:
            return [JobRecord.from_row(r) for r in self._db().execute(sql, args).fetchall()]

        return await self._run(read)

    async def recent(self, states: Collection[JobState], *, limit: int) -> list[JobRecord]:
        """The latest jobs that ended in one of `states`, most recently updated first."""
        marks = ",".join("?" * len(states))
        sql = f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY updated DESC LIMIT ?"  # noqa: S608

        def read() -> list[JobRecord]:
            rows = self._db().execute(sql, [*(s.value for s in states), limit]).fetchall()
            return [JobRecord.from_row(r) for r in rows]

        return await self._run(read)

    async def forget(self, job_id: str, *, detail: str) -> bool:
        """Drop an unfinished job that is no longer this process's: another daemon took it
        over (Redis intake). Its events stay, with a `handed_over` one; the same id may be
        added again later. False if the job is unknown or finished."""
        now = self.clock.time()
        marks = ",".join("?" * len(TERMINAL))

        def delete() -> bool:
            db = self._db()
            with db:
                cur = db.execute(
                    f"DELETE FROM jobs WHERE job_id = ? AND state NOT IN ({marks})",  # noqa: S608
                    [job_id, *(s.value for s in TERMINAL)],
                )
                if cur.rowcount:
                    db.execute(
                        "INSERT INTO events (job_id, state, at, detail) VALUES (?, ?, ?, ?)",
                        (job_id, "handed_over", now, detail),
                    )
                return bool(cur.rowcount)

        return await self._run(delete)

    async def prune(self, *, before: float) -> int:
        """Delete finished jobs last updated before `before` (epoch seconds), and events older
        than that of jobs no longer kept; give the space back to the file system. Unfinished
        jobs are never deleted, however old. Returns how many jobs were deleted."""
        marks = ",".join("?" * len(TERMINAL))

        def delete() -> int:
            db = self._db()
            with db:
                cur = db.execute(
                    f"DELETE FROM jobs WHERE state IN ({marks}) AND updated < ?",  # noqa: S608
                    [*(s.value for s in TERMINAL), before],
                )
                gone = db.execute(
                    "DELETE FROM events WHERE at < ? AND job_id NOT IN (SELECT job_id FROM jobs)",
                    (before,),
                )
            if cur.rowcount or gone.rowcount:
                # (execute() would free one page: the pragma frees one per step; executescript
                # steps it to the end.)
                db.executescript("PRAGMA incremental_vacuum;")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return cur.rowcount

        return await self._run(delete)

    async def unfinished(self) -> list[JobRecord]:
        def read() -> list[JobRecord]:
            marks = ",".join("?" * len(TERMINAL))
            rows = (
                self._db()
                .execute(
                    f"SELECT * FROM jobs WHERE state NOT IN ({marks}) ORDER BY created",  # noqa: S608
                    [s.value for s in TERMINAL],
                )
                .fetchall()
            )
            return [JobRecord.from_row(r) for r in rows]

        return await self._run(read)

    async def schedule_slots(self) -> dict[str, float]:
        """Each schedule's latest slot handled (fired or skipped), epoch seconds."""

        def read() -> dict[str, float]:
            rows = self._db().execute("SELECT schedule, slot FROM schedule_slots")
            return {row["schedule"]: row["slot"] for row in rows}

        return await self._run(read)

    async def mark_slot(self, schedule: str, slot: float) -> None:
        """Note `slot` as handled; a later slot already noted stays."""
        now = self.clock.time()

        def write() -> None:
            with self._db() as db:
                db.execute(
                    "INSERT INTO schedule_slots (schedule, slot, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT (schedule) DO UPDATE SET slot = MAX(slot, excluded.slot), "
                    "updated = excluded.updated",
                    (schedule, slot, now),
                )

        await self._run(write)

    async def check_writable(self) -> None:
        """Raise if the journal cannot be written (a full disk, a read-only mount), or if the
        daemon's own writes are failing now: an empty transaction succeeds on a full disk."""
        failing = self.faults.describe() if self.faults is not None else None
        if failing is not None:
            raise Unwritable(failing)

        def probe() -> None:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")

        await self._run(probe)


def summary(path: Path, *, recent: int = 10) -> tuple[dict[str, int], list[JobRecord]]:
    """Counts by state and the most recent outcomes, read without disturbing a writer."""
    return jobs_matching(path, recent=recent)


def schedule_slots(path: Path) -> dict[str, float]:
    """`Journal.schedule_slots`, read without disturbing a writer (for `status`)."""
    conn = connect(path, readonly=True)
    try:
        rows = conn.execute("SELECT schedule, slot FROM schedule_slots").fetchall()
    except sqlite3.OperationalError:  # a journal written before schedules existed
        return {}
    finally:
        conn.close()
    return {row["schedule"]: row["slot"] for row in rows}


def jobs_matching(
    path: Path, *, states: Sequence[str] = (), sources: Sequence[str] = (), recent: int = 10
) -> tuple[dict[str, int], list[JobRecord]]:
    """`summary` narrowed to jobs in `states` and from `sources` (empty: any): their counts
    by state and the `recent` last updated, read without disturbing a writer."""
    where: list[str] = []
    params: list[str | int] = []
    for column, wanted in (("state", states), ("source", sources)):
        if wanted:
            where.append(f"{column} IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    conn = connect(path, readonly=True)
    try:
        counts = {
            row["state"]: row["n"]
            for row in conn.execute(
                f"SELECT state, COUNT(*) AS n FROM jobs{clause} GROUP BY state",  # noqa: S608
                params,
            )
        }
        rows = conn.execute(
            f"SELECT * FROM jobs{clause} ORDER BY updated DESC LIMIT ?",  # noqa: S608
            [*params, recent],
        )
        return counts, [JobRecord.from_row(r) for r in rows]
    finally:
        conn.close()
