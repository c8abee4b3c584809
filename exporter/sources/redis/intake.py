"""Redis Streams intake: jobs from a consumer group that several daemons share.

    producers ─XADD job=<JSON>─► stream ─► group ─► daemon A, daemon B, ...
    outcomes ─► results stream: one entry per job id (job_id, state, run_id, records, ...)
    messages that are not jobs, or keep coming back ─► dead-letter stream, with the reason

A message's field `job` holds a job document, as in a job file (JSON). The journal names a
Redis job by its message id. How daemons share the work (the keys and the atomic steps are
in `store`; the claims this daemon holds, kept alive, in `leases`; origins in `messages`):

- A daemon takes a job under a lock in Redis (a lease of `lease_s`, held in its consumer
  name) and writes the job's progress there (state, flow, run, trigger intent) after
  journaling each state and before the action the state enables. Every third of the lease
  it renews the locks of its jobs and resets the idle time of their messages. A job that
  another daemon holds now is abandoned, and never triggered by a daemon that lost it.
- Every trigger is fenced: right before each ad hoc call that carries a job, its lease is
  renewed, within a quarter of the lease; without that answer the call does not carry the
  job, which is handed back (stopped without an outcome and forgotten; the next daemon to
  claim its message, maybe this one, resumes it). A job whose lease has lapsed by this
  daemon's own clock is handed back too, whether Redis answers or not.
- A daemon that dies stops renewing: once its messages have been idle for a lease, the
  others take them over (XAUTOCLAIM) and resume the jobs from their progress: a job left
  triggering adopts the run started since the intent instead of triggering again, once
  the AEP request timeout has passed since the takeover (a trigger its former holder sent
  under its lease has been answered or abandoned by then).
- A message is acknowledged only once its job's outcome is journaled, by one step that
  publishes the result, marks the job done (for `done_ttl_s`), acknowledges and unlocks. A
  message whose job is done (a duplicate submission, or a settle retried after its reply
  was lost) is acknowledged without running or publishing anything: the results stream
  holds exactly one entry per job id, and a duplicate's producer finds its answer there.
- A settled message is deleted from the job stream (XDEL) in the step that acknowledges it
  (published, dead-lettered, or a duplicate): the stream holds only unfinished jobs, so
  Redis does not grow with every job ever submitted, and a group made again at the
  stream's start finds only those; the done marks keep finished jobs from running again.
  The results and dead-letter streams are trimmed to about `results_maxlen` entries.
- A job counts its deliveries in Redis: its first claim, and each takeover by a consumer
  other than the last one. A daemon claiming its own job again after a restart (a deploy,
  a crash, a Redis outage) does not count, so a long job outlives any number of restarts.
  A job delivered more than `max_deliveries` times (its daemons keep dying on it), or a
  message that is not a usable job, goes to the dead-letter stream with the reason.
- A message whose job id this daemon already has from another source (a job file, the
  admin API, a schedule) goes to the dead-letter stream too, saying so: a job id runs once,
  and its producer gets an answer. (Only this daemon's journal knows those ids.)
- A job lost to another daemon is stopped without an outcome and dropped from the journal.
  Another daemon has it when its lock or progress names another consumer or, with both
  gone, its message is pending with another consumer. When Redis knows nothing of it (its
  data was lost: FLUSHALL, a restart without persistence, a failover that lost writes),
  the job stays: its lock, its progress (from the journal) and the group are made again,
  and its result is published when it settles.
- New messages are read only while the daemon has room for more jobs.
- Redis unreachable, or refusing commands for a while (out of memory, MISCONF, BUSY,
  LOADING, READONLY): every call is retried with backoff for up to `outage_s` (shorter
  than the lease), then the service stops and the daemon exits 70 (systemd restarts it);
  the next start resumes the jobs from the journal and the pending messages. A job is
  never failed for it.

Needs Redis 6.2 or newer (XAUTOCLAIM); not Redis Cluster (a step spans a job's keys and the
streams).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog
from redis.exceptions import RedisError, ResponseError

from exporter.daemon.admission import Admission, Admissions, until_one_ends
from exporter.daemon.config import RedisConfig
from exporter.daemon.journal import JobRecord, Journal
from exporter.engine.engine import Progress
from exporter.jobs import ORDER, Job, JobState, Outcome, Parsed, Rejected, parse_job
from exporter.sources.redis.leases import Leases
from exporter.sources.redis.messages import (
    SOURCE,
    DeadLetter,
    Message,
    progress_of,
    result_fields,
)
from exporter.sources.redis.store import Claim, Entry, RedisStore, RedisUnavailable, text

log = structlog.get_logger("exporter.redis")
MAX_COPIED_FIELDS = 100  # of a dead-lettered message: a script takes only so many arguments
PAGE = 100


class RedisIntake:
    """The daemon's service for one stream and consumer group."""

    name = "redis"
    sources = (SOURCE,)

    def __init__(self, admissions: Admissions, config: RedisConfig) -> None:
        self.admissions = admissions
        self.config = config
        self.store = RedisStore(config, clock=admissions.clock, rng=admissions.rng)
        self._clock = admissions.clock
        self.leases = Leases(admissions, config, self.store, fail=self._fail)
        self._failed = asyncio.Event()
        self._failure: BaseException | None = None
        admissions.metrics.redis_intake()

    @property
    def _journal(self) -> Journal:
        return self.admissions.journal

    # -- service life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        version = await self.store.connect()
        log.info(
            "redis_connected",
            url=self.config.safe_url,
            version=version,
            stream=self.config.stream,
            group=self.config.group,
            consumer=self.config.consumer,
        )

    async def recover(self, records: list[JobRecord]) -> None:
        """Resume the jobs of this consumer's pending messages; of the journal's other
        unfinished jobs, resume those still ours by Redis and forget the rest."""
        mine = await self._reread_own()
        for record in records:
            if record.name not in mine and record.job_id not in self.admissions.running:
                await self._reconcile(record)

    async def run(self) -> None:
        tasks = {
            asyncio.create_task(self._intake(), name="redis-intake"),
            asyncio.create_task(self.leases.heartbeat(), name="redis-heartbeat"),
            asyncio.create_task(self.leases.watch(), name="redis-leases"),
            asyncio.create_task(self._failed.wait(), name="redis-failed"),
        }
        await until_one_ends(tasks)
        raise self._failure or RuntimeError("the Redis intake stopped")

    async def close(self) -> None:
        await self.store.close()

    def _fail(self, exc: BaseException) -> None:
        """Stop the service, and so the daemon (exit 70): Redis has been gone too long."""
        if self._failure is None:
            self._failure = exc
        self._failed.set()

    # -- reading ---------------------------------------------------------------------------

    async def _intake(self) -> None:
        sweep_s = self.config.lease_s / 4
        next_sweep = self._clock.monotonic()
        while True:
            await self.admissions.wait_room()
            try:
                if self._clock.monotonic() >= next_sweep:
                    await self._take_over()
                    next_sweep = self._clock.monotonic() + sweep_s
                room = min(self.admissions.room, self.config.read_count)
                if room > 0:
                    wait = min(self.config.block_s, next_sweep - self._clock.monotonic())
                    for message_id, fields in await self.store.read_new(room, int(wait * 1000)):
                        await self._handle(message_id, fields, 1)
            except ResponseError as exc:  # the stream (and so the group) was deleted
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning("redis_group_missing", stream=self.config.stream, error=str(exc))
                await self.store.ensure_group()

    async def _take_over(self) -> None:
        """Messages idle for longer than the lease: their consumer died (or lost its way)."""
        room = min(self.admissions.room, self.config.read_count)
        if room <= 0:
            return
        entries, gone = await self.store.take_over(room)
        for message_id in gone:
            log.warning("redis_message_gone", message_id=message_id)
        if entries:
            log.info("redis_messages_taken_over", count=len(entries))
            self.admissions.metrics.redis_messages("taken_over", len(entries))
            await self._handle_all(entries)

    async def _handle_all(self, entries: list[Entry]) -> None:
        counts = await self.store.deliveries([i for i, _ in entries])
        for message_id, fields in entries:
            if fields:
                await self._handle(message_id, fields, counts.get(message_id, 1))
            else:  # deleted from the stream while pending: nothing to run
                log.warning("redis_message_gone", message_id=message_id)
                await self.store.drop(message_id)

    # -- one message -----------------------------------------------------------------------

    def _parse(self, fields: Mapping[bytes, bytes]) -> Parsed:
        raw = fields.get(b"job")
        if raw is None:
            names = ", ".join(sorted(text(k) for k in fields)) or "none"
            raise Rejected(
                f"no 'job' field (fields: {names}); a message carries its job document "
                "as JSON in the field 'job'"
            )
        limit = self.admissions.settings.daemon.max_job_file_bytes
        if len(raw) > limit:
            raise Rejected(f"the job is {len(raw)} bytes; the limit is {limit} bytes")
        return parse_job("message.json", raw, self.admissions.settings.destinations)

    async def _handle(
        self, message_id: str, fields: Mapping[bytes, bytes], deliveries: int
    ) -> None:
        """One delivered message: run or resume its job, or settle it without running."""
        poison = DeadLetter(self, message_id, fields, deliveries)
        try:
            parsed = self._parse(fields)
        except Rejected as exc:
            await self.admissions.reject(poison, str(exc))
            return
        except Exception as exc:  # one poisonous message must not stop the intake
            log.exception("redis_message_unreadable", message_id=message_id)
            await self.admissions.reject(poison, f"internal error reading the message: {exc!r}")
            return
        job = parsed.job
        known = await self._journal.get(job.job_id)
        if known is not None and known.source != SOURCE:
            await self._refuse_duplicate(message_id, fields, deliveries, known)
            return
        running = job.job_id in self.admissions.running
        began = self._clock.monotonic()
        claim = await self.store.claim(job.job_id, message_id, running=running)
        context = {"job_id": job.job_id, "message_id": message_id}
        if claim.status == "mine":
            if claim.holder:
                log.info("redis_job_reclaimed", **context, deliveries=deliveries)
            await self._run(job, parsed.spec, message_id, fields, claim, began)
        elif claim.status == "exhausted":
            times = int(claim.progress.get("deliveries", "0"))
            reason = (
                f"delivered {times} times (max_deliveries is "
                f"{self.config.max_deliveries}): the daemons that took it kept stopping"
            )
            origin = DeadLetter(self, message_id, fields, times, job.job_id)
            await self.admissions.reject(origin, reason)
            await self._journal.forget(job.job_id, detail="dead-lettered")
        elif claim.status == "busy" and claim.message_id == message_id:
            # Its holder's heartbeat takes the message back; if the holder died, the
            # message is taken over again once it has been idle for a lease.
            log.info("redis_job_busy", **context, holder=claim.holder)
        elif claim.status == "running" and claim.message_id == message_id:
            pass  # running here, from this very message
        else:  # done, or another message for a job that runs somewhere
            log.info("redis_message_duplicate", **context, why=claim.status)
            self.admissions.metrics.redis_messages("duplicate")
            await self.store.drop(message_id)

    async def _refuse_duplicate(
        self, message_id: str, fields: Mapping[bytes, bytes], deliveries: int, known: JobRecord
    ) -> None:
        """A message for a job id this daemon has from another source: dead-lettered with
        the reason, so that its producer hears why it will not run (nor publish a result)."""
        reason = (
            f"job id {known.job_id!r} was already submitted from another source "
            f"({known.source}, as {known.name}, now {known.state.value}); a job id runs "
            "once: give the new job another id"
        )
        origin = DeadLetter(self, message_id, fields, deliveries, known.job_id)
        await self.admissions.reject(origin, reason)

    async def _run(
        self,
        job: Job,
        spec: dict[str, Any],
        message_id: str,
        fields: Mapping[bytes, bytes],
        claim: Claim,
        claimed_at: float,
    ) -> None:
        """Start the job from where the journal or Redis says it got, whichever is further."""
        origin = Message(self, message_id, job.job_id)
        at = progress_of(claim.progress)
        self.leases.hold(job.job_id, message_id, claimed_at)
        taken_from = claim.progress.get("taken_from")
        if taken_from and at is not None and at.state is JobState.TRIGGERING:
            # Its former holder's trigger may still be on the wire (sent in time, under its
            # lease): adoption looks for the run only once that call has ended either way.
            hold = self.admissions.settings.aep.request_timeout_s
            self.leases.wait_before_adopting(job.job_id, claimed_at + hold)
            log.info(
                "redis_takeover_waiting",
                job_id=job.job_id,
                message_id=message_id,
                taken_from=taken_from,
                seconds=hold,
            )
        record = await self._journal.get(job.job_id)
        if record is None and at is None:
            admitted = await self.admissions.submit(job, spec, origin)
            if admitted.result is Admission.STARTED:
                self.admissions.metrics.redis_messages("started")
                return
            record = admitted.record  # submitted meanwhile by another source
            if record is not None and record.source != SOURCE:
                self.leases.release(job.job_id)
                await self._refuse_duplicate(message_id, fields, 1, record)
                return
        elif record is None:
            await self._journal.add(job.job_id, source=SOURCE, name=message_id, spec=spec)
            record = await self._journal.get(job.job_id)
        if record is None:  # pragma: no cover - journaled just above
            raise RuntimeError(f"job {job.job_id} is missing from the journal")
        if record.terminal:  # finished here, but its outcome never reached Redis
            outcome = (
                Outcome.model_validate(record.outcome)
                if record.outcome
                else Outcome(job_id=job.job_id, state=record.state)
            )
            await origin.settle(outcome)
            return
        if at is not None:
            record = await self._catch_up(record, at)
        self.admissions.metrics.redis_messages("resumed")
        self.admissions.resume(record, origin)

    async def _catch_up(self, record: JobRecord, at: Progress) -> JobRecord:
        """Journal the states another consumer reached, so that the job resumes there."""
        for state in ORDER[ORDER.index(record.state) + 1 : ORDER.index(at.state) + 1]:
            if state is JobState.QUERYING and "query" not in record.spec:
                continue  # a job without a query never passes through it
            await self._journal.advance(
                record.job_id,
                state,
                flow_id=at.flow_id,
                run_id=at.run_id if state is JobState.RUNNING else None,
                intent_ms=at.intent_ms if state is not JobState.FLOW_READY else None,
                detail="progress from Redis",
            )
        return await self._journal.get(record.job_id) or record

    # -- what jobs tell Redis --------------------------------------------------------------

    async def settle(self, origin: Message, outcome: Outcome) -> None:
        fields = result_fields(outcome, origin.message_id, self.config.consumer)
        try:  # (the heartbeat keeps the claim while this is retried)
            status, result_id = await self.store.settle(
                origin.job_id, origin.message_id, fields["outcome"], fields
            )
        except (RedisUnavailable, RedisError) as exc:  # pending: settled at the next start
            self._fail(exc)
            return
        finally:
            self.leases.release(origin.job_id)
        if status == "published":
            self.admissions.metrics.redis_messages("published")
        log.info(
            "redis_result_published" if status == "published" else "redis_job_already_done",
            job_id=origin.job_id,
            message_id=origin.message_id,
            result_id=result_id,
        )

    async def dead_letter(self, origin: DeadLetter, reason: str) -> None:
        fields: dict[str | bytes, str | bytes] = {
            "reason": reason,
            "message_id": origin.message_id,
            "stream": self.config.stream,
            "consumer": self.config.consumer,
            "deliveries": str(origin.deliveries),
            "job_id": origin.job_id,
        }
        for name, value in list(origin.fields.items())[:MAX_COPIED_FIELDS]:
            fields[b"field:" + name] = value
        try:
            entry = await self.store.dead_letter(origin.message_id, origin.job_id, fields)
        except (RedisUnavailable, RedisError) as exc:  # pending: handled at the next start
            self._fail(exc)
            return
        self.admissions.metrics.redis_messages("dead_lettered")
        log.warning(
            "redis_message_dead_lettered",
            message_id=origin.message_id,
            job_id=origin.job_id or None,
            deliveries=origin.deliveries,
            reason=reason,
            entry_id=entry,
        )

    # -- recovery --------------------------------------------------------------------------

    async def _reread_own(self) -> set[str]:
        """This consumer's pending messages, read before a restart: handled again."""
        seen: set[str] = set()
        last = "0"
        while entries := await self.store.read_own(last, PAGE):
            seen.update(i for i, _ in entries)
            await self._handle_all(entries)
            last = entries[-1][0]
        return seen

    async def _reconcile(self, record: JobRecord) -> None:
        """A journaled job whose message is not pending here: resume it if Redis says it is
        still ours (its message moves back here) or knows nothing of it (its data was lost);
        forget it if another daemon has it, or finished it, or its message is gone
        (acknowledged, dead-lettered)."""
        where = await self.store.whereabouts(record.job_id, record.name)
        if where.finisher is None and where.holder is None and where.deliveries is None:
            # Redis knows nothing of it (its data was lost): nobody else has it either.
            began = self._clock.monotonic()
            status, _ = await self.leases.restore(record.job_id, record.name)
            if status == "ok":
                self.leases.hold(record.job_id, record.name, began)
                self.admissions.metrics.redis_messages("resumed")
                self.admissions.resume(record, Message(self, record.name, record.job_id))
                return
        if where.finisher is None and where.holder == self.config.consumer and where.deliveries:
            entries = await self.store.move_here(record.name)
            for message_id, fields in entries:
                await self._handle(message_id, fields, where.deliveries + 1)
            if entries:
                return
        why = (
            f"finished by {where.finisher}"
            if where.finisher is not None
            else f"taken over by {where.holder or 'the next daemon to claim it'}"
            if where.deliveries
            else "its message is no longer pending"
        )
        log.info("redis_job_handed_over", job_id=record.job_id, message_id=record.name, why=why)
        await self._journal.forget(record.job_id, detail=why)
