"""The spool directory: how job files arrive, are claimed, and leave with their result.

    incoming/    writers drop *.json, *.yaml, *.toml (dot-files and *.tmp wait to be renamed)
    processing/  claimed by an atomic rename; the journal says how far each one got
    done/ failed/ rejected/   the job file, and beside it <name>.result.json

Every file that enters leaves with a result a person can act on, however broken it is.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from exporter.clock import Clock, SystemClock, sleep_or_wake
from exporter.daemon.admission import Admission, Admissions, already_submitted, until_one_ends
from exporter.daemon.journal import JobRecord
from exporter.daemon.storage import RETRY
from exporter.engine.engine import Progress
from exporter.jobs import JobState, Outcome, Parsed, Rejected, parse_job
from exporter.retry import Retrying, retry

log = structlog.get_logger("exporter.daemon")
SOURCE = "spool"  # kept in the journal: never renamed

FOLDERS = ("incoming", "processing", "done", "failed", "rejected")
SUFFIXES = (".json", ".yaml", ".yml", ".toml")
RESULT_SUFFIX = ".result.json"
OUTCOME_FOLDER = {JobState.SUCCEEDED: "done", JobState.REJECTED: "rejected"}
# Failures of the machine, not of the file: reading again later works (the daemon retries).
TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN})


class Spool:
    def __init__(self, root: Path, *, max_bytes: int, clock: Clock | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.clock = clock or SystemClock()  # stamps a result's finished_at
        self.dirs = {name: root / name for name in FOLDERS}

    def ensure(self) -> None:
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)

    def waiting(self, limit: int) -> list[Path]:
        """Up to `limit` files ready in incoming/, oldest first."""
        found: list[tuple[float, str, Path]] = []
        with os.scandir(self.dirs["incoming"]) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".tmp"):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                found.append((mtime, name, Path(entry.path)))
        found.sort()
        return [p for _, _, p in found[:limit]]

    def claim(self, path: Path) -> Path | None:
        """Move a file to processing/ (atomically); None if someone else took it first."""
        target = self._free(self.dirs["processing"], path.name)
        try:
            path.rename(target)
        except FileNotFoundError:
            return None
        return target

    def processing(self) -> list[Path]:
        return sorted(
            p
            for p in self.dirs["processing"].iterdir()
            if not p.name.startswith(".") and not p.name.endswith(RESULT_SUFFIX)
        )

    def read(self, path: Path, destinations: Mapping[str, object]) -> Parsed:
        """Parse a claimed file; raises `Rejected` for anything that is not a usable job."""
        if path.suffix.lower() not in SUFFIXES:
            raise Rejected(
                f"unsupported file type {path.suffix or '(none)'!r}: name job files "
                "*.json, *.yaml, *.yml or *.toml"
            )
        try:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = path.readlink()
                raise Rejected(
                    f"a symbolic link (to {target}); job files must be regular files "
                    "inside the spool"
                )
            if not stat.S_ISREG(info.st_mode):
                kind = (
                    "a directory"
                    if stat.S_ISDIR(info.st_mode)
                    else "a FIFO"
                    if stat.S_ISFIFO(info.st_mode)
                    else "a special file"
                )
                raise Rejected(f"{kind}, not a regular file: job files must be regular files")
            if info.st_size > self.max_bytes:
                raise Rejected(
                    f"{info.st_size} bytes is too large; the limit is {self.max_bytes} bytes"
                )
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                raw = handle.read(self.max_bytes + 1)
        except OSError as exc:
            if exc.errno in TRANSIENT:
                raise
            raise Rejected(f"cannot read the file: {exc.strerror}") from None
        if len(raw) > self.max_bytes:
            raise Rejected(f"larger than the limit of {self.max_bytes} bytes")
        return parse_job(path.name, raw, destinations)

    def finish(self, path: Path, outcome: Outcome, *, name: str | None = None) -> Path:
        """Write the result beside the job in its outcome folder and move the job there.
        Safe to repeat after a crash between the two steps."""
        folder = self.dirs[OUTCOME_FOLDER.get(outcome.state, "failed")]
        name = name or path.name
        target = folder / name
        if not ((folder / f"{name}{RESULT_SUFFIX}").exists() and not target.exists()):
            # (A result without its job is a finish that stopped half-way: complete it.)
            target = self._free(folder, name)
        result = {
            **outcome.model_dump(mode="json"),
            "file": path.name,
            "finished_at": datetime.fromtimestamp(self.clock.time(), UTC).isoformat(
                timespec="seconds"
            ),
        }
        tmp = folder / f".{target.name}{RESULT_SUFFIX}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(folder / f"{target.name}{RESULT_SUFFIX}")
        if path.exists() or path.is_symlink():
            path.rename(target)
        return target

    @staticmethod
    def _free(folder: Path, name: str) -> Path:
        """`name` in `folder`, or `name` with a counter when that is taken."""
        candidate = folder / name
        stem, suffix = Path(name).stem, Path(name).suffix
        n = 1
        while (
            candidate.exists()
            or candidate.is_symlink()
            or (folder / f"{candidate.name}{RESULT_SUFFIX}").exists()
        ):
            n += 1
            candidate = folder / f"{stem}.{n}{suffix}"
        return candidate


# -- the service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolFile:
    """A job file in processing/: its result is filed beside it in done/ or failed/."""

    spool: Spool
    path: Path
    source: str = SOURCE

    @property
    def name(self) -> str:
        return self.path.name

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        return None

    async def settle(self, outcome: Outcome) -> None:
        await asyncio.to_thread(self.spool.finish, self.path, outcome)


class SpoolIntake:
    """The daemon's service for the spool directory: job files are claimed as room allows
    (backpressure: the rest wait in incoming/, unread), on inotify events and on a
    periodic rescan, and leave with their result."""

    name = "intake"  # (the supervised task's name, as /healthz reports a death)
    sources = (SOURCE,)

    def __init__(self, admissions: Admissions) -> None:
        self.admissions = admissions
        config = admissions.settings.daemon
        self.spool = Spool(
            config.spool_dir, max_bytes=config.max_job_file_bytes, clock=admissions.clock
        )
        self.claimed = 0
        self._wake = asyncio.Event()
        admissions.on_room(self._wake)

    async def start(self) -> None:
        # Only what waiting can cure: a folder that cannot be made is exit 1 with its traceback.
        await self.admissions.persist(
            lambda: asyncio.to_thread(self.spool.ensure), "intake", only_transient=True
        )

    async def recover(self, records: list[JobRecord]) -> None:
        """Resume the spool's unfinished jobs; finish what a crash left half-filed."""
        by_name = {record.name: record for record in records}
        for path in await asyncio.to_thread(self.spool.processing):
            found = by_name.pop(path.name, None)
            if found is not None:
                self.admissions.resume(found, SpoolFile(self.spool, path))
            else:  # claimed but not journaled, or finished but not filed
                await self._admit(path, recovering=True)
        for record in by_name.values():
            log.warning("job_file_missing", job_id=record.job_id, file=record.name)
            path = self.spool.dirs["processing"] / record.name
            self.admissions.resume(record, SpoolFile(self.spool, path))

    async def run(self) -> None:
        watch = self.admissions.settings.daemon.watch
        log.info("spool_intake_started", spool=str(self.spool.root), watch=watch)
        tasks = {asyncio.create_task(self._intake(), name="spool-intake")}
        if watch:
            tasks.add(asyncio.create_task(self._watch(), name="spool-watcher"))
        await until_one_ends(tasks)  # a task's error is the service's
        raise RuntimeError("the spool intake stopped")

    async def close(self) -> None:
        return None

    async def _watch(self) -> None:
        import watchfiles  # (only the daemon watches: the one-shot path does without)

        try:
            async for _ in watchfiles.awatch(
                self.spool.dirs["incoming"], recursive=False, debounce=50, step=20
            ):
                self._wake.set()
        except (OSError, RuntimeError) as exc:
            rescan_s = self.admissions.settings.daemon.rescan_s
            log.warning("spool_watch_unavailable", error=str(exc), rescan_s=rescan_s)
        await asyncio.Event().wait()  # rescans suffice

    async def _intake(self) -> None:
        admissions = self.admissions
        incoming = self.spool.dirs["incoming"]
        gone = False  # the spool folder itself vanished: waiting will not bring it back

        async def attempt() -> None:
            nonlocal gone
            try:
                await self._intake_once()
            except OSError:  # EMFILE, ENOSPC, EIO: the machine's trouble, not a file's
                gone = not await asyncio.to_thread(incoming.is_dir)
                raise

        failures = 0

        def failed(retrying: Retrying) -> None:
            nonlocal failures
            failures = retrying.attempt
            admissions.faults.failed("intake", retrying.error)
            log.warning(
                "intake_failed",
                error=f"{type(retrying.error).__name__}: {retrying.error}",
                attempt=retrying.attempt,
                retry_in_s=round(retrying.delay, 3),
            )

        while True:
            await retry(
                attempt,
                policy=RETRY,
                clock=admissions.clock,
                rng=admissions.rng,
                retryable=lambda exc: isinstance(exc, OSError) and not gone,
                on_retry=failed,
            )
            if failures:
                log.info("intake_recovered", attempts=failures)
                failures = 0
            admissions.faults.worked("intake")
            self._wake.clear()
            rescan_s = admissions.settings.daemon.rescan_s
            await sleep_or_wake(admissions.clock, rescan_s, self._wake)

    async def _intake_once(self) -> None:
        room = self.admissions.room
        if room > 0:
            for path in await asyncio.to_thread(self.spool.waiting, room):
                claimed = await asyncio.to_thread(self.spool.claim, path)
                if claimed is not None:
                    self.claimed += 1
                    await self._admit(claimed)

    async def _admit(self, path: Path, *, recovering: bool = False) -> None:
        """A claimed file becomes a journaled job in flight, or a rejection. `recovering`:
        the file was in processing/ at start, where a crash may have left a job of ours."""
        admissions = self.admissions
        origin = SpoolFile(self.spool, path)
        try:
            parsed: Parsed = await admissions.persist(
                lambda: asyncio.to_thread(self.spool.read, path, admissions.settings.destinations),
                "intake",
                file=path.name,
            )
        except Rejected as exc:
            await admissions.reject(origin, str(exc))
            return
        except Exception as exc:  # one poisonous file must not stop intake (nor every restart)
            log.exception("job_file_unreadable", file=path.name)
            await admissions.reject(origin, f"internal error reading the job file: {exc!r}")
            return
        job = parsed.job
        # Claimed: its admission waits out a full disk rather than leave it in processing/.
        admitted = await admissions.persist(
            lambda: admissions.submit(job, parsed.spec, origin), "journal", job_id=job.job_id
        )
        if admitted.result is Admission.STARTED:
            return
        known = admitted.record
        ours = recovering and known is not None and known.name == path.name
        if ours and known is not None and not known.terminal:
            admissions.resume(known, origin)  # our own claim, journaled before a crash
        elif ours and known is not None and known.outcome is not None:
            # Finished before a crash, not yet filed: file the outcome it has. Only at start:
            # a file dropped again later is a new request, never answered with an old result.
            await admissions.settle(origin, Outcome.model_validate(known.outcome))
        else:
            await admissions.reject(origin, already_submitted(job.job_id, known))
