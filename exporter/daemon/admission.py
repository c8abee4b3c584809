"""What a job source sees of the daemon: the admission interface, origins and services.

Every source (the spool, Redis, the jobs API, schedules) is a `Service` handed an
`Admissions`: it submits jobs, resumes its own unfinished ones, rejects what will not run,
and hears about each job through the job's `Origin`. The daemon core knows no source by
name; a source knows nothing of the daemon but this.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from exporter.clock import Clock
from exporter.daemon.journal import JobRecord, Journal
from exporter.daemon.storage import Faults
from exporter.engine.engine import Progress
from exporter.jobs import Job, Outcome
from exporter.metrics import Metrics
from exporter.settings import Settings

T = TypeVar("T")


class Origin(Protocol):
    """Where a job came from, and what that source must hear about it."""

    @property
    def source(self) -> str:
        """ "spool", "redis", "http", "schedule": kept in the journal."""
        ...

    @property
    def name(self) -> str:
        """The job's name within its source (a file name, a message id, ...)."""
        ...

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        """Called after each state is journaled, before the action it enables."""
        ...

    async def settle(self, outcome: Outcome) -> None:
        """Called once the outcome is journaled; may be called again after a crash."""
        ...


@dataclass(frozen=True)
class Quiet:
    """An origin that needs to hear nothing: the journal is the whole record."""

    source: str
    name: str

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        return None

    async def settle(self, outcome: Outcome) -> None:
        return None


async def until_one_ends(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """A service's `run` over several tasks of its own: wait until one of them ends, then
    cancel the others and wait for them. Raises the error a task that ended raised; returns
    if it returned (the service then says it stopped)."""
    running = set(tasks)
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    for task in done:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


class Service(Protocol):
    """A part of the daemon with its own supervised task (admin server, Redis intake, ...)."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None:
        """Before recovery: bind, connect. Raising stops the daemon with a clear error."""
        ...

    async def recover(self, records: list[JobRecord]) -> None:
        """Resume this service's own unfinished jobs (those whose source it owns)."""
        ...

    async def run(self) -> None:
        """Serve until cancelled; returning or raising means the service died."""
        ...

    async def close(self) -> None:
        """After every job task has stopped: release connections, sockets."""
        ...

    @property
    def sources(self) -> Iterable[str]:
        """Job sources whose unfinished jobs this service recovers."""
        ...


@runtime_checkable
class Fencing(Protocol):
    """An origin that must confirm, right before a job's trigger goes out, that the job is
    still this daemon's (the Redis intake: its lease), and by when the trigger must then be on
    the wire; see `Engine.run`'s `fence`."""

    async def fence(self) -> float | None: ...


@runtime_checkable
class Reconfigurable(Protocol):
    """A service that takes part of a reload (the scheduler takes the new schedules)."""

    def reconfigure(self, settings: Settings) -> None:
        """Use `settings` (already validated) from now on; synchronous, so that a reload is
        applied whole within one turn of the event loop."""
        ...


@runtime_checkable
class Announcing(Protocol):
    """A service that tells the outside world how the daemon's life goes (systemd)."""

    def announce_stopping(self) -> None:
        """Once, when the daemon starts to stop."""
        ...

    def announce_reloading(self) -> None:
        """When a reload (SIGHUP) begins."""
        ...

    def announce_reloaded(self, ok: bool) -> None:
        """When a reload ends, with whether the new configuration was taken."""
        ...


@dataclass
class Counts:
    finished: int = 0
    rejected: int = 0
    filed: int = 0  # jobs whose outcome was settled with their source


class Admission(enum.Enum):
    STARTED = "started"
    DUPLICATE = "duplicate"  # the job id is known already: see `Admitted.record`


@dataclass(frozen=True)
class Admitted:
    result: Admission
    record: JobRecord | None = None


def already_submitted(job_id: str, known: JobRecord | None) -> str:
    """Why a job whose id the journal knows is not run again: a job id is an idempotency
    key, so the same content dropped again is refused, never answered with the old result."""
    if known is None:  # (forgotten meanwhile: handed over to another daemon)
        return f"job id {job_id!r} was already submitted; give the new job another id"
    if known.terminal:
        outcome = known.outcome or {}
        run = outcome.get("run_id") or known.run_id
        at = datetime.fromtimestamp(known.updated, UTC).isoformat(timespec="seconds")
        return (
            f"job id {job_id!r} was already submitted (from {known.source} {known.name}) and "
            f"{known.state.value}"
            + (f" as run {run}" if run else "")
            + f" at {at}; a job id exports once: give the job another id (its id field) "
            "to export again"
        )
    return (
        f"job id {job_id!r} was already submitted (from {known.source} {known.name}, now "
        f"{known.state.value}); a job id runs once: give the new job another id"
    )


class Admissions(Protocol):
    """The daemon as its job sources see it: admission, and the few views they need."""

    @property
    def settings(self) -> Settings:
        """The settings now in force (a reload replaces destinations and schedules)."""
        ...

    @property
    def clock(self) -> Clock: ...

    @property
    def rng(self) -> random.Random:
        """The daemon's one source of jitter (seeded in tests)."""
        ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def faults(self) -> Faults:
        """Local writes failing now (a full disk), as /readyz reports them."""
        ...

    @property
    def journal(self) -> Journal:
        """Open from recovery on: services read it, and Redis hands jobs over in it."""
        ...

    @property
    def stopping(self) -> bool: ...

    @property
    def ready(self) -> asyncio.Event:
        """Set once every unfinished job has been resumed."""
        ...

    @property
    def filed(self) -> asyncio.Condition:
        """Notified after each job's outcome is settled with its source."""
        ...

    @property
    def running(self) -> Collection[str]:
        """The ids of the jobs in flight."""
        ...

    @property
    def counts(self) -> Counts:
        """Jobs finished, rejected and filed since the start."""
        ...

    @property
    def room(self) -> int:
        """How many more jobs may start now."""
        ...

    async def wait_room(self) -> None:
        """Until at least one more job may start."""
        ...

    def on_room(self, wake: asyncio.Event) -> None:
        """Set `wake` whenever a job leaves (room for another)."""
        ...

    async def wait_ended(self, job_ids: Iterable[str]) -> None:
        """Until none of `job_ids` is in flight."""
        ...

    async def submit(self, job: Job, spec: dict[str, Any], origin: Origin) -> Admitted:
        """Journal a new job and start it; a known job id is not started again."""
        ...

    def resume(self, record: JobRecord, origin: Origin) -> None:
        """Start an unfinished journaled job again from where it was."""
        ...

    async def reject(self, origin: Origin, reason: str) -> Outcome:
        """Journal and settle a job that will not run: bad input, a duplicate id."""
        ...

    async def settle(self, origin: Origin, outcome: Outcome) -> None:
        """Tell `origin` an outcome already journaled (one a crash left unfiled)."""
        ...

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Stop a job in flight: it ends `cancelled`. False if not in flight."""
        ...

    async def abandon(self, job_id: str) -> None:
        """Stop working on a job without an outcome: another process took it over."""
        ...

    async def persist(
        self,
        write: Callable[[], Awaitable[T]],
        operation: str,
        *,
        only_transient: bool = False,
        **context: object,
    ) -> T:
        """A local write, retried with backoff while it fails (a full disk); with
        `only_transient`, only while the failure is one that waiting cures."""
        ...
