"""The Redis side of the Redis intake: its streams, its per-job keys, and its atomic steps.

Per job id, beside the stream (`<stream>:lock:<job id>`, `:progress:`, `:done:`):

    lock      who runs the job now: a consumer name, with a lease (PX)
    progress  where it got to: owner, message_id, state (and its rank), flow_id, run_id,
              intent_ms; deliveries (its first claim, and each takeover by another consumer)
    done      its outcome once published: outcome, message_id, consumer, result_id

A job is a consumer's while the lock holds its name or, once the lease lapsed, while nobody
else has claimed it since (progress still names it). A job that is done is nobody's. A job
of which Redis knows nothing (no lock, no progress, no done mark, and its message pending
with no other consumer: Redis lost its data) stays with the consumer that runs it, which
makes its keys again (`restore`); it is not taken for a takeover.

Each decision is one Lua script (the `.lua` files beside this module): atomic like
MULTI/EXEC, and unlike it able to look before it writes (is the job done? whose is the
lock?), so two daemons never both win one. What touches the group goes through `pcall`: a
stream deleted under a script costs a message, not the script's other effects.

A message leaves the job stream (XDEL) in the step that acknowledges it: the stream holds
only jobs not yet finished, and the done marks keep a finished job from running again.

Every call is retried with backoff while Redis is unreachable or in a passing state that
refuses commands (out of memory, writes stopped after a failed save, busy with a script,
loading, a read-only replica); after `outage_s` it raises `RedisUnavailable`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError

from exporter.clock import Clock, wait_within
from exporter.daemon.config import RedisConfig
from exporter.errors import ExporterError
from exporter.retry import Backoff, Retrying, retry
from exporter.sources.redis.errors import retryable

log = structlog.get_logger("exporter.redis")
T = TypeVar("T")
Entry = tuple[str, Mapping[bytes, bytes]]


class RedisUnavailable(ExporterError):
    """Redis was unreachable, or refused our commands, for longer than `outage_s`."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What `claim` found: `status` is 'mine' (with the job's `progress` so far, and
    `taken_from`, the consumer it had, on a takeover), 'done' (its outcome is published),
    'busy' (`holder` runs it), 'running' (this consumer runs it already) or 'exhausted'
    (delivered too often: `progress` holds the `deliveries` this claim would have made).
    `message_id`: the message the job's holder works from."""

    status: str
    holder: str
    message_id: str
    progress: dict[str, str]


@dataclass(frozen=True, slots=True)
class Whereabouts:
    """Who, by Redis, has a job this consumer journaled but holds no message of."""

    finisher: str | None  # the consumer that published its outcome
    holder: str | None  # the lock's holder, or failing that the last one to claim it
    deliveries: int | None  # of its message, if still pending


def lua(name: str) -> str:
    """The Lua script `<name>.lua` shipped beside this module (package data)."""
    folder = resources.files(__name__.rpartition(".")[0])
    return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat(values: Mapping[Any, Any]) -> list[Any]:
    return [item for pair in values.items() for item in pair]


