"""The Redis Streams intake against a real redis-server and the emulator.

Two daemons (child processes) share 500 jobs and one is killed half-way: every job finishes
exactly once, with one trigger each. Messages that are not jobs, or keep coming back, land
in the dead-letter stream; a finished job is not run again; a restarted daemon resumes its
own jobs; a job another daemon took is abandoned, never triggered; a daemon cut off from
Redis never triggers a job taken over meanwhile; a job outlives Redis losing its data; a
long Redis outage stops the daemon with 70.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, ResponseError
from structlog.testing import LogCapture
from structlog.typing import EventDict

from aep_emulator.app import serve
from aep_emulator.runs import settle as settle_runs
from aep_emulator.settings import Span
from aep_emulator.state import EmulatorState
from exporter.clock import SystemClock
from exporter.daemon.config import RedisConfig
from exporter.daemon.core import EXIT_OK, EXIT_SOFTWARE, Daemon
from exporter.daemon.journal import Journal
from exporter.jobs import JobState, Outcome
from exporter.settings import describe_errors, load_settings
from exporter.sources.redis.errors import reply_code, retryable
from exporter.sources.redis.intake import RedisIntake
from exporter.sources.redis.messages import Message
from tests.conftest import emulator_knobs
from tests.daemon_support import (
    Running,
    drop_job,
    kill,
    results,
    runs_by_dataset,
    spool_daemon,
    spool_of,
    start_daemon,
    triggers_by_job,
    until_results,
    write_config,
)
from tests.redis_support import (
    PausableProxy,
    RedisServer,
    entries,
    pending,
    redis_server_fixture,  # noqa: F401 - the `redis_server` fixture
    start_redis,
    until_entries,
    until_field,
)
from tests.test_daemon_shutdown import add_fault

JOBS = "aep-exporter:jobs"
GROUP = "aep-exporter"
RESULTS = "aep-exporter:results"
DEAD = "aep-exporter:dead-letter"
DEADLINE = 30.0  # real seconds: a bound on a wait for an event, never a sleep
FAST = emulator_knobs(
    not_ready_window_s=0.3,
    run_duration_s=Span(min=0.2, max=0.5),
    latency_ms=Span(min=1, max=3),
    seed=11,
)


def seed(state: EmulatorState, count: int) -> list[str]:
    return [
        state.lake.create_dataset("prod", f"f{i:03d}", 5, rng=random.Random(i), now_ms=0).id
        for i in range(count)
    ]


def job(job_id: str, dataset: str, **changes: Any) -> dict[str, Any]:
    base = {"id": job_id, "dataset_id": dataset, "destination": "lake", "path": f"ml/{job_id}"}
    return {**base, **changes}


async def submit(client: aioredis.Redis, *fields: dict[str, Any]) -> list[str]:
    """XADD each message; a dict value is sent as the JSON job document."""
    pipe = client.pipeline(transaction=False)
    for message in fields:
        pipe.xadd(
            JOBS, {k: json.dumps(v) if isinstance(v, dict) else v for k, v in message.items()}
        )
    return [i.decode() for i in await pipe.execute()]


def redis_section(server: RedisServer, consumer: str, **changes: Any) -> dict[str, Any]:
    """A [redis] section; `outage_s` is half the lease unless given (it must be shorter)."""
    section = {"url": server.url, "consumer": consumer, "lease_s": 2, "block_s": 0.5, **changes}
    section.setdefault("outage_s", section["lease_s"] / 2)
    return section


class WatchedLogs(LogCapture):
    """Log entries of this process as they come, with a way to wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(  # type: ignore[override]  # it raises DropEvent, as LogCapture's does
        self, logger: Any, method_name: str, event_dict: EventDict
    ) -> EventDict:
        self.changed.set()
        return super().__call__(logger, method_name, event_dict)

    def named(self, event: str) -> list[EventDict]:
        return [e for e in self.entries if e["event"] == event]

    async def until(self, event: str, *, count: int = 1) -> list[EventDict]:
        async with asyncio.timeout(DEADLINE):
            while len(self.named(event)) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.named(event)


@contextmanager
def watch_logs() -> Iterator[WatchedLogs]:
    """Like `structlog.testing.capture_logs`, with waiting."""
    watched = WatchedLogs()
    processors = structlog.get_config()["processors"]
    old = processors.copy()
    try:
        processors.clear()
        processors.append(watched)
        structlog.configure(processors=processors)
        yield watched
    finally:
        processors.clear()
        processors.extend(old)
        structlog.configure(processors=processors)


