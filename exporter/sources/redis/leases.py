"""The claims this daemon holds on its Redis jobs, kept alive and checked before each step.

Each job running here from a message is held under a lease (`lease_s`, in Redis); the
heartbeat renews them every third of it, a checkpoint renews a job's own as it records the
job's progress, and a fence renews it within a quarter of it right before a trigger. A job
whose lease cannot be renewed, or has lapsed by this daemon's clock, is handed back: stopped
without an outcome and forgotten (see `exporter.sources.redis.intake`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from exporter.daemon.admission import Admissions
from exporter.daemon.config import RedisConfig
from exporter.daemon.journal import Journal
from exporter.engine.engine import Progress
from exporter.jobs import ORDER
from exporter.sources.redis.messages import Message, lost_detail
from exporter.sources.redis.store import RedisStore, RedisUnavailable

log = structlog.get_logger("exporter.redis")


class Leases:
    """The jobs held here (job id -> message id) and when each lease lapses."""

    def __init__(
        self,
        admissions: Admissions,
        config: RedisConfig,
        store: RedisStore,
        *,
        fail: Callable[[BaseException], None],
    ) -> None:
        self.admissions = admissions
        self.config = config
        self.store = store
        self._fail = fail
        self._clock = admissions.clock
        self._held: dict[str, str] = {}  # job id -> message id, for the jobs running here
        # job id -> when its lease lapses by this daemon's clock (monotonic), counted from
        # the start of the call that last renewed it: never later than Redis's own expiry.
        self._lease_ends: dict[str, float] = {}
        # job id -> when a job taken over while triggering may go on (monotonic): once any
        # trigger its former holder may have had on the wire has been answered or abandoned.
        self._holds: dict[str, float] = {}
        self._fence_s = config.lease_s / 4

    @property
    def _journal(self) -> Journal:
        return self.admissions.journal

    def hold(self, job_id: str, message_id: str, since: float) -> None:
        """Hold `job_id` from `message_id`, under a lease renewed (or taken) at `since`."""
        self._held[job_id] = message_id
        self._lease_ends[job_id] = since + self.config.lease_s

    def wait_before_adopting(self, job_id: str, until: float) -> None:
        """Let the job's next checkpoint wait until `until` (monotonic)."""
        self._holds[job_id] = until

    async def checkpoint(self, origin: Message, progress: Progress) -> None:
        """Record the job's new state if the job is still ours; otherwise stop it right
        here, before the action the state enables (such as the trigger)."""
        values: dict[str, str] = {}
        if progress.flow_id:
            values["flow_id"] = progress.flow_id
        if progress.run_id:
            values["run_id"] = progress.run_id
        if progress.intent_ms is not None:
            values["intent_ms"] = str(progress.intent_ms)
        hold = self._holds.get(origin.job_id)
        if hold is not None:  # (the heartbeat keeps the claim meanwhile)
            await self._clock.sleep(hold - self._clock.monotonic())
            self._holds.pop(origin.job_id, None)
        began = self._clock.monotonic()
        rank = (ORDER.index(progress.state) + 1, progress.state.value)
        try:
            [(status, holder)] = await self.store.keep(
                [(origin.job_id, origin.message_id)], rank, values, operation="checkpoint"
            )
            if status == "gone":
                status, holder = await self.restore(origin.job_id, origin.message_id)
        except (RedisUnavailable, RedisError) as exc:
            # Not the job's failure: it stops without an outcome (the journal says where it
            # was), the service stops the daemon, and the next start resumes the job.
            self.release(origin.job_id)
            self._fail(exc)
            raise asyncio.CancelledError("Redis is unavailable") from exc
        if status == "ok":
            self.renewed(origin.job_id, origin.message_id, began)
        else:
            self.release(origin.job_id)
            log.warning(
                "redis_job_lost",
                job_id=origin.job_id,
                message_id=origin.message_id,
                state=progress.state.value,
                why=status,
                holder=holder,
            )
            # Like `admissions.abandon`, from inside the job's own task: no outcome. Nothing
            # writes to the journal after this (a cancelled job's task only re-raises), so
            # the job is dropped from it now, not left looking like it runs here.
            await self._journal.forget(origin.job_id, detail=lost_detail(status, holder))
            raise asyncio.CancelledError(f"job {origin.job_id} is not this daemon's any more")

    async def heartbeat(self) -> None:
        while True:
            await self._clock.sleep(self.config.lease_s / 3)
            held = [(j, m) for j, m in self._held.items() if j in self.admissions.running]
            if not held:
                continue
            began = self._clock.monotonic()
            answers = await self.store.keep(held, operation="heartbeat")
            for (job_id, message_id), (status, holder) in zip(held, answers, strict=True):
                renewed_from = began
                if status == "gone" and self._held.get(job_id) == message_id:
                    renewed_from = self._clock.monotonic()
                    status, holder = await self.restore(job_id, message_id)
                if status == "ok":
                    self.renewed(job_id, message_id, renewed_from)
                if status == "ok" or self._held.get(job_id) != message_id:
                    continue
                self.release(job_id)
                await self.admissions.abandon(job_id)  # returns once its task has stopped
                await self._journal.forget(job_id, detail=lost_detail(status, holder))
                log.warning(
                    "redis_job_lost",
                    job_id=job_id,
                    message_id=message_id,
                    why=status,
                    holder=holder,
                )

    async def watch(self) -> None:
        """Hand back each job whose lease has lapsed by this daemon's clock, whether Redis
        answers or not: another daemon may have it now."""
        while True:
            await self._clock.sleep(self.config.lease_s / 10)
            now = self._clock.monotonic()
            for job_id, message_id in list(self._held.items()):
                if job_id in self.admissions.running and self._lease_ends.get(job_id, now) < now:
                    await self.hand_back(job_id, message_id, "its lease lapsed unrenewed")

    def renewed(self, job_id: str, message_id: str, began: float) -> None:
        if self._held.get(job_id) == message_id:
            self._lease_ends[job_id] = max(
                self._lease_ends.get(job_id, began), began + self.config.lease_s
            )

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)
        self._lease_ends.pop(job_id, None)
        self._holds.pop(job_id, None)

    async def hand_back(self, job_id: str, message_id: str, why: str) -> None:
        """Stop a job without an outcome and forget it: its message stays pending, and the
        next daemon to claim it (this one, maybe) resumes it from its progress in Redis."""
        self.release(job_id)
        await self.admissions.abandon(job_id)
        await self._journal.forget(job_id, detail=f"handed back: {why}")
        log.warning("redis_job_handed_back", job_id=job_id, message_id=message_id, why=why)

    async def fence(self, origin: Message) -> float:
        """Right before the job's trigger goes out (called by the engine for each call that
        carries it): renew its lease within a quarter of it. If Redis does not confirm the
        job is still this daemon's in that time, the trigger is not sent: the job stops here
        without an outcome (`asyncio.CancelledError`), handed back. A trigger sent under a
        lease renewed this recently is answered, or abandoned by the AEP client at its
        request timeout, before a daemon that takes the job over looks for its run.

        Returns the time (monotonic) the trigger must be on the wire by: three quarters of a
        lease after the renewal began, a quarter before the lease could lapse. The AEP client
        does not send it later (its rate limit or a token refresh may hold it that long)."""
        job_id, message_id = origin.job_id, origin.message_id
        began = self._clock.monotonic()
        try:
            [(status, holder)] = await self.store.keep(
                [(job_id, message_id)], operation="fence", within_s=self._fence_s
            )
            if status == "gone":
                status, holder = await self.restore(job_id, message_id, within_s=self._fence_s)
        except (RedisUnavailable, RedisError, TimeoutError) as exc:
            status, holder = "unconfirmed", str(exc)
        if status == "ok" and self._held.get(job_id) == message_id:
            self.renewed(job_id, message_id, began)
            return began + self.config.lease_s - self._fence_s
        if self._held.get(job_id) == message_id:
            self.release(job_id)
            why = lost_detail(status, holder) if status in ("lost", "done") else holder
            await self._journal.forget(job_id, detail=f"not triggered: {why}")
        log.warning(
            "redis_trigger_fenced", job_id=job_id, message_id=message_id, why=status, detail=holder
        )
        raise asyncio.CancelledError(f"job {job_id} may not be triggered here: {status}")

    async def restore(
        self, job_id: str, message_id: str, *, within_s: float | None = None
    ) -> tuple[str, str]:
        """Redis knows nothing of a job running here (its data was lost: flushed, restarted
        without persistence, a failover that lost writes): nobody else has it, so it stays
        here; its lock and progress (from the journal) and the group are made again."""
        record = await self._journal.get(job_id)
        state = record.state if record is not None and record.state in ORDER else ORDER[0]
        values: dict[str, str] = {}
        if record is not None:
            values = {"flow_id": record.flow_id or "", "run_id": record.run_id or ""}
            if record.intent_ms is not None:
                values["intent_ms"] = str(record.intent_ms)
        rank = (ORDER.index(state) + 1, state.value)
        status, holder = await self.store.restore(
            job_id, message_id, rank, values, within_s=within_s
        )
        log.warning(
            "redis_job_restored" if status == "ok" else "redis_job_not_restored",
            job_id=job_id,
            message_id=message_id,
            state=state.value,
            why=status,
            holder=holder,
        )
        return status, holder
