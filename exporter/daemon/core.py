"""`aep-exporter run`: the daemon, built from named, supervised background tasks.

    poller     the engine's shared run poller
    retention  prunes the journal's finished jobs past their retention
    <svc>      each service: the job sources (spool intake, Redis intake, scheduler), the
               admin server, the systemd notifier
    job:*      one task per job in flight, from admission to its settled outcome
               (`exporter.daemon.runner`)

Jobs come from several sources; each is a `Service` that sees the daemon only through its
`Admissions` (`exporter.daemon.admission`). Each job carries its `Origin`: what to tell the
source as the job moves (`checkpoint`) and once its outcome is journaled (`settle`: file the
result, acknowledge the message, ...).

If a supervised task dies, the daemon says so and stops rather than run half-alive. On
stop: intake stops, jobs are cancelled at their next wait (their journal says where they
were), requests already on the wire may finish within the grace period, the session is
closed; runs still going on in AEP are resumed at the next start.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from exporter.aep.api import AepApi
from exporter.aep.client import HttpAep
from exporter.clock import Clock, wait_within
from exporter.daemon.admission import Announcing, Counts, Quiet, Service
from exporter.daemon.journal import JobRecord, Journal
from exporter.daemon.journal_file import Corrupt
from exporter.daemon.reload import Reloader
from exporter.daemon.runner import JobRunner
from exporter.daemon.storage import STORAGE_ERRORS, Faults
from exporter.engine.assemble import engine_for
from exporter.metrics import Metrics
from exporter.settings import Settings

T = TypeVar("T")
log = structlog.get_logger("exporter.daemon")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DATAERR = 65  # the journal is corrupt: a restart cannot help (sysexits' EX_DATAERR)
EXIT_SOFTWARE = 70  # a supervised task died
RETAIN_EVERY_S = 6 * 3600.0  # how often finished jobs past their retention are pruned


@dataclass
class Health:
    """What liveness is judged on; the loop-lag monitor and supervision fill it in."""

    dead: list[str] = field(default_factory=list)
    ready: bool = False


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        api: AepApi | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.jobs_in_flight_limit.set(settings.daemon.max_in_flight)
        self.rng = rng or random.Random()
        """The daemon's one source of jitter, handed to what needs it (seeded in tests)."""
        self.api: AepApi = api or HttpAep.from_config(
            settings.aep, clock=clock, rng=self.rng, metrics=self.metrics
        )
        self.engine = engine_for(settings, self.api, clock, metrics=self.metrics, rng=self.rng)
        self.journal: Journal | None = None
        self.faults = Faults(self.metrics.storage_error)
        """Local writes failing now (a full disk): retried, and reported by /readyz."""
        self.services: list[Service] = []
        self.health = Health()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self.runner = JobRunner(
            settings,
            engine=self.engine,
            clock=clock,
            metrics=self.metrics,
            faults=self.faults,
            rng=self.rng,
            stopping=self._stopping,
            ready=self.ready,
            on_died=self._died,
        )
        """The jobs in flight; what services are given (`Admissions`)."""
        self.on_stopping: list[Callable[[], None]] = []
        """Called once when the daemon starts to stop (systemd's STOPPING=1)."""
        self.on_reloading: list[Callable[[], None]] = []
        """Called when a reload (SIGHUP) begins (systemd's RELOADING=1)."""
        self.on_reloaded: list[Callable[[bool], None]] = []
        """Called when a reload ends, with whether the new configuration was taken."""
        self._exit = EXIT_OK
        self._reloader = Reloader(self)

    @property
    def settings(self) -> Settings:
        return self.runner.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self.runner.settings = settings

    @property
    def admissions(self) -> JobRunner:
        return self.runner

    @property
    def jobs(self) -> dict[str, asyncio.Task[None]]:
        return self.runner.jobs

    @property
    def counts(self) -> Counts:
        return self.runner.counts

    @property
    def filed(self) -> asyncio.Condition:
        """Notified after each job's outcome is settled with its source (`counts.filed`)."""
        return self.runner.filed

    @property
    def room(self) -> int:
        return self.runner.room

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
        if isinstance(service, Announcing):
            self.on_stopping.append(service.announce_stopping)
            self.on_reloading.append(service.announce_reloading)
            self.on_reloaded.append(service.announce_reloaded)

    def _died(self, task: str) -> None:
        """A job's task ended with an error: a bug that lost a job; stop, never half-alive."""
        self.health.dead.append(task)
        self._exit = EXIT_SOFTWARE
        self.stop()

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
                # (The spool waits out a full disk at its start: a stop may come first.)
                if await self._unless_stopping(self._started(service)) is None:
                    return self._exit
                started.append(service)
            await self._recover()
            if config.journal_retention_days:
                supervised["retention"] = asyncio.create_task(self._retain(), name="retention")
            poller = self.engine.poller_task
            assert poller is not None
            supervised["poller"] = poller
            for service in self.services:
                supervised[service.name] = asyncio.create_task(service.run(), name=service.name)
            log.info(
                "daemon_ready",
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
        self.journal = await self.runner.persist(
            lambda: Journal.open(config.state_dir, faults=self.faults, clock=self.clock),
            "journal",
            only_transient=True,
        )
        self.runner.journal = self.journal
        return self.journal

    @staticmethod
    async def _started(service: Service) -> Service:
        await service.start()
        return service

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
        settling = self.runner.settling
        if settling:  # outcomes being written when the stop came are written whole
            grace_s = self.settings.daemon.shutdown_grace_s
            await wait_within(self.clock, grace_s, asyncio.wait(set(settling)))
            late = {f for f in settling if not f.done()}
            for unwritten in late:  # the disk is full: the next start resumes these jobs
                unwritten.cancel()
            if late:
                log.warning("outcomes_unwritten", jobs=len(late), faults=self.faults.describe())
                await asyncio.gather(*late, return_exceptions=True)
        left = await self.api.drain(self.settings.daemon.shutdown_grace_s)
        for service in reversed(started):
            try:
                await service.close()
            except Exception:
                log.exception("service_close_failed", service=service.name)
        await self.api.aclose()
        if self.journal is not None:
            await self.journal.close()
        log.info("daemon_stopped", requests_abandoned=left)

    # -- recovery --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Resume every unfinished job: each service its own sources' jobs, the rest here."""
        assert self.journal is not None
        owned: dict[str, Service] = {s: svc for svc in self.services for s in svc.sources}
        by_service: dict[str, list[JobRecord]] = {svc.name: [] for svc in self.services}
        for record in await self.journal.unfinished():
            if record.source in owned:
                by_service[owned[record.source].name].append(record)
            else:
                self.runner.resume(record, Quiet(record.source, record.name))
        for service in self.services:
            await service.recover(by_service[service.name])