@asynccontextmanager
async def daemon_in_process(
    folder: Path, emulator: str, server: RedisServer, consumer: str = "solo", **redis: Any
) -> AsyncIterator[tuple[Daemon, asyncio.Task[int]]]:
    """A daemon with the Redis intake in this process; stopped (SIGTERM-like) after.
    `redis` overrides keys of its [redis] section. AEP requests time out after 2 s (the
    emulator answers in milliseconds): a takeover of a triggering job waits that long."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    config = write_config(
        folder,
        emulator,
        aep={"request_timeout_s": 2},
        redis=redis_section(server, consumer, **redis),
    )
    settings = load_settings(config)
    assert settings.redis is not None
    daemon = spool_daemon(settings, clock=SystemClock())
    daemon.add_service(RedisIntake(daemon.admissions, settings.redis))
    task = asyncio.create_task(daemon.run())
    ready = asyncio.ensure_future(daemon.ready.wait())
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        yield daemon, task
    finally:
        ready.cancel()
        daemon.stop()
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(task, return_exceptions=True)


def by_job(results: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    counts = Counter(fields["job_id"] for _, fields in results)
    assert max(counts.values(), default=1) == 1, counts.most_common(3)
    return {fields["job_id"]: fields for _, fields in results}


# -- the headline ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_daemons_share_500_jobs_and_one_is_killed_half_way(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=0.2, max=1.0),
        latency_ms=Span(min=1, max=8),
        error_5xx_rate=0.02,
        drop_rate=0.005,
        seed=500,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        datasets = seed(state, 250)
        ids = [f"j{i:03d}" for i in range(500)]
        # Two exports of each dataset, to two paths: two lanes, one run per job.
        await submit(
            client,
            *(
                {"job": job(i, datasets[n % 250], path=f"ml/half{n // 250}")}
                for n, i in enumerate(ids)
            ),
        )

        daemons = {}
        for name in ("a", "b"):
            await asyncio.to_thread((tmp_path / name).mkdir)
            config = write_config(
                tmp_path / name,
                url,
                aep={"rate_limit_rps": 1000, "request_timeout_s": 5},
                daemon={"max_in_flight": 100},
                redis=redis_section(redis_server, name),
            )
            daemons[name] = await start_daemon(config, tmp_path / f"{name}.log")
        try:
            # Once a third of the results are in, some of them the first daemon's, a SIGKILL:
            # it has jobs in flight (lanes batch joins and triggers: requests no longer
            # measure progress). (On a loaded machine one daemon may start much later.)
            await until_entries(
                client,
                RESULTS,
                160,
                deadline_s=DEADLINE * 2,
                also=lambda found: any(f.get("consumer") == "a" for f in found),
            )
            assert await kill(daemons["a"]) == -signal.SIGKILL
            results = await until_entries(client, RESULTS, 500, deadline_s=90)
            survivor = await scrape(daemons["b"])
        finally:
            codes = [await kill(r, signal.SIGTERM) for r in daemons.values()]
        assert codes == [-signal.SIGKILL, EXIT_OK]

        outcomes = by_job(results)
        assert sorted(outcomes) == ids, "every job has exactly one result"
        assert {o["state"] for o in outcomes.values()} == {"succeeded"}
        finishers = Counter(o["consumer"] for o in outcomes.values())
        assert finishers["a"] > 0, finishers
        assert finishers["b"] > 0, finishers
        assert await pending(client, JOBS, GROUP) == 0, "every message acknowledged"
        assert await client.xlen(JOBS) == 0, "and deleted: the stream does not grow"
        assert await client.xlen(DEAD) == 0
        assert runs_by_dataset(state) == dict.fromkeys(datasets, 2), "one run per job"
        assert len({o["run_id"] for o in outcomes.values()}) == 500

        # The survivor took the dead daemon's jobs over after the lease and resumed them
        # from their progress (runs already going were polled, not triggered again).
        b_events = await daemons["b"].events()
        taken = sum(e["count"] for e in b_events if e["event"] == "redis_messages_taken_over")
        resumed = [e for e in b_events if e["event"] == "job_resumed"]
        assert taken > 0
        # Taken over mid-way, from their journaled progress (flow ready, triggering with its
        # mark, or running); the one-run-per-job count above shows none was triggered twice.
        # Which of these states the killed daemon's jobs were in depends on where batching
        # and the machine's load had them: on a busy machine, all 27 once sat in flow_ready.
        states = Counter(e["state"] for e in resumed)
        assert states, "the survivor resumed the dead daemon's jobs"
        assert set(states) <= {"flow_ready", "triggering", "running"}, states
        a_done = {j for j, o in outcomes.items() if o["consumer"] == "a"}
        assert not a_done & {e["job_id"] for e in resumed}

        # The survivor's /metrics tell the same story as its log and the results stream.
        assert survivor["published"] == finishers["b"]
        assert survivor["taken_over"] == taken
        assert survivor["resumed"] == len(resumed)
        assert survivor["started"] + survivor["resumed"] == finishers["b"]
        assert survivor["dead_lettered"] == 0


async def scrape(running: Running) -> dict[str, float]:
    """A child daemon's `aep_exporter_redis_messages_total` by outcome, from its /metrics."""
    (listening,) = [e for e in await running.events() if e["event"] == "admin_listening"]
    url = f"http://127.0.0.1:{listening['port']}/metrics"
    token = (await asyncio.to_thread(Path(listening["bearer_file"]).read_text)).strip()
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "aep_exporter_redis_messages_total"
    }


# -- poison, redelivery, restart -------------------------------------------------------------


