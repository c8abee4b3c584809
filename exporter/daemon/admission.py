"""What a job source sees of the daemon: the origins of jobs, services, admission results.

Every source (the spool, Redis, the jobs API, schedules) submits jobs to the daemon and hears
about each one through the job's `Origin`; the parts beyond the spool are `Service`s.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from exporter.daemon.journal import JobRecord
from exporter.engine import Progress
from exporter.jobs import Outcome
from exporter.settings import Settings


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
    still this daemon's (the Redis intake: its lease); see `Engine.run`'s `fence`."""

    async def fence(self) -> None: ...


@runtime_checkable
class Reconfigurable(Protocol):
    """A service that takes part of a reload (the scheduler takes the new schedules)."""

    def reconfigure(self, settings: Settings) -> None:
        """Use `settings` (already validated) from now on; synchronous, so that a reload is
        applied whole within one turn of the event loop."""
        ...


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
