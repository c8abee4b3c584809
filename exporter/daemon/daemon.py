"""`aep-exporter run`: the daemon, built from named, supervised background tasks.

    intake   claims job files from the spool as capacity allows (backpressure: the rest
             wait in incoming/, unread), on inotify events and on a periodic rescan
    watcher  turns inotify events into wake-ups for intake (optional: rescans suffice)
    poller   the engine's shared run poller
    job:*    one task per job in flight, from claim to result file

If intake, watcher or poller dies, the daemon says so and stops rather than run
half-alive. On stop: intake stops, jobs are cancelled at their next wait (their journal
says where they were), requests already on the wire may finish within the grace period,
the session is closed; runs still going on in AEP are resumed at the next start.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from exporter.aepclient import HttpAep
from exporter.clock import Clock
from exporter.daemon.journal import JobRecord, Journal
from exporter.daemon.spool import Parsed, Rejected, Spool
from exporter.engine import Engine, Progress
from exporter.jobs import TERMINAL, Job, JobState, Outcome
from exporter.settings import Settings

log = structlog.get_logger("exporter.daemon")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_SOFTWARE = 70  # a supervised task died


@dataclass
class Counts:
    claimed: int = 0
    finished: int = 0
    rejected: int = 0
    filed: int = 0  # job files moved out of processing/ with their result


class Daemon:
    def __init__(self, settings: Settings, *, clock: Clock, api: HttpAep | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.api = api or HttpAep.from_config(settings.aep, clock=clock)
        self.engine = Engine(
            self.api,
            settings.destinations,
            settings.engine,
            org_id=settings.aep.org_id,
            sandbox=settings.aep.sandbox,
            clock=clock,
        )
        config = settings.daemon
        self.spool = Spool(config.spool_dir, max_bytes=config.max_job_file_bytes)
        self.journal: Journal | None = None
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.counts = Counts()
        self.ready = asyncio.Event()
        self.filed = asyncio.Condition()
        """Notified after each job file is filed with its result (`counts.filed`)."""
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._exit = EXIT_OK

    # -- life cycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to stop (idempotent); `run()` then returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> int:
        """Recover, serve until `stop()`, shut down; returns the process exit code."""
        config = self.settings.daemon
        await asyncio.to_thread(self.spool.ensure)
        self.journal = await Journal.open(config.state_dir)
        self.engine.start()
        supervised: dict[str, asyncio.Task[None]] = {}
        try:
            await self._recover()
            supervised["intake"] = asyncio.create_task(self._intake(), name="intake")
            if config.watch:
                supervised["watcher"] = asyncio.create_task(self._watch(), name="watcher")
            poller = self.engine.poller_task
            assert poller is not None
            supervised["poller"] = poller
            log.info(
                "daemon_ready",
                spool=str(self.spool.root),
                state=str(config.state_dir),
                resumed=len(self.jobs),
                max_in_flight=config.max_in_flight,
            )
            self.ready.set()
            await self._supervise(supervised)
        finally:
            await self._shutdown(supervised)
        return self._exit

    async def _supervise(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {stopping, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        for name, task in tasks.items():
            if task in done:
                error = None if task.cancelled() else task.exception()
                log.error(
                    "task_died",
                    task=name,
                    error=repr(error),
                    exc_info=error if error is not None else False,
                )
                self._exit = EXIT_SOFTWARE

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        log.info("daemon_stopping", jobs_in_flight=len(self.jobs))
        for task in tasks.values():
            task.cancel()
        for task in self.jobs.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), *self.jobs.values(), return_exceptions=True)
        left = await self.api.transport.drain(self.settings.daemon.shutdown_grace_s)
        await self.engine.stop()
        await self.api.aclose()
        if self.journal is not None:
            await self.journal.close()
        log.info("daemon_stopped", requests_abandoned=left)

    # -- intake ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        import watchfiles

        try:
            async for _ in watchfiles.awatch(
                self.spool.dirs["incoming"],
                recursive=False,
                stop_event=self._stopping,
                debounce=50,
                step=20,
            ):
                self._wake.set()
        except (OSError, RuntimeError) as exc:
            log.warning(
                "spool_watch_unavailable", error=str(exc), rescan_s=self.settings.daemon.rescan_s
            )
            await self._stopping.wait()

    async def _intake(self) -> None:
        config = self.settings.daemon
        while True:
            room = config.max_in_flight - len(self.jobs)
            if room > 0:
                for path in await asyncio.to_thread(self.spool.waiting, room):
                    claimed = await asyncio.to_thread(self.spool.claim, path)
                    if claimed is not None:
                        self.counts.claimed += 1
                        await self._admit(claimed)
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(config.rescan_s))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    async def _admit(self, path: Path) -> None:
        """A claimed file becomes a journaled job in flight, or a rejection."""
        assert self.journal is not None
        try:
            parsed: Parsed = await asyncio.to_thread(
                self.spool.read, path, self.settings.destinations
            )
        except Rejected as exc:
            await self._reject(path, str(exc))
            return
        except Exception as exc:  # one poisonous file must not stop intake (nor every restart)
            log.exception("job_file_unreadable", file=path.name)
            await self._reject(path, f"internal error reading the job file: {exc!r}")
            return
        job = parsed.job
        added = await self.journal.add(job.job_id, source="spool", name=path.name, spec=parsed.spec)
        if not added:
            known = await self.journal.get(job.job_id)
            if known is not None and known.name == path.name and not known.terminal:
                added = True  # our own claim, journaled before a crash
            elif known is not None and known.name == path.name:
                await self._file_result(path, Outcome.model_validate(known.outcome))
                return
            else:
                state = known.state.value if known else "unknown"
                await self._reject(
                    path,
                    f"job id {job.job_id!r} was already submitted (as "
                    f"{known.name if known else '?'}, now {state}); a job id "
                    "runs once: give the new job another id",
                )
                return
        self._start(job, path, None)

    async def _reject(self, path: Path, reason: str) -> None:
        assert self.journal is not None
        outcome = Outcome(job_id=f"rejected:{path.name}", state=JobState.REJECTED, message=reason)
        log.warning("job_rejected", file=path.name, reason=reason)
        self.counts.rejected += 1
        await self.journal.add(
            f"{outcome.job_id}:{uuid.uuid4().hex[:8]}",
            source="spool",
            name=path.name,
            spec={},
            state=JobState.REJECTED,
            outcome=outcome,
        )
        await self._file_result(path, outcome)

    # -- jobs ------------------------------------------------------------------------------

    def _start(self, job: Job, path: Path, resume: Progress | None) -> None:
        task = asyncio.create_task(self._work(job, path, resume), name=f"job:{job.job_id}")
        self.jobs[job.job_id] = task
        task.add_done_callback(lambda _: self._done(job.job_id))

    def _done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._wake.set()

    async def _work(self, job: Job, path: Path, resume: Progress | None) -> None:
        journal = self.journal
        assert journal is not None

        async def on_state(progress: Progress) -> None:
            if progress.state in TERMINAL:
                return
            await journal.advance(
                job.job_id,
                progress.state,
                flow_id=progress.flow_id,
                run_id=progress.run_id,
                intent_ms=progress.intent_ms,
                detail=progress.detail,
            )

        try:
            outcome = await self.engine.run(job, on_state, resume=resume)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must end the job visibly, not leave it hanging
            log.exception("job_crashed", job_id=job.job_id)
            outcome = Outcome(
                job_id=job.job_id, state=JobState.FAILED, message=f"internal error: {exc!r}"
            )
        # The outcome is written whole even if a stop arrives meanwhile.
        await asyncio.shield(self._complete(path, outcome))

    async def _complete(self, path: Path, outcome: Outcome) -> None:
        assert self.journal is not None
        await self.journal.finish(outcome)
        await self._file_result(path, outcome)
        self.counts.finished += 1
        log.info(
            "job_finished",
            job_id=outcome.job_id,
            state=outcome.state.value,
            flow_id=outcome.flow_id,
            run_id=outcome.run_id,
            files=outcome.files,
            records=outcome.records,
            bytes=outcome.bytes,
            duration_s=outcome.duration_s,
            partial=outcome.partial,
            message=outcome.message,
            errors=[e.model_dump() for e in outcome.errors],
        )

    async def _file_result(self, path: Path, outcome: Outcome) -> None:
        await asyncio.to_thread(self.spool.finish, path, outcome)
        self.counts.filed += 1
        async with self.filed:
            self.filed.notify_all()

    # -- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Resume every unfinished job; finish what a crash left half-filed."""
        assert self.journal is not None
        unfinished = {r.job_id: r for r in await self.journal.unfinished()}
        by_name = {r.name: r for r in unfinished.values()}
        for path in await asyncio.to_thread(self.spool.processing):
            record = by_name.pop(path.name, None)
            if record is not None:
                self._resume(record, path)
            else:
                await self._admit(path)  # claimed but not journaled, or finished but not filed
        for record in by_name.values():
            log.warning("job_file_missing", job_id=record.job_id, file=record.name)
            self._resume(record, self.spool.dirs["processing"] / record.name)

    def _resume(self, record: JobRecord, path: Path) -> None:
        job = Job.model_validate(record.spec)
        progress = Progress(
            record.state, flow_id=record.flow_id, run_id=record.run_id, intent_ms=record.intent_ms
        )
        log.info(
            "job_resumed",
            job_id=record.job_id,
            state=record.state.value,
            flow_id=record.flow_id,
            run_id=record.run_id,
        )
        self._start(job, path, progress)