async def test_poison_messages_go_to_the_dead_letter_stream_and_good_jobs_run(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        first, second = seed(state, 2)
        await client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        # A job delivered 5 times already (taken over by daemons that died with it, the
        # last one "gone"), its message idle: one more delivery is too many.
        [tired] = await submit(client, {"job": job("tired", first)})
        await client.xreadgroup(GROUP, "gone", {JOBS: ">"}, count=1)
        await client.xclaim(JOBS, GROUP, "gone", 0, [tired], idle=10**8, justid=True)
        left: dict[Any, Any] = {
            "owner": "gone",
            "message_id": tired,
            "deliveries": 5,
            "state": "received",
        }
        await client.hset(f"{JOBS}:progress:tired", mapping=left)
        poison: dict[str, dict[str, Any]] = {
            "invalid JSON at line 1, column 2": {"job": b"{not json"},
            "no 'job' field (fields: payload)": {"payload": b"{}"},
            "not UTF-8 text": {"job": b"\xff\xfe{}"},
            "the limit is 1048576 bytes": {"job": b" " * 1_048_577},
            "dataset_id: must be an AEP dataset id": {"job": job("bad", "not a dataset!")},
            "destination: unknown destination 'nowhere'": {
                "job": {**job("lost", first), "destination": "nowhere"}
            },
        }
        good = [{"job": job("good-1", first)}, {"job": job("good-2", second)}]
        sent = await submit(client, good[0], *poison.values(), good[1])

        async with daemon_in_process(tmp_path / "d", url, redis_server, lease_s=60):
            dead = await until_entries(client, DEAD, len(poison) + 1, deadline_s=DEADLINE)
            results = await until_entries(client, RESULTS, 2, deadline_s=DEADLINE)

        reasons = {fields["message_id"]: fields for _, fields in dead}
        for (expected, message), message_id in zip(poison.items(), sent[1:-1], strict=True):
            entry = reasons[message_id]
            assert expected in entry["reason"], entry["reason"]
            for name, value in message.items():  # the original fields, as they were sent
                sent_value = json.dumps(value) if isinstance(value, dict) else value
                got = entry[f"field:{name}"]
                assert (got.encode() if isinstance(got, str) else got) == (
                    sent_value.encode() if isinstance(sent_value, str) else sent_value
                )
        assert "delivered 6 times (max_deliveries is 5)" in reasons[tired]["reason"]
        assert (reasons[tired]["job_id"], reasons[tired]["deliveries"]) == ("tired", "6")
        assert {r["consumer"] for r in reasons.values()} == {"solo"}
        assert {f["job_id"]: f["state"] for _, f in results} == {
            "good-1": "succeeded",
            "good-2": "succeeded",
        }
        assert await pending(client, JOBS, GROUP) == 0, "poison is acknowledged, too"
        assert await client.xlen(JOBS) == 0, "and deleted from the job stream"
        assert triggers_by_job(state) == {"good-1": 1, "good-2": 1}


async def test_a_finished_job_is_not_run_again(tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        first, second = seed(state, 2)
        [original] = await submit(client, {"job": job("once", first)})
        with watch_logs() as logs:
            async with daemon_in_process(tmp_path / "d", url, redis_server):
                await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
                assert await client.xlen(JOBS) == 0, "a published job leaves the stream"
                # Submitted again, twice (a producer's retries).
                again = await submit(
                    client, {"job": job("once", first)}, {"job": job("once", first)}
                )
                async with asyncio.timeout(DEADLINE):
                    while not set(again) <= {
                        d["message_id"] for d in logs.named("redis_message_duplicate")
                    }:
                        logs.changed.clear()
                        await logs.changed.wait()
                await submit(client, {"job": job("after", second)})
                results = await until_entries(client, RESULTS, 2, deadline_s=DEADLINE)

    duplicates = logs.named("redis_message_duplicate")
    assert {d["why"] for d in duplicates} == {"done"}
    # Both resubmissions, in order; on a loaded machine the 2 s lease may also lapse while
    # the first message is being acknowledged, and its own redelivery is seen as done too.
    assert [d["message_id"] for d in duplicates if d["message_id"] in again] == again
    assert {d["message_id"] for d in duplicates} <= {*again, original}
    assert original not in again
    assert [f["job_id"] for _, f in results] == ["once", "after"]
    assert await pending(client, JOBS, GROUP) == 0
    assert await client.xlen(JOBS) == 0, "duplicates are deleted, too"
    assert triggers_by_job(state) == {"once": 1, "after": 1}


async def test_a_job_id_already_submitted_from_another_source_is_dead_lettered(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A job id runs once: a message for a job this daemon has from its spool (finished, or
    running) is dead-lettered saying so, and the job from the spool goes on undisturbed."""
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        first, second = seed(state, 2)
        async with daemon_in_process(tmp_path / "d", url, redis_server) as (daemon, _):
            spool = spool_of(daemon).dirs["incoming"].parent
            drop_job(spool, "filed.json", job("filed", first))
            await until_results(spool, ["filed.json"], deadline_s=DEADLINE)
            # The next one is held at its flow's creation while the message comes.
            await add_fault(url, {"action": "delay", "op": "flows.create", "delay_ms": 1000})
            drop_job(spool, "going.json", job("going", second))
            while "going" not in daemon.jobs:
                await state.received(state.arrivals + 1)
            sent = await submit(client, {"job": job("filed", first)}, {"job": job("going", first)})
            dead = await until_entries(client, DEAD, 2, deadline_s=DEADLINE)
            await until_results(spool, ["going.json"], deadline_s=DEADLINE)
        reasons = {fields["job_id"]: fields for _, fields in dead}
        assert [reasons["filed"]["message_id"], reasons["going"]["message_id"]] == sent
        assert (
            "job id 'filed' was already submitted from another source (spool, as "
            in (reasons["filed"]["reason"])
        )
        assert "now succeeded" in reasons["filed"]["reason"]
        assert "job id 'going' was already submitted" in reasons["going"]["reason"]
        assert "now succeeded" not in reasons["going"]["reason"]
        assert {r["state"] for r in results(spool).values()} == {"succeeded"}
        assert await client.xlen(RESULTS) == 0
        assert await pending(client, JOBS, GROUP) == 0
        assert await client.xlen(JOBS) == 0
        assert triggers_by_job(state) == {"filed": 1, "going": 1}


async def test_an_outcome_journaled_but_not_published_is_published_at_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The daemon died between journaling an outcome and telling Redis: its next start
    publishes the journaled outcome and runs nothing."""
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        await client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        [message_id] = await submit(client, {"job": job("told", dataset)})
        await client.xreadgroup(GROUP, "solo", {JOBS: ">"}, count=1)
        journal = await Journal.open(tmp_path / "d" / "state")
        spec = {"id": "told", "dataset_id": dataset, "destination": "lake", "path": "ml/told"}
        await journal.add("told", source="redis", name=message_id, spec=spec)
        for step in (JobState.FLOW_READY, JobState.TRIGGERING, JobState.RUNNING):
            await journal.advance("told", step, flow_id="f-1", run_id="r-1", intent_ms=1)
        await journal.finish(
            Outcome(job_id="told", state=JobState.SUCCEEDED, flow_id="f-1", run_id="r-1", files=2)
        )
        await journal.close()

        async with daemon_in_process(tmp_path / "d", url, redis_server):
            [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
        assert (result["job_id"], result["state"], result["run_id"]) == ("told", "succeeded", "r-1")
        assert json.loads(result["outcome"])["files"] == 2
        assert await pending(client, JOBS, GROUP) == 0
        assert list(state.all_runs()) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_restarted_daemon_resumes_its_own_jobs(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=3, max=3),
        seed=5,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        ids = [f"r{i}" for i in range(8)]
        datasets = seed(state, len(ids))
        await submit(client, *({"job": job(i, d)} for i, d in zip(ids, datasets, strict=True)))
        # Default lease (60 s): the restarted daemon resumes its jobs at once, as their
        # holder, rather than waiting for a lease to lapse.
        config = write_config(tmp_path, url, redis=redis_section(redis_server, "solo", lease_s=60))
        first = await start_daemon(config, tmp_path / "first.log")
        try:
            await first.until("run_triggered", count=len(ids), deadline_s=DEADLINE)
        finally:
            await kill(first)
        assert await pending(client, JOBS, GROUP) == len(ids)
        again = await start_daemon(config, tmp_path / "again.log")
        try:
            results = await until_entries(client, RESULTS, len(ids), deadline_s=DEADLINE)
        finally:
            assert await kill(again, signal.SIGTERM) == EXIT_OK
        resumed = [e for e in await again.events() if e["event"] == "job_resumed"]
        assert sorted(e["job_id"] for e in resumed) == ids
        assert {e["state"] for e in resumed} <= {"triggering", "running"}
        assert {f["state"] for f in by_job(results).values()} == {"succeeded"}
        assert await pending(client, JOBS, GROUP) == 0
        assert triggers_by_job(state) == dict.fromkeys(ids, 1)


async def test_a_dead_daemons_jobs_are_resumed_from_their_progress(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What a daemon that died leaves in Redis: jobs at some state, their locks lapsed, their
    messages idle. Another resumes them from there; one whose lock is still held is left."""
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        datasets = seed(state, 3)
        await client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        names = ["at-flow", "triggering", "held"]
        sent = await submit(
            client, *({"job": job(n, d)} for n, d in zip(names, datasets, strict=True))
        )
        await client.xreadgroup(GROUP, "dead", {JOBS: ">"}, count=3)
        await client.xclaim(JOBS, GROUP, "dead", 0, list[Any](sent), idle=10**8, justid=True)
        left: dict[str, dict[str, str | int]] = {
            "at-flow": {"state": "flow_ready", "rank": 2, "flow_id": "gone-flow"},
            # It journaled its trigger intent, and died before sending the trigger.
            "triggering": {"state": "triggering", "rank": 3, "intent_ms": int(time.time() * 1000)},
            "held": {"state": "flow_ready", "rank": 2},
        }
        for (name, progress), message_id in zip(left.items(), sent, strict=True):
            hash_fields: dict[Any, Any] = {"owner": "dead", "message_id": message_id, **progress}
            await client.hset(f"{JOBS}:progress:{name}", mapping=hash_fields)
        await client.set(f"{JOBS}:lock:held", "alive", px=60_000)  # alive, if slow

        with watch_logs() as logs:
            async with daemon_in_process(tmp_path / "d", url, redis_server, lease_s=60):
                results = await until_entries(client, RESULTS, 2, deadline_s=DEADLINE)
                [busy] = await logs.until("redis_job_busy")
        resumed = {e["job_id"]: e["state"] for e in logs.named("job_resumed")}
        assert resumed == {"at-flow": "flow_ready", "triggering": "triggering"}
        # Only the job left triggering waits out a trigger its holder may have on the wire.
        [waited] = logs.named("redis_takeover_waiting")
        assert (waited["job_id"], waited["taken_from"], waited["seconds"]) == (
            "triggering",
            "dead",
            2,
        )
        assert (busy["job_id"], busy["holder"]) == ("held", "alive")
        assert {f["job_id"]: f["state"] for _, f in results} == {
            "at-flow": "succeeded",
            "triggering": "succeeded",
        }
        assert triggers_by_job(state) == {"at-flow": 1, "triggering": 1}
        left_pending: Any = await client.xpending_range(JOBS, GROUP, "-", "+", 10)
        assert [(e["message_id"].decode(), e["consumer"]) for e in left_pending] == [
            (sent[2], b"solo")  # its holder's heartbeat takes it back, or a later takeover
        ]


async def test_restarts_are_no_deliveries_but_takeovers_are(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A daemon's own restarts (deploys, crashes, Redis outages) do not use up a long job's
    deliveries: with max_deliveries=2 it outlives three of them. A job taken over from
    daemons that keep dying on it still ends in the dead-letter stream."""
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=600, max=600),
        seed=4,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        [message_id] = await submit(client, {"job": job("long", dataset)})
        redis = {"max_deliveries": 2, "lease_s": 0.5}
        a, b = tmp_path / "a", tmp_path / "b"
        with watch_logs() as logs:
            async with daemon_in_process(a, url, redis_server, "a", **redis):
                progress = f"{JOBS}:progress:long"
                await until_field(client, progress, "state", "running", deadline_s=DEADLINE)
            for restart in (1, 2, 3):
                if restart == 2:  # a takeover that found the job busy left its message here
                    await client.xclaim(JOBS, GROUP, "elsewhere", 0, [message_id], justid=True)
                async with daemon_in_process(a, url, redis_server, "a", **redis):
                    await logs.until("job_resumed", count=restart)
            assert await client.xlen(DEAD) == 0
            assert await client.hget(progress, "deliveries") == b"1"

            # "a" is gone: "b" takes the job over (a second delivery) and dies with it too.
            async with daemon_in_process(b, url, redis_server, "b", **redis):
                await logs.until("job_resumed", count=4)
            # "a" comes back: its journal says the job is "b"'s now; taking it over once
            # more would be a third delivery.
            async with daemon_in_process(a, url, redis_server, "a", **redis) as (daemon, _):
                [(_, dead)] = await until_entries(client, DEAD, 1, deadline_s=DEADLINE)
                assert daemon.journal is not None
                assert await daemon.journal.get("long") is None
        resumed = [(e["job_id"], e["state"]) for e in logs.named("job_resumed")]
        assert resumed == [("long", "running")] * 4
        [handed] = logs.named("redis_job_handed_over")
        assert (handed["job_id"], handed["why"]) == ("long", "taken over by b")
        assert (dead["job_id"], dead["message_id"], dead["consumer"]) == ("long", message_id, "a")
        assert "delivered 3 times (max_deliveries is 2)" in dead["reason"], dead["reason"]
        assert await client.xlen(RESULTS) == 0
        assert await pending(client, JOBS, GROUP) == 0
        assert await client.xlen(JOBS) == 0
        assert triggers_by_job(state) == {"long": 1}


async def test_a_deleted_stream_is_made_again_and_read(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        with watch_logs() as logs:
            async with daemon_in_process(tmp_path / "d", url, redis_server):
                await client.delete(JOBS)  # with its group, under a blocked read
                await logs.until("redis_group_missing")
                await submit(client, {"job": job("again", dataset)})
                [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
        assert result["state"] == "succeeded"
        assert await pending(client, JOBS, GROUP) == 0


# -- losing a job to another daemon ----------------------------------------------------------


async def stopped(daemon: Daemon, job_id: str, task: asyncio.Task[None]) -> bool:
    """Whether the job's task ended cancelled (without an outcome) and left the daemon."""
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(task, return_exceptions=True)
    return task.cancelled() and job_id not in daemon.jobs


async def test_a_job_whose_lock_was_taken_is_never_triggered(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = redis_server.client
    async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        # The flow's creation is held a moment: meanwhile another daemon takes the job.
        # (A long lease: the heartbeat, which would notice it too, stays out of the way.)
        folder = tmp_path / "d"
        async with daemon_in_process(folder, url, redis_server, lease_s=60) as (daemon, _):
            await add_fault(url, {"action": "delay", "op": "flows.create", "delay_ms": 1500})
            with watch_logs() as logs:
                await submit(client, {"job": job("taken", dataset)})
                while "taken" not in daemon.jobs:  # the lanes' tidy-up at start calls AEP too
                    await state.received(state.arrivals + 1)
                task = daemon.jobs["taken"]  # the job has started: its lock is held
                await client.set(f"{JOBS}:lock:taken", "intruder", px=60_000)
                [lost] = await logs.until("redis_job_lost")
            assert (lost["state"], lost["holder"]) == ("flow_ready", "intruder")
            assert await stopped(daemon, "taken", task)
            assert daemon.journal is not None
            assert await daemon.journal.get("taken") is None, "not shown as running here"
        assert list(state.all_runs()) == []
        assert await pending(client, JOBS, GROUP) == 1, "the intruder's to settle now"
        assert await client.xlen(RESULTS) == 0


@pytest.mark.parametrize("told_by", ["lock", "pending"])
async def test_the_heartbeat_gives_up_a_job_another_daemon_took_and_forgets_it(
    tmp_path: Path, redis_server: RedisServer, told_by: str
) -> None:
    """Another consumer holds the job: its lock says so or, with no lock and no progress
    left, its message pending with that consumer does (not a loss of Redis's data)."""
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=600, max=600),
        seed=3,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        folder = tmp_path / "d"
        await submit(client, {"job": job("long", dataset)})
        with watch_logs() as logs:
            async with daemon_in_process(folder, url, redis_server, lease_s=1.5) as (daemon, _):
                # Once its last checkpoint is past, only the heartbeat can notice.
                progress = f"{JOBS}:progress:long"
                await until_field(client, progress, "state", "running", deadline_s=DEADLINE)
                task = daemon.jobs["long"]
                if told_by == "lock":
                    await client.set(f"{JOBS}:lock:long", "intruder", px=60_000)
                else:
                    [message_id] = [i for i, _ in await entries(client, JOBS)]
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.delete(f"{JOBS}:lock:long", progress)
                        pipe.xclaim(JOBS, GROUP, "intruder", 0, [message_id], justid=True)
                        await pipe.execute()
                [lost] = await logs.until("redis_job_lost")  # said once it is given up
                assert "state" not in lost, "found by the heartbeat, not a checkpoint"
                assert (lost["why"], lost["holder"]) == ("lost", "intruder")
                assert await stopped(daemon, "long", task)
                assert daemon.journal is not None
                assert await daemon.journal.get("long") is None, "not shown as running here"
                assert [r.job_id for r in await daemon.journal.unfinished()] == []
        assert await client.xlen(RESULTS) == 0
        assert triggers_by_job(state) == {"long": 1}


async def advance_emulator(url: str, seconds: float) -> None:
    """Move the emulator's clock (AEP's) on: its waits pass without a real one."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/_emulator/clock", json={"advance": seconds}) as resp,
    ):
        assert resp.status == 200, await resp.text()


def part_files(folder: Path) -> dict[Path, set[str]]:
    """The part files the emulator wrote under `folder`, as folder -> the Spark transaction
    ids (`tid`) in their names: one export writes one set, with one tid."""
    found: dict[Path, set[str]] = {}
    for path in folder.rglob("part-*"):
        found.setdefault(path.parent, set()).add(path.name.split("-tid-")[1].split("-")[0])
    return found


async def test_a_daemon_cut_off_from_redis_never_triggers_a_job_taken_over_meanwhile(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Daemon "a" waits for AEP's not-ready window with its job journaled `triggering`;
    its Redis connection stalls (a paused proxy: no error, no answer). Its lease lapses, "b"
    takes the job over and triggers it. "a" must not send its own trigger once the window
    opens: each call is fenced by a lease renewal that "a" cannot get, and "a" hands the job
    back when its lease lapses by its own clock. One run, one set of part files."""
    client = redis_server.client
    # AEP refuses the dataset's ad hoc run for 10 minutes of its clock, which stands still
    # until the test moves it; runs take a moment, so a second trigger would start a second
    # run rather than be told one is in progress.
    knobs = emulator_knobs(
        not_ready_window_s=600,
        run_duration_s=Span(min=0.05, max=0.05),
        seed=12,
    )
    progress = f"{JOBS}:progress:fenced"
    redis = {"lease_s": 2, "outage_s": 1}
    async with (
        serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state),
        PausableProxy(redis_server.port) as proxy,
    ):
        [dataset] = seed(state, 1)
        await submit(client, {"job": job("fenced", dataset)})
        with watch_logs() as logs:
            async with daemon_in_process(
                tmp_path / "a", url, redis_server, "a", url=proxy.url, **redis
            ) as (a, _):
                await until_field(client, progress, "state", "triggering", deadline_s=DEADLINE)
                await logs.until("trigger_not_ready")  # "a" waits for the window
                task = a.jobs["fenced"]
                async with daemon_in_process(tmp_path / "b", url, redis_server, "b", **redis):
                    proxy.pause()
                    try:
                        await until_field(client, progress, "owner", "b", deadline_s=DEADLINE)
                        # "b" resumed the job, and its trigger was refused: not ready yet.
                        [resumed] = await logs.until("job_resumed")
                        refused = len(logs.named("trigger_not_ready"))
                        await logs.until("trigger_not_ready", count=refused + 1)
                        await advance_emulator(url, 600)
                        [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
                    finally:
                        proxy.resume()
                    assert await stopped(a, "fenced", task)
                    assert a.journal is not None
                    assert await a.journal.get("fenced") is None, "not shown as running on a"
        await settle_runs(state, state.all_runs())  # every run's files, read or not

    assert (resumed["job_id"], resumed["state"]) == ("fenced", "triggering")
    assert (result["job_id"], result["state"], result["consumer"]) == ("fenced", "succeeded", "b")
    assert runs_by_dataset(state) == {dataset: 1}, "one run: a never triggered after its lease"
    assert triggers_by_job(state) == {"fenced": 1}
    [(folder, tids)] = part_files(tmp_path / "emulator").items()
    assert len(tids) == 1, tids
    assert folder.name.startswith("exportTime=")
    assert len(list(folder.glob("part-*"))) == int(result["files"]) > 0
    handed = logs.named("redis_job_handed_back") + logs.named("redis_trigger_fenced")
    assert handed, "a gave the job up itself, while cut off from Redis"


async def test_the_fence_says_by_when_the_trigger_must_be_on_the_wire(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A renewed lease holds for `lease_s` from the renewal's start; the fence gives the
    trigger three quarters of it, a quarter before the lease could lapse."""
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=600,
        run_duration_s=Span(min=1, max=1),
        seed=4,
    )
    lease_s = 8.0
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        [message_id] = await submit(client, {"job": job("waiting", dataset)})
        with watch_logs() as logs:
            async with daemon_in_process(
                tmp_path / "d", url, redis_server, lease_s=lease_s, outage_s=1
            ) as (daemon, _):
                await logs.until("trigger_not_ready")  # held, and fenced once already
                [intake] = [s for s in daemon.services if isinstance(s, RedisIntake)]
                before = daemon.clock.monotonic()
                send_by = await Message(intake, message_id, "waiting").fence()
                after = daemon.clock.monotonic()
    assert before + lease_s * 0.75 <= send_by <= after + lease_s * 0.75


async def test_a_running_job_outlives_redis_losing_its_data(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """FLUSHALL while a job's run goes on (what a restart without persistence or a failover
    that lost writes leaves): nothing says another daemon has the job, so it is not taken
    for a takeover. Its lock and progress are made again, and so is the group; the job
    finishes and its result is published. A job submitted afterwards runs too."""
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=600, max=600),
        seed=8,
    )
    progress = f"{JOBS}:progress:kept"
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        first, second = seed(state, 2)
        await submit(client, {"job": job("kept", first)})
        with watch_logs() as logs:
            async with daemon_in_process(tmp_path / "d", url, redis_server, lease_s=1.5) as (
                daemon,
                _,
            ):
                await until_field(client, progress, "state", "running", deadline_s=DEADLINE)
                await client.flushall()
                [restored] = await logs.until("redis_job_restored")
                assert await client.get(f"{JOBS}:lock:kept") == b"solo"
                kept: Any = await client.hgetall(progress)
                assert (kept[b"owner"], kept[b"state"]) == (b"solo", b"running")
                assert kept[b"run_id"].decode() == restored_run(state)
                await advance_emulator(url, 600)  # the run ends
                [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
                await submit(client, {"job": job("after", second)})  # read: the group is back
                after = f"{JOBS}:progress:after"
                await until_field(client, after, "state", "running", deadline_s=DEADLINE)
                await advance_emulator(url, 600)
                results = await until_entries(client, RESULTS, 2, deadline_s=DEADLINE)
                assert daemon.journal is not None
                record = await daemon.journal.get("kept")
    assert (restored["job_id"], restored["state"]) == ("kept", "running")
    assert (result["job_id"], result["state"], result["consumer"]) == ("kept", "succeeded", "solo")
    assert record is not None
    assert record.state is JobState.SUCCEEDED
    assert not logs.named("redis_job_lost")
    assert [f["job_id"] for _, f in results] == ["kept", "after"]
    assert triggers_by_job(state) == {"kept": 1, "after": 1}
    assert await pending(client, JOBS, GROUP) == 0


async def test_a_restart_after_redis_lost_its_data_resumes_the_job(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The daemon stops with a job's run going on; Redis loses its data before the next
    start. The journal's job is not forgotten as "no longer pending": it is resumed, its
    keys are made again, and its result is published."""
    client = redis_server.client
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=600, max=600),
        seed=10,
    )
    progress = f"{JOBS}:progress:again"
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        await submit(client, {"job": job("again", dataset)})
        folder = tmp_path / "d"
        with watch_logs() as logs:
            async with daemon_in_process(folder, url, redis_server):
                await until_field(client, progress, "state", "running", deadline_s=DEADLINE)
            await client.flushall()
            async with daemon_in_process(folder, url, redis_server):
                [restored] = await logs.until("redis_job_restored")
                await advance_emulator(url, 600)  # the run ends
                [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
    assert (restored["job_id"], restored["state"]) == ("again", "running")
    assert [(e["job_id"], e["state"]) for e in logs.named("job_resumed")] == [("again", "running")]
    assert not logs.named("redis_job_handed_over")
    assert (result["job_id"], result["state"]) == ("again", "succeeded")
    assert result["run_id"] == restored_run(state)
    assert triggers_by_job(state) == {"again": 1}


def restored_run(state: EmulatorState) -> str:
    [run] = state.all_runs()
    return run.id


# -- Redis going away ------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_long_redis_outage_stops_the_daemon_with_70_and_the_next_start_settles(
    tmp_path: Path,
) -> None:
    """Redis goes away while a job runs: the job ends and journals its outcome, the daemon
    retries for `outage_s` and exits 70; with Redis back, the next start publishes that
    outcome from its journal, without running the job again. No secret reaches the logs."""
    secret = "s3cret-redis-password"
    folder = tmp_path / "redis"
    server = await start_redis(folder, password=secret, persist=True)
    (tmp_path / "redis_password").write_text(secret + "\n")
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=1, max=1),
        seed=9,
    )
    # outage_s leaves the 1 s run time to end first, even on a loaded machine.
    redis: dict[str, Any] = {"password_file": "redis_password", "outage_s": 6.0, "lease_s": 60}
    progress = f"{JOBS}:progress:outlived"
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        await submit(server.client, {"job": job("outlived", dataset)})
        try:
            with watch_logs() as logs:
                async with daemon_in_process(tmp_path, url, server, **redis) as (_, task):
                    await until_field(
                        server.client, progress, "state", "running", deadline_s=DEADLINE
                    )
                    await client_kill(server)  # a dropped connection is retried at once
                    await server.stop()  # an outage is not
                    async with asyncio.timeout(DEADLINE):
                        code = await task
                # The job ends during the outage, and its line is logged once its result is
                # handed over; on a loaded machine the 70 may come first, and the next start
                # settles it from the journal instead (checked below: one trigger, one result).
                finished = logs.named("job_finished")
                unreachable = logs.named("redis_unreachable")
                died = logs.named("task_died")
                server = await start_redis(folder, password=secret, persist=True, port=server.port)
                async with daemon_in_process(tmp_path, url, server, **redis):
                    [(_, result)] = await until_entries(
                        server.client, RESULTS, 1, deadline_s=DEADLINE
                    )
                    assert await pending(server.client, JOBS, GROUP) == 0
        finally:
            await server.stop()
    assert code == EXIT_SOFTWARE
    assert [d["task"] for d in died] == ["redis"]
    assert "RedisUnavailable" in died[0]["error"]
    assert logs.named("redis_retrying")
    assert {u["url"] for u in unreachable} == {server.url}
    assert min(u["seconds"] for u in unreachable) >= redis["outage_s"], "the whole outage_s"
    assert len(finished) <= 1
    assert all(f["state"] == "succeeded" for f in finished)
    assert (result["job_id"], result["state"]) == ("outlived", "succeeded")
    assert all(result["run_id"] == f["run_id"] for f in finished)
    assert triggers_by_job(state) == {"outlived": 1}
    assert secret not in repr(logs.entries)


async def client_kill(server: RedisServer) -> None:
    admin = aioredis.Redis(host="127.0.0.1", port=server.port, password=server.password)
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
        )
    finally:
        await admin.aclose()


async def until_retried(
    logs: WatchedLogs, *operations: str, since: int = 0, error: str = ""
) -> list[EventDict]:
    """Wait until each of `operations` has been retried (logged `redis_retrying`) for an
    error starting with `error`, counting from the `since`-th such entry; those entries."""

    def retried() -> list[EventDict]:
        entries = logs.named("redis_retrying")[since:]
        return [e for e in entries if e["error"].startswith(error)]

    async with asyncio.timeout(DEADLINE):
        while not set(operations) <= {e["operation"] for e in retried()}:
            logs.changed.clear()
            await logs.changed.wait()
    return retried()


async def test_redis_refusing_commands_for_a_while_is_waited_out(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis out of memory (maxmemory) while a job creates its flow, busy with a script while
    the job runs, then out of memory again as it ends: the checkpoints, the heartbeat and the
    settle wait it out. The job is not failed, the daemon does not stop."""
    client = redis_server.client
    # The run ends when the test moves the emulator's clock, inside the last while, so the
    # settle comes there however loaded the machine; each while stays well under the lease
    # (10 s: a job whose lease lapses while Redis refuses is handed back, as it must be).
    knobs = emulator_knobs(
        not_ready_window_s=0.3,
        run_duration_s=Span(min=600, max=600),
        seed=6,
    )
    progress = f"{JOBS}:progress:patient"
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        [dataset] = seed(state, 1)
        with watch_logs() as logs:
            async with daemon_in_process(tmp_path / "d", url, redis_server, lease_s=10) as (
                daemon,
                task,
            ):
                await add_fault(url, {"action": "delay", "op": "flows.create", "delay_ms": 500})
                await submit(client, {"job": job("patient", dataset)})
                while "patient" not in daemon.jobs:  # claimed, and started
                    await state.received(state.arrivals + 1)
                await client.config_set("maxmemory", 1)
                out_of_memory = await until_retried(logs, "checkpoint", "heartbeat")
                await client.config_set("maxmemory", 0)

                await until_field(client, progress, "state", "running", deadline_s=DEADLINE)
                await client.config_set("busy-reply-threshold", 50)
                # (no socket timeout: the script's caller waits for it, however long)
                blocker = aioredis.Redis(
                    host="127.0.0.1", port=redis_server.port, socket_timeout=None
                )
                try:
                    busy = asyncio.ensure_future(blocker.eval("while true do end", 0))
                    since = len(logs.named("redis_retrying"))
                    await until_retried(logs, "heartbeat", since=since, error="BUSY")
                    await blocker.script_kill()
                    with pytest.raises(ResponseError, match="killed"):
                        await busy
                finally:
                    await blocker.aclose()
                # The job's end, and so its settle, falls in this while.
                await client.config_set("maxmemory", 1)
                await advance_emulator(url, 600)
                await until_retried(logs, "settle")
                await client.config_set("maxmemory", 0)
                [(_, result)] = await until_entries(client, RESULTS, 1, deadline_s=DEADLINE)
                assert not task.done(), "the daemon runs on"
    assert (result["job_id"], result["state"]) == ("patient", "succeeded")
    assert all("used memory > 'maxmemory'" in e["error"] for e in out_of_memory)
    assert not [e for e in logs.entries if e["event"] in ("task_died", "job_crashed")]
    assert triggers_by_job(state) == {"patient": 1}
    assert await pending(client, JOBS, GROUP) == 0


NO_RETRY = Retry(NoBackoff(), 0)


async def refused(call: Awaitable[Any]) -> Exception:
    """The error `call` fails with (it must fail)."""
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("expected Redis to refuse the command")


async def test_which_redis_errors_are_waited_out(redis_server: RedisServer) -> None:
    """Passing server states are retried, alone or as a pipeline's command (which redis-py
    wraps); mistakes and a wrong password are not."""
    client = redis_server.client
    await client.set("text", "x")
    await client.xgroup_create(JOBS, GROUP, mkstream=True)

    async def piped(redis: aioredis.Redis, *command: Any) -> Exception:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            return await refused(pipe.execute())

    await client.config_set("maxmemory", 1)
    out_of_memory = [await refused(client.set("k", "v")), await piped(client, "SET", "k", "v")]
    await client.config_set("maxmemory", 0)

    await client.config_set("busy-reply-threshold", 50)
    blocker = aioredis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=None)
    other = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        script = asyncio.ensure_future(blocker.eval("while true do end", 0))
        async with asyncio.timeout(DEADLINE):
            while not isinstance(busy := await refused(other.get("text")), ResponseError):
                pass  # (a ConnectionError until the script has run past the threshold)
        busy_piped = await piped(other, "GET", "text")
        await blocker.script_kill()
        await asyncio.gather(script, return_exceptions=True)
    finally:
        await other.aclose()
        await blocker.aclose()
    # MISCONF (writes stopped after a failed save) takes a broken disk to cause for real.
    misconf = "MISCONF Errors writing to the AOF file: No space left on device"
    misconf_piped = f"Command # 1 (SET k v) of pipeline caused error: ({misconf!r},)"

    waited = [
        *out_of_memory,
        busy,
        busy_piped,
        ResponseError(misconf),
        ResponseError(misconf_piped),
    ]
    stranger = aioredis.Redis(  # (redis-py retries a refused login itself unless told not to)
        host="127.0.0.1",
        port=redis_server.port,
        username="nobody",
        password="wrong",
        retry=NO_RETRY,
    )
    mistakes = [
        await refused(client.incr("text")),  # not an integer
        await piped(client, "HGET", "text", "field"),  # WRONGTYPE
        await refused(client.xgroup_create(JOBS, GROUP)),  # BUSYGROUP
        await refused(client.xreadgroup("nogroup", "c", {JOBS: ">"})),  # NOGROUP
        await refused(stranger.ping()),
    ]
    await stranger.aclose()
    assert all(isinstance(e, OutOfMemoryError) for e in out_of_memory)
    codes = [reply_code(e) for e in waited if isinstance(e, ResponseError)]
    assert codes[2:] == ["BUSY", "BUSY", "MISCONF", "MISCONF"]
    assert [retryable(e) for e in waited] == [True] * 6, [repr(e) for e in waited]
    assert [retryable(e) for e in mistakes] == [False] * 5, [repr(e) for e in mistakes]


async def test_a_wrong_password_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    server = await start_redis(tmp_path / "redis", password="the-right-one")
    try:
        url = f"redis://:the-wrong-one@127.0.0.1:{server.port}/0"
        config = RedisConfig(url=url, consumer="c")
        assert config.safe_url == f"redis://:***@127.0.0.1:{server.port}/0"
        async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (emu, _):
            settings = load_settings(write_config(tmp_path, emu, redis={"url": url}))
            daemon = spool_daemon(settings, clock=SystemClock())
            assert settings.redis is not None
            daemon.add_service(RedisIntake(daemon.admissions, settings.redis))
            with watch_logs() as logs, pytest.raises(RuntimeError, match="refused us") as err:
                await daemon.run()
        assert "the-wrong-one" not in str(err.value)
        assert "the-wrong-one" not in repr(logs.entries)
    finally:
        await server.stop()


async def test_a_password_in_the_url_query_is_never_shown(tmp_path: Path) -> None:
    """redis-py reads `?password=` too: the logged url masks it, connected or refused or
    unreachable, and password_file may not give a second one."""
    secret = "query-secret-right"
    wrong = "query-secret-wrong"
    server = await start_redis(tmp_path / "redis", password=secret)
    (tmp_path / "pw").write_text("from-a-file\n")
    try:
        base = f"redis://127.0.0.1:{server.port}/0"
        masked = RedisConfig(url=f"{base}?password={secret}&db=0", consumer="c").safe_url
        assert masked == f"{base}?password=***&db=0"
        unix = RedisConfig(url="unix:///run/redis.sock?db=1&password=x", consumer="c")
        assert unix.safe_url == "unix:///run/redis.sock?db=1&password=***"
        with pytest.raises(ValidationError, match="keep one"):
            RedisConfig.model_validate(
                {"url": f"{base}?password=x", "password_file": str(tmp_path / "pw")}
            )
        errors: list[str] = []
        async with serve(FAST, tmp_path / "emulator", clock=SystemClock()) as (emu, _):
            with watch_logs() as logs:
                right = {"url": f"{base}?password={secret}"}
                async with daemon_in_process(tmp_path / "ok", emu, server, **right):
                    [connected] = await logs.until("redis_connected")
                for password in (wrong, secret):  # refused; then unreachable
                    if password == secret:
                        await server.stop()
                    url = f"{base}?password={password}"
                    redis = {"url": url, "consumer": "c", "outage_s": 0.5}
                    await asyncio.to_thread((tmp_path / password).mkdir)
                    config = write_config(tmp_path / password, emu, redis=redis)
                    settings = load_settings(config)
                    assert settings.redis is not None
                    daemon = spool_daemon(settings, clock=SystemClock())
                    daemon.add_service(RedisIntake(daemon.admissions, settings.redis))
                    with pytest.raises(Exception) as err:  # noqa: PT011 - either kind, below
                        await daemon.run()
                    errors.append(f"{type(err.value).__name__}: {err.value}")
    finally:
        await server.stop()
    assert connected["url"] == f"{base}?password=***"
    assert "refused us" in errors[0]
    assert errors[1].startswith("RedisUnavailable: ")
    assert logs.named("redis_refused")
    assert logs.named("redis_unreachable")
    for shown in (repr(logs.entries), *errors):
        assert secret not in shown
        assert wrong not in shown
    assert f"{base}?password=***" in errors[0]
    assert f"{base}?password=***" in errors[1]


# -- configuration ---------------------------------------------------------------------------


def test_redis_config_reads_its_password_from_a_file_and_checks_itself(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-a-file\n")
    config = RedisConfig.model_validate({"password_file": str(tmp_path / "pw")})
    assert config.password is not None
    assert config.password.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(config)
    assert config.consumer  # the host name by default
    assert config.safe_url == "redis://127.0.0.1:6379/0"
    assert config.outage_s < config.lease_s, "the defaults hold together"
    bad = {
        "password or password_file, not both": {
            "password": "x",
            "password_file": str(tmp_path / "pw"),
        },
        "must start with redis://": {"url": "http://localhost"},
        "must differ": {"results_stream": "aep-exporter:jobs"},
        "keep one": {"url": "redis://:pw@h:1/0", "password_file": str(tmp_path / "pw")},
        r"outage_s \(60\) must be shorter than lease_s \(60\)": {"outage_s": 60},
        r"outage_s \(120\) must be shorter than lease_s \(60\)": {"outage_s": 120},
    }
    for expected, values in bad.items():
        with pytest.raises(ValidationError, match=expected):
            RedisConfig.model_validate(values)


@pytest.mark.parametrize(
    ("url", "password", "allowed"),
    [
        ("redis://redis.internal:6379/0", True, False),  # a password in clear text: refused
        ("redis://:pw@redis.internal:6379/0", False, False),
        ("redis://redis.internal:6379/0?password=pw", False, False),
        ("redis://10.0.0.7:6379/0", True, False),
        ("rediss://redis.internal:6380/0", True, True),  # TLS
        ("redis://redis.internal:6379/0", False, True),  # no password to leak
        ("redis://127.0.0.1:6379/0", True, True),  # this machine
        ("redis://localhost:6379/0", True, True),
        ("redis://[::1]:6379/0", True, True),
        ("unix:///run/redis.sock", True, True),
    ],
)
def test_a_password_over_plain_redis_to_another_host_needs_an_opt_out(
    tmp_path: Path, url: str, password: bool, allowed: bool
) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    given: dict[str, Any] = {"url": url, "consumer": "c"}
    if password:
        given["password_file"] = str(tmp_path / "pw")
    if allowed:
        RedisConfig.model_validate(given)
    else:
        with pytest.raises(ValidationError, match="clear text: use rediss://") as refused:
            RedisConfig.model_validate(given)
        said = describe_errors(refused.value, "redis")  # what the settings loader prints
        assert "rediss://" in said
        assert "s3cret" not in said
        assert "pw@" not in said
        RedisConfig.model_validate({**given, "insecure_plaintext": True})  # the opt-out
