"""A Redis job's message as the daemon sees it: the job's origin (`Message`), a message that
will not run (`DeadLetter`), and what goes back to Redis (progress, results)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.engine.engine import Progress
from exporter.jobs import ORDER, JobState, Outcome

if TYPE_CHECKING:
    from exporter.sources.redis.intake import RedisIntake

SOURCE = "redis"  # kept in the journal: never renamed


@dataclass(frozen=True)
class Message:
    """The origin of a job read from the stream."""

    intake: RedisIntake
    message_id: str
    job_id: str
    source: str = SOURCE

    @property
    def name(self) -> str:
        return self.message_id

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        await self.intake.leases.checkpoint(self, progress)

    async def settle(self, outcome: Outcome) -> None:
        await self.intake.settle(self, outcome)

    async def fence(self) -> float:
        return await self.intake.leases.fence(self)


@dataclass(frozen=True)
class DeadLetter:
    """A message that will not run: settling it moves it to the dead-letter stream."""

    intake: RedisIntake
    message_id: str
    fields: Mapping[bytes, bytes]
    deliveries: int
    job_id: str = ""
    source: str = SOURCE

    @property
    def name(self) -> str:
        return self.message_id

    async def checkpoint(self, job_id: str, progress: Progress) -> None:
        return None

    async def settle(self, outcome: Outcome) -> None:
        await self.intake.dead_letter(self, outcome.message)


def progress_of(values: Mapping[str, str]) -> Progress | None:
    """Where a job was left (by another consumer, or this one before a restart), if known."""
    try:
        state = JobState(values["state"])
        intent = int(values["intent_ms"]) if values.get("intent_ms") else None
    except (KeyError, ValueError):
        return None
    if state not in ORDER:
        return None
    flow, run = values.get("flow_id") or None, values.get("run_id") or None
    return Progress(state, flow_id=flow, run_id=run, intent_ms=intent)


def lost_detail(status: str, holder: str) -> str:
    """Why a job left this daemon, for the journal (a `keep` answer other than 'ok')."""
    if status == "done":
        return "finished by another daemon"
    return f"taken over by {holder or 'another daemon'}"


def result_fields(outcome: Outcome, message_id: str, consumer: str) -> dict[str, str]:
    """A results-stream entry: the outcome's main fields, and all of it as JSON."""
    return {
        "job_id": outcome.job_id,
        "state": outcome.state.value,
        "message": outcome.message,
        "flow_id": outcome.flow_id or "",
        "run_id": outcome.run_id or "",
        "files": str(outcome.files),
        "records": str(outcome.records),
        "bytes": str(outcome.bytes),
        "partial": "true" if outcome.partial else "false",
        "message_id": message_id,
        "consumer": consumer,
        "outcome": outcome.model_dump_json(),
    }
