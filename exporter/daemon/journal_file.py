"""The journal's SQLite file: its schema, how it is opened (WAL, `synchronous=FULL`) and
checked, and what an operator does when it is corrupt. `Journal` works on it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from exporter.errors import ExporterError

log = structlog.get_logger("exporter.daemon")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    state      TEXT NOT NULL,
    flow_id    TEXT,
    run_id     TEXT,
    intent_ms  INTEGER,
    outcome    TEXT,
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created, job_id);
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    state  TEXT NOT NULL,
    at     REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS schedule_slots (
    schedule TEXT PRIMARY KEY,
    slot     REAL NOT NULL,  -- the latest slot fired or skipped, epoch seconds
    updated  REAL NOT NULL
);
"""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    else:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            # Before the first table: a new journal gives pages back to the file system.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            raise
    conn.row_factory = sqlite3.Row
    return conn


class Corrupt(ExporterError):
    """The journal file is not a usable SQLite database: restarting cannot mend it."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"the journal {path} is corrupt: {detail}")
        self.path = path
        self.detail = detail

    @property
    def recovery(self) -> str:
        """What an operator does about it, and what that loses."""
        p = self.path
        return (
            f"stop the daemon; move {p} aside (with {p.name}-wal and {p.name}-shm beside it, "
            f"if present), e.g. `mv {p} {p}.corrupt`; `sqlite3 {p}.corrupt .recover` may "
            "salvage its rows. Then start the daemon: it makes a new, empty journal. Lost: the "
            "record of finished jobs (their result files stay in done/, failed/, rejected/), so "
            "their job ids can be exported again; each schedule's last slot (missed slots are "
            "judged by misfire_grace_s); and the progress of unfinished jobs: their files in "
            "processing/ are admitted again as new jobs, and a run AEP already started for one "
            "is not resumed but a new one triggered"
        )


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:
        raise Corrupt(path, str(exc)) from None
    if verdict != "ok":
        raise Corrupt(path, str(verdict))


def vacuum_incrementally(conn: sqlite3.Connection) -> None:
    """A journal made before auto_vacuum was set is rebuilt once so that pruning shrinks it;
    on a full disk that waits for the next start."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the copy VACUUM logged
    except sqlite3.OperationalError as exc:
        log.warning("journal_vacuum_postponed", error=str(exc))