class RedisStore:
    """One consumer's view of the stream, its group and the per-job keys."""

    def __init__(self, config: RedisConfig, *, clock: Clock, rng: random.Random) -> None:
        self.config = config
        self.consumer = config.consumer
        self._clock = clock
        self._rng = rng
        # Unbounded here: `_call` waits out `outage_s` whole, its last delay cut to fit.
        self._backoff = Backoff(
            max_attempts=1_000_000, base_delay_s=0.1, max_delay_s=5.0, max_elapsed_s=float("inf")
        )
        self._lease_ms = int(config.lease_s * 1000)
        self._margin_ms = max(100, self._lease_ms // 20)  # a lease has lapsed when taken over
        self._ttl_ms = int(config.done_ttl_s * 1000)
        self._cursor: Any = "0-0"
        extra: dict[str, Any] = {}
        if config.password is not None:
            extra["password"] = config.password.get_secret_value()
        self.redis = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.block_s + 10,  # longer than a blocking read
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 1),  # one quick reconnect; outages are `_call`'s
            health_check_interval=30,
            **extra,
        )
        self._claim = self.redis.register_script(lua("claim"))
        self._keep = self.redis.register_script(lua("keep"))
        self._restore = self.redis.register_script(lua("restore"))
        self._settle = self.redis.register_script(lua("settle"))
        self._dead_letter = self.redis.register_script(lua("dead_letter"))

    def keys(self, job_id: str) -> list[str]:
        prefix = self.config.stream
        return [f"{prefix}:lock:{job_id}", f"{prefix}:progress:{job_id}", f"{prefix}:done:{job_id}"]

    async def connect(self) -> str:
        """Check that Redis answers, is recent enough, and has the group; its version."""
        try:
            info: Any = await self._call("connect", partial(self.redis.info, "server"))
        except (AuthenticationError, AuthorizationError) as exc:
            log.error("redis_refused", url=self.config.safe_url, error=str(exc))
            raise RuntimeError(f"Redis at {self.config.safe_url} refused us: {exc}") from None
        version = str(info.get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (6, 2):
            raise RuntimeError(f"Redis {version} is too old: the intake needs 6.2 or newer")
        await self.ensure_group()
        return version

    async def ensure_group(self) -> None:
        """The consumer group, created with the stream if missing; it starts at the
        stream's beginning, so jobs added before the first daemon came are done too."""
        create = partial(
            self.redis.xgroup_create, self.config.stream, self.config.group, id="0", mkstream=True
        )
        try:
            await self._call("xgroup_create", create)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        await self.redis.aclose()

    # -- reading ---------------------------------------------------------------------------

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        return await self._read(">", count, block_ms if block_ms > 0 else None)

    async def read_own(self, after: str, count: int) -> list[Entry]:
        """This consumer's pending messages after `after` (rereading counts as a delivery);
        a message deleted from the stream meanwhile comes with no fields."""
        return await self._read(after, count, None)

    async def _read(self, start: str, count: int, block: int | None) -> list[Entry]:
        read = partial(
            self.redis.xreadgroup,
            self.config.group,
            self.consumer,
            {self.config.stream: start},
            count=count,
            block=block,
        )
        reply: Any = await self._call("xreadgroup", read)
        return [(text(i), f or {}) for _, entries in reply or [] for i, f in entries]

    async def take_over(self, count: int) -> tuple[list[Entry], list[str]]:
        """Messages idle longer than the lease (their consumer died), and the ids of those
        that were deleted from the stream meanwhile (dropped from the group by Redis)."""
        claim = partial(
            self.redis.xautoclaim,
            self.config.stream,
            self.config.group,
            self.consumer,
            min_idle_time=self._lease_ms + self._margin_ms,
            start_id=self._cursor,
            count=count,
        )
        reply: Any = await self._call("xautoclaim", claim)
        self._cursor = reply[0]
        gone = [text(i) for i in reply[2]] if len(reply) > 2 else []
        return [(text(i), f or {}) for i, f in reply[1]], gone

    async def move_here(self, message_id: str) -> list[Entry]:
        """Take a pending message into this consumer's list (a delivery)."""
        move = partial(
            self.redis.xclaim,
            self.config.stream,
            self.config.group,
            self.consumer,
            0,
            [message_id],
        )
        reply: Any = await self._call("xclaim", move)
        return [(text(i), f or {}) for i, f in reply]

    async def deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        """How often each pending message was delivered."""

        async def ask() -> Any:
            async with self.redis.pipeline(transaction=False) as pipe:
                for message_id in ids:
                    pipe.xpending_range(
                        self.config.stream, self.config.group, message_id, message_id, 1
                    )
                return await pipe.execute()

        replies: Any = await self._call("xpending", ask)
        return {
            text(row["message_id"]): int(row["times_delivered"]) for rows in replies for row in rows
        }

    async def drop(self, message_id: str) -> None:
        """Acknowledge a message and delete it from the stream (a duplicate, or gone)."""

        async def send() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.config.stream, self.config.group, message_id)
                pipe.xdel(self.config.stream, message_id)
                return await pipe.execute()

        await self._call("xack", send)

    # -- per job ---------------------------------------------------------------------------

    async def claim(self, job_id: str, message_id: str, *, running: bool) -> Claim:
        args: list[Any] = [
            self.consumer,
            self._lease_ms,
            message_id,
            self._ttl_ms,
            "1" if running else "0",
            self.config.max_deliveries,
            self.config.group,
        ]
        keys = [*self.keys(job_id), self.config.stream]
        reply: Any = await self._call("claim", partial(self._claim, keys, args))
        status, holder, holding, *progress = [text(r) for r in reply]
        pairs = dict(zip(progress[::2], progress[1::2], strict=True))
        return Claim(status, holder, holding, pairs)

    async def keep(
        self,
        held: Iterable[tuple[str, str]],
        state: tuple[int, str] | None = None,
        values: Mapping[str, str] | None = None,
        *,
        operation: str = "keep",
        within_s: float | None = None,
    ) -> list[tuple[str, str]]:
        """Renew this consumer's claim on each (job id, message id): its lock, its progress,
        its message's idle time. With `state` (rank, name), record it in the progress unless
        a higher rank is there already, and `values` (flow_id, ...). Each answer is ('ok',
        ''), ('lost', new holder: the lock's, the progress's or, failing both, the consumer
        its message is pending with), ('done', '') or ('gone', ''): Redis knows nothing of
        the job (see `restore`). `operation` names the call in logs. With
        `within_s`, raises `TimeoutError` if Redis has not answered by then (retries
        included)."""
        extra = [*state, *_flat(values or {})] if state is not None else ["", ""]

        async def send() -> Any:
            # (`async with`: a pipeline whose scripts fail to load, as when Redis is busy,
            # would otherwise keep its connection)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, message_id in held:
                    keys, args = self._lock_call(job_id, message_id, extra)
                    await self._keep(keys, args, client=pipe)
                return await pipe.execute()

        call = self._call(operation, send)
        replies: Any = await (call if within_s is None else self._within(within_s, call))
        return [(text(r[0]), text(r[1])) for r in replies]

    async def restore(
        self,
        job_id: str,
        message_id: str,
        state: tuple[int, str],
        values: Mapping[str, str],
        *,
        within_s: float | None = None,
    ) -> tuple[str, str]:
        """Make a job's lock and progress (`state`, `values`) again, and its group if gone,
        after `keep` answered 'gone' (Redis lost what it knew of the job): ('ok', ''), or
        ('lost', holder) or ('done', '') if it was claimed or finished meanwhile. With
        `within_s`, as `keep`."""
        call = self._restore_now(job_id, message_id, state, values)
        return await (call if within_s is None else self._within(within_s, call))

    async def _restore_now(
        self, job_id: str, message_id: str, state: tuple[int, str], values: Mapping[str, str]
    ) -> tuple[str, str]:
        await self.ensure_group()
        keys, args = self._lock_call(job_id, message_id, [*state, *_flat(values)])
        reply: Any = await self._call("restore", partial(self._restore, keys, args))
        return text(reply[0]), text(reply[1])

    def _lock_call(
        self, job_id: str, message_id: str, extra: Sequence[Any]
    ) -> tuple[list[str], list[Any]]:
        """Keys and arguments of the lock scripts (keep, restore) for one job."""
        keys = [*self.keys(job_id), self.config.stream]
        args = [
            self.consumer,
            self._lease_ms,
            self._ttl_ms,
            self.config.group,
            message_id,
            *extra,
        ]
        return keys, args

    async def settle(
        self, job_id: str, message_id: str, outcome_json: str, fields: Mapping[str, str]
    ) -> tuple[str, str]:
        """Publish a job's outcome, mark it done, acknowledge and delete its message and
        unlock it, at once: ('published', result id). If it was done already, the message is
        only acknowledged and deleted: ('duplicate', the earlier result's id)."""
        keys = [*self.keys(job_id), self.config.stream, self.config.results_stream]
        args = [
            self.consumer,
            self.config.group,
            message_id,
            self._ttl_ms,
            self.config.results_maxlen,
            outcome_json,
            f"{self._clock.time():.3f}",
            *_flat(fields),
        ]
        reply: Any = await self._call("settle", partial(self._settle, keys, args))
        return text(reply[0]), text(reply[1])

    async def dead_letter(
        self, message_id: str, job_id: str, fields: Mapping[str | bytes, str | bytes]
    ) -> str | None:
        """Add `fields` to the dead-letter stream, acknowledge the message and delete it, once
        (None if it was not pending any more); this consumer's lock on the job, if any, is
        dropped, and a new message for the job counts its deliveries afresh."""
        lock, progress, _ = self.keys(job_id)
        keys = [self.config.stream, self.config.dead_letter_stream, lock, progress]
        args = [
            self.config.group,
            message_id,
            self.consumer,
            self.config.results_maxlen,
            *_flat(fields),
        ]
        reply: Any = await self._call("dead_letter", partial(self._dead_letter, keys, args))
        return None if reply is None else text(reply)

    async def whereabouts(self, job_id: str, message_id: str) -> Whereabouts:
        lock, progress, done = self.keys(job_id)

        async def ask() -> Any:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(done, "consumer")
                pipe.get(lock)
                pipe.hget(progress, "owner")
                pipe.xpending_range(
                    self.config.stream, self.config.group, message_id, message_id, 1
                )
                return await pipe.execute()

        finisher, holder, owner, pending = await self._call("whereabouts", ask)
        return Whereabouts(
            finisher=None if finisher is None else text(finisher),
            holder=text(holder) if holder is not None else text(owner) if owner else None,
            deliveries=int(pending[0]["times_delivered"]) if pending else None,
        )

    # -- the retry policy ------------------------------------------------------------------

    async def _within(self, seconds: float, call: Awaitable[T]) -> T:
        """`call`, given up (cancelled: redis-py drops its connection) after `seconds`."""
        task = asyncio.ensure_future(call)
        if not await wait_within(self._clock, seconds, task):
            raise TimeoutError(f"Redis did not answer within {seconds:g} s")
        return task.result()

    async def _call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()`, retried with backoff while Redis is unreachable or refusing commands for a
        while (`retryable`), up to `outage_s`."""
        started = self._clock.monotonic()

        def retrying(r: Retrying) -> None:
            if r.attempt & (r.attempt - 1) == 0:  # the 1st, 2nd, 4th, 8th...: not a flood
                log.warning(
                    "redis_retrying",
                    operation=operation,
                    attempt=r.attempt,
                    retry_in=round(r.delay, 2),
                    error=str(r.error),
                )

        try:
            result = await retry(
                fn,
                policy=self._backoff,
                clock=self._clock,
                rng=self._rng,
                retryable=retryable,
                on_retry=retrying,
                deadline=started + self.config.outage_s,
            )
        except Exception as exc:
            if not retryable(exc):
                raise
            elapsed = self._clock.monotonic() - started
            log.error(
                "redis_unreachable",
                operation=operation,
                url=self.config.safe_url,
                seconds=round(elapsed, 1),
                error=str(exc),
            )
            raise RedisUnavailable(
                f"Redis at {self.config.safe_url} unavailable for {elapsed:.0f} s "
                f"({operation}): {exc}"
            ) from exc
        # redis-py sends with asyncio.wait_for, which on Python 3.11 swallows a
        # cancellation that comes as the send completes: a stop would go unheard.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        return result
