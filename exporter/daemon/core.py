"""`aep-exporter run`: the daemon, built from named, supervised background tasks.

    intake   claims job files from the spool as capacity allows (backpressure: the rest
             wait in incoming/, unread), on inotify events and on a periodic rescan
    watcher  turns inotify events into wake-ups for intake (optional: rescans suffice)
    poller   the engine's shared run poller
    <svc>    each service (admin server, Redis intake, scheduler, systemd notifier)
    job:*    one task per job in flight, from admission to its settled outcome

Jobs come from several sources (the spool, Redis, the admin API, schedules). Each job
carries its `Origin`: what to tell the source as the job moves (`checkpoint`) and once its
outcome is journaled (`settle`: file the result, acknowledge the message, ...).

If a supervised task dies, the daemon says so and stops rather than run half-alive. On
stop: intake stops, jobs are cancelled at their next wait (their journal says where they
were), requests already on the wire may finish within the grace period, the session is
closed; runs still going on in AEP are resumed at the next start.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from exporter.aep.client import HttpAep
from exporter.clock import Clock, sleep_or_wake
from exporter.daemon.admission import (
    Admission,
    Admitted,
    Fencing,
    Origin,
    Quiet,
    Service,
    already_submitted,
)
from exporter.daemon.journal import Corrupt, JobRecord, Journal
from exporter.daemon.reload import Reloader
from exporter.daemon.storage import RETRY, STORAGE_ERRORS, Faults, persist
from exporter.engine import Engine, Progress
from exporter.jobs import TERMINAL, Job, JobState, Outcome, Parsed, Rejected
from exporter.metrics import Metrics
from exporter.settings import Settings
from exporter.sources.spool import Spool

T = TypeVar("T")
log = structlog.get_logger("exporter.daemon")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DATAERR = 65  # the journal is corrupt: a restart cannot help (sysexits' EX_DATAERR)
EXIT_SOFTWARE = 70  # a supervised task died
RETAIN_EVERY_S = 6 * 3600.0  # how often finished jobs past their retention are pruned
STOP_WAIT_S = 10.0  # how long cancel() and abandon() wait for the job's task to end


@dataclass
class Counts:
    claimed: int = 0
    finished: int = 0
    rejected: int = 0
    filed: int = 0  # jobs whose outcome was settled with their source


@dataclass(frozen=True)
class SpoolFile:
    """A job file in processing/: its result is filed beside it in done/ or failed/."""

    spool: Spool
    path: Path
    source: str = "spool"

    @property
    def name(self) -> str:
        return self.path.name

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        return None

    async def settle(self, outcome: Outcome) -> None:
        await asyncio.to_thread(self.spool.finish, self.path, outcome)


@dataclass
class Health:
    """What liveness is judged on; the loop-lag monitor and supervision fill it in."""

    dead: list[str] = field(default_factory=list)
    ready: bool = False


class Daemon:
    def __init__(self, settings: Settings, *, clock: Clock, api: HttpAep | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.jobs_in_flight_limit.set(settings.daemon.max_in_flight)
        self.api = api or HttpAep.from_config(settings.aep, clock=clock, metrics=self.metrics)
        self.engine = Engine(
            self.api,
            settings.destinations,
            settings.engine,
            org_id=settings.aep.org_id,
            sandbox=settings.aep.sandbox,
            clock=clock,
            identity_key=settings.aep.client_secret.get_secret_value().encode(),
            metrics=self.metrics,
        )
        config = settings.daemon
        self.spool = Spool(config.spool_dir, max_bytes=config.max_job_file_bytes)
        self.journal: Journal | None = None
        self.faults = Faults(self.metrics.registry)
        """Local writes failing now (a full disk): retried, and reported by /readyz."""
        self._rng = random.Random()
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.services: list[Service] = []
        self.health = Health()
        self.counts = Counts()
        self.ready = asyncio.Event()
        self.filed = asyncio.Condition()
        """Notified after each job's outcome is settled with its source (`counts.filed`)."""
        self.on_finished: list[Callable[[Outcome], None]] = []
        """Called after each outcome is journaled and settled (metrics, notifications)."""
        self.on_stopping: list[Callable[[], None]] = []
        """Called once when the daemon starts to stop (systemd's STOPPING=1)."""
        self.on_reloading: list[Callable[[], None]] = []
        """Called when a reload (SIGHUP) begins (systemd's RELOADING=1)."""
        self.on_reloaded: list[Callable[[bool], None]] = []
        """Called when a reload ends, with whether the new configuration was taken."""
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set whenever a job leaves
        self._stopping = asyncio.Event()
        self._cancelled: dict[str, str] = {}
        self._settling: set[asyncio.Future[None]] = set()
        self._exit = EXIT_OK
        self._reloader = Reloader(self)

    # -- life cycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to stop (idempotent); `run()` then returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    def add_service(self, service: Service) -> None:
        self.services.append(service)

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, load: Callable[[], Settings]) -> bool | None:
        """Re-read the configuration (SIGHUP): `load` returns new settings or raises
        `ConfigError`. New destinations and schedules apply to jobs that start from now on;
        jobs in flight go on undisturbed; other changed sections are logged as needing a
        restart. A configuration that does not load is refused and the old one kept.

        Returns whether the new configuration was taken; None when the daemon is stopping, or
        when a reload is already waiting to start: that one reads the newest file."""
        return await self._reloader.reload(load)

    async def run(self) -> int:
        """Recover, serve until `stop()`, shut down; returns the process exit code."""
        config = self.settings.daemon
        # A full disk at start: wait for space (logged, retried) rather than exit and loop.
        try:
            opened = await self._unless_stopping(self._opened())
        except Corrupt as exc:
            log.error("journal_corrupt", error=str(exc), recovery=exc.recovery)
            opened, self._exit = None, EXIT_DATAERR
        if opened is None:  # stopped while waiting, or nothing to start with
            await self.api.aclose()
            if self.journal is not None:
                await self.journal.close()
            return self._exit
        self.engine.start()
        supervised: dict[str, asyncio.Task[None]] = {}
        started: list[Service] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
            await self._recover()
            supervised["intake"] = asyncio.create_task(self._intake(), name="intake")
            if config.watch:
                supervised["watcher"] = asyncio.create_task(self._watch(), name="watcher")
            if config.journal_retention_days:
                supervised["retention"] = asyncio.create_task(self._retain(), name="retention")
            poller = self.engine.poller_task
            assert poller is not None
            supervised["poller"] = poller
            for service in self.services:
                supervised[service.name] = asyncio.create_task(service.run(), name=service.name)
            log.info(
                "daemon_ready",
                spool=str(self.spool.root),
                state=str(config.state_dir),
                resumed=len(self.jobs),
                max_in_flight=config.max_in_flight,
                services=[s.name for s in self.services],
            )
            self.health.ready = True
            self.ready.set()
            await self._supervise(supervised)
        finally:
            await self._shutdown(supervised, started)
        return self._exit

    async def _opened(self) -> Journal:
        config = self.settings.daemon
        # Only what waiting can cure: a folder that cannot be made is exit 1 with its traceback.
        await self._persist(
            lambda: asyncio.to_thread(self.spool.ensure), "intake", only_transient=True
        )
        self.journal = await self._persist(
            lambda: Journal.open(config.state_dir, faults=self.faults, clock=self.clock),
            "journal",
            only_transient=True,
        )
        return self.journal

    async def _unless_stopping(self, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None if a stop came first (then `work` is cancelled)."""
        doing = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({doing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not doing.done():
                doing.cancel()
                await asyncio.gather(doing, return_exceptions=True)
        return doing.result() if not doing.cancelled() else None

    async def _persist(
        self,
        write: Callable[[], Awaitable[T]],
        operation: str,
        *,
        only_transient: bool = False,
        **context: object,
    ) -> T:
        """A local write (journal, result file, spool), retried with backoff while it fails."""
        return await persist(
            write,
            operation=operation,
            clock=self.clock,
            faults=self.faults,
            rng=self._rng,
            only_transient=only_transient,
            **context,
        )

    async def _retain(self) -> None:
        """Prune the journal's finished jobs past their retention: now, then periodically."""
        assert self.journal is not None
        keep_s = self.settings.daemon.journal_retention_days * 86400
        while True:
            before = self.clock.time() - keep_s
            try:
                pruned = await self.journal.prune(before=before)
            except STORAGE_ERRORS as exc:  # (a full disk: the next round tries again)
                log.warning("journal_prune_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                if pruned:
                    log.info("journal_pruned", jobs=pruned, finished_before=before)
            # A short retention (hours) is kept to within a quarter of itself.
            await self.clock.sleep(min(RETAIN_EVERY_S, keep_s / 4))

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
                self.health.dead.append(name)
                self._exit = EXIT_SOFTWARE

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]], started: list[Service]) -> None:
        self._stopping.set()
        self.health.ready = False
        for hook in self.on_stopping:
            hook()
        log.info("daemon_stopping", jobs_in_flight=len(self.jobs))
        for task in tasks.values():
            task.cancel()
        for task in self.jobs.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), *self.jobs.values(), return_exceptions=True)
        await self.engine.stop()  # and the flow setups jobs were sharing
        if self._settling:  # outcomes being written when the stop came are written whole
            written = asyncio.ensure_future(asyncio.wait(set(self._settling)))
            grace = asyncio.ensure_future(self.clock.sleep(self.settings.daemon.shutdown_grace_s))
            await asyncio.wait({written, grace}, return_when=asyncio.FIRST_COMPLETED)
            written.cancel()
            grace.cancel()
            late = {f for f in self._settling if not f.done()}
            for unwritten in late:  # the disk is full: the next start resumes these jobs
                unwritten.cancel()
            if late:
                log.warning("outcomes_unwritten", jobs=len(late), faults=self.faults.describe())
                await asyncio.gather(*late, return_exceptions=True)
        left = await self.api.transport.drain(self.settings.daemon.shutdown_grace_s)
        for service in reversed(started):
            try:
                await service.close()
            except Exception:
                log.exception("service_close_failed", service=service.name)
        await self.api.aclose()
        if self.journal is not None:
            await self.journal.close()
        log.info("daemon_stopped", requests_abandoned=left)

    # -- admission, shared by every source -------------------------------------------------

    @property
    def room(self) -> int:
        """How many more jobs may start now (`max_in_flight` minus those in flight)."""
        return self.settings.daemon.max_in_flight - len(self.jobs)

    async def wait_room(self) -> None:
        """Until at least one more job may start."""
        while self.room <= 0:
            self._room.clear()
            await self._room.wait()

    async def submit(self, job: Job, spec: dict[str, Any], origin: Origin) -> Admitted:
        """Journal a new job and start it; a known job id is not started again."""
        assert self.journal is not None
        added = await self.journal.add(
            job.job_id, source=origin.source, name=origin.name, spec=spec
        )
        if not added:
            return Admitted(Admission.DUPLICATE, await self.journal.get(job.job_id))
        if not self.stopping:  # a stop began meanwhile: journaled, the next start resumes it
            self._start(job, origin, None)
        return Admitted(Admission.STARTED)

    def resume(self, record: JobRecord, origin: Origin) -> None:
        """Start an unfinished journaled job again from where it was."""
        if record.job_id in self.jobs:
            return
        job = Job.model_validate(record.spec)
        progress = Progress(
            record.state, flow_id=record.flow_id, run_id=record.run_id, intent_ms=record.intent_ms
        )
        log.info(
            "job_resumed",
            job_id=record.job_id,
            source=record.source,
            state=record.state.value,
            flow_id=record.flow_id,
            run_id=record.run_id,
        )
        self._start(job, origin, progress)

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Stop a job in flight: it ends `cancelled` with `reason`. False if not in flight."""
        task = self.jobs.get(job_id)
        if task is None or task.done():
            return False
        self._cancelled[job_id] = reason
        task.cancel()
        # Its outcome is being written (shielded); callers that need it wait on `filed`.
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        return True

    async def abandon(self, job_id: str) -> None:
        """Stop working on a job without an outcome: another process took it over."""
        task = self.jobs.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_WAIT_S)

    # -- spool intake ----------------------------------------------------------------------

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
        failures = 0
        while True:
            try:
                await self._intake_once()
            except OSError as exc:  # EMFILE, ENOSPC, EIO: the machine's trouble, not a file's
                if not await asyncio.to_thread(self.spool.dirs["incoming"].is_dir):
                    raise  # the spool itself is gone: waiting will not bring it back
                failures += 1
                self.faults.failed("intake", exc)
                delay = RETRY.next_delay(failures, self._rng) or RETRY.max_delay_s
                log.warning(
                    "intake_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    attempt=failures,
                    retry_in_s=round(delay, 3),
                )
                await self.clock.sleep(delay)
                continue
            if failures:
                log.info("intake_recovered", attempts=failures)
                failures = 0
            self.faults.worked("intake")
            self._wake.clear()
            await sleep_or_wake(self.clock, config.rescan_s, self._wake)

    async def _intake_once(self) -> None:
        room = self.room
        if room > 0:
            for path in await asyncio.to_thread(self.spool.waiting, room):
                claimed = await asyncio.to_thread(self.spool.claim, path)
                if claimed is not None:
                    self.counts.claimed += 1
                    await self._admit(claimed)

    async def _admit(self, path: Path, *, recovering: bool = False) -> None:
        """A claimed file becomes a journaled job in flight, or a rejection. `recovering`:
        the file was in processing/ at start, where a crash may have left a job of ours."""
        assert self.journal is not None
        origin = SpoolFile(self.spool, path)
        try:
            parsed: Parsed = await self._persist(
                lambda: asyncio.to_thread(self.spool.read, path, self.settings.destinations),
                "intake",
                file=path.name,
            )
        except Rejected as exc:
            await self.reject(origin, str(exc))
            return
        except Exception as exc:  # one poisonous file must not stop intake (nor every restart)
            log.exception("job_file_unreadable", file=path.name)
            await self.reject(origin, f"internal error reading the job file: {exc!r}")
            return
        job = parsed.job
        # Claimed: its admission waits out a full disk rather than leave it in processing/.
        admitted = await self._persist(
            lambda: self.submit(job, parsed.spec, origin), "journal", job_id=job.job_id
        )
        if admitted.result is Admission.STARTED:
            return
        known = admitted.record
        ours = recovering and known is not None and known.name == path.name
        if ours and known is not None and not known.terminal:
            self.resume(known, origin)  # our own claim, journaled before a crash
        elif ours and known is not None and known.outcome is not None:
            # Finished before a crash, not yet filed: file the outcome it has. Only at start:
            # a file dropped again later is a new request, never answered with an old result.
            await self._settle(origin, Outcome.model_validate(known.outcome))
        else:
            await self.reject(origin, already_submitted(job.job_id, known))

    async def reject(self, origin: Origin, reason: str) -> Outcome:
        """Journal and settle a job that will not run: bad input, a duplicate id."""
        assert self.journal is not None
        outcome = Outcome(job_id=f"rejected:{origin.name}", state=JobState.REJECTED, message=reason)
        log.warning("job_rejected", source=origin.source, name=origin.name, reason=reason)
        self.counts.rejected += 1
        self.metrics.job_finished(origin.source, JobState.REJECTED)
        journal = self.journal
        key = f"{outcome.job_id}:{uuid.uuid4().hex[:8]}"
        await self._persist(
            lambda: journal.add(
                key,
                source=origin.source,
                name=origin.name,
                spec={},
                state=JobState.REJECTED,
                outcome=outcome,
            ),
            "journal",
            name=origin.name,
        )
        await self._settle(origin, outcome)
        return outcome

    # -- jobs ------------------------------------------------------------------------------

    def _start(self, job: Job, origin: Origin, resume: Progress | None) -> None:
        task = asyncio.create_task(self._work(job, origin, resume), name=f"job:{job.job_id}")
        self.jobs[job.job_id] = task
        self.metrics.job_moved(job.job_id, resume.state if resume else JobState.RECEIVED)
        task.add_done_callback(lambda _: self._done(job.job_id))
        task.add_done_callback(self._watch_job)

    def _watch_job(self, task: asyncio.Task[None]) -> None:
        """A job's task may end cancelled (a stop) but never with an error: that is a bug
        that lost a job, so the daemon says so and stops rather than run on half-alive."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("task_died", task=task.get_name(), error=repr(error), exc_info=error)
        self.health.dead.append(task.get_name())
        self._exit = EXIT_SOFTWARE
        self.stop()

    def _done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.metrics.job_left(job_id)
        self._cancelled.pop(job_id, None)
        self._wake.set()
        self._room.set()

    async def _work(self, job: Job, origin: Origin, resume: Progress | None) -> None:
        journal = self.journal
        assert journal is not None

        async def on_state(progress: Progress) -> None:
            if progress.state in TERMINAL:
                return
            await self._persist(
                lambda: journal.advance(
                    job.job_id,
                    progress.state,
                    flow_id=progress.flow_id,
                    run_id=progress.run_id,
                    intent_ms=progress.intent_ms,
                    detail=progress.detail,
                ),
                "journal",
                job_id=job.job_id,
            )
            self.metrics.job_moved(job.job_id, progress.state)
            await origin.checkpoint(job.job_id, progress)

        try:
            fence = origin.fence if isinstance(origin, Fencing) else None
            outcome = await self.engine.run(job, on_state, resume=resume, fence=fence)
        except asyncio.CancelledError:
            reason = self._cancelled.get(job.job_id)
            if reason is None:
                raise  # the daemon is stopping: the journal says where the job was
            record = await journal.get(job.job_id)
            outcome = Outcome(
                job_id=job.job_id,
                state=JobState.CANCELLED,
                message=reason,
                flow_id=record.flow_id if record else None,
                run_id=record.run_id if record else None,
            )
        except Exception as exc:  # a bug must end the job visibly, not leave it hanging
            log.exception("job_crashed", job_id=job.job_id)
            outcome = Outcome(
                job_id=job.job_id, state=JobState.FAILED, message=f"internal error: {exc!r}"
            )
        # The outcome is written whole even if a stop arrives meanwhile.
        settling = asyncio.ensure_future(self._complete(origin, outcome))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        await asyncio.shield(settling)

    async def _complete(self, origin: Origin, outcome: Outcome) -> None:
        journal = self.journal
        assert journal is not None
        await self._persist(lambda: journal.finish(outcome), "journal", job_id=outcome.job_id)
        await self._settle(origin, outcome)
        self.counts.finished += 1
        self.metrics.job_finished(origin.source, outcome.state)
        log.info(
            "job_finished",
            job_id=outcome.job_id,
            source=origin.source,
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

    async def _settle(self, origin: Origin, outcome: Outcome) -> None:
        await self._persist(lambda: origin.settle(outcome), "result", job_id=outcome.job_id)
        self.counts.filed += 1
        for hook in self.on_finished:
            hook(outcome)
        async with self.filed:
            self.filed.notify_all()

    # -- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Resume every unfinished job; finish what a crash left half-filed."""
        assert self.journal is not None
        unfinished = await self.journal.unfinished()
        owned: dict[str, Service] = {s: svc for svc in self.services for s in svc.sources}
        by_service: dict[str, list[JobRecord]] = {}
        by_name: dict[str, JobRecord] = {}
        for record in unfinished:
            if record.source == "spool":
                by_name[record.name] = record
            elif record.source in owned:
                by_service.setdefault(owned[record.source].name, []).append(record)
            else:
                self.resume(record, Quiet(record.source, record.name))
        for path in await asyncio.to_thread(self.spool.processing):
            found = by_name.pop(path.name, None)
            if found is not None:
                self.resume(found, SpoolFile(self.spool, path))
            else:  # claimed but not journaled, or finished but not filed
                await self._admit(path, recovering=True)
        for record in by_name.values():
            log.warning("job_file_missing", job_id=record.job_id, file=record.name)
            path = self.spool.dirs["processing"] / record.name
            self.resume(record, SpoolFile(self.spool, path))
        for service in self.services:
            await service.recover(by_service.get(service.name, []))
