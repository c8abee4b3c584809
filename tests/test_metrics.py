"""The `/metrics` exposition, fetched over HTTP from the daemon's own admin server and read
with Prometheus' own text parser: a daemon working through jobs against an emulator that
throttles, fails and drops requests reports what the emulator's journal says happened; the
pieces with arithmetic in them are checked on their own."""

from __future__ import annotations

import asyncio
import platform
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

import aep_emulator.query
import aep_emulator.runs
from aep_emulator.query import ListQuery
from aep_emulator.settings import Knobs
from exporter import __version__
from exporter.aep.api import RunInfo
from exporter.aep.client import HttpAep
from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.daemon.assemble import build_daemon
from exporter.daemon.config import AdminConfig, RedisConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.engine.config import EngineConfig
from exporter.engine.poller import RunPoller
from exporter.jobs import JobState, Outcome
from exporter.metrics import (
    IN_FLIGHT_STATES,
    REDIS_OUTCOMES,
    Metrics,
    detection_delay_s,
    run_duration_s,
)
from exporter.ops.admin import AdminServer
from tests.conftest import Emulator, default_knobs
from tests.test_daemon_intake import DEADLINE, Running, good_job, settings_for
from tests.test_engine_unit import flow_with_runs

JOBS = 8
RUN_S = 5.0  # every emulated run lasts exactly this long
STATES = {"success": "succeeded", "failed": "failed"}  # a run's status: its job's state
FAILURES = frozenset({"429", "500", "502", "503", "504", "error"})
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TOKEN = "metrics-scraper-token-0123456789"


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs(
        error_429_rate=0.08,
        error_5xx_rate=0.08,
        run_failure_rate=0.3,
        run_duration_s={"min": RUN_S, "max": RUN_S},
    )


@dataclass
class Served(Running):
    """A running daemon built as `aep-exporter run` builds it, with its admin server."""

    url: str = field(kw_only=True)
    session: aiohttp.ClientSession = field(kw_only=True)

    async def scrape(self) -> str:
        """`GET /metrics`, as Prometheus asks for it (with the admin token)."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.session.get(f"{self.url}/metrics", headers=headers) as resp:
            body = await resp.text()
            assert resp.status == 200, body
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return body


@asynccontextmanager
async def serving(emulator: Emulator, tmp_path: Path) -> AsyncIterator[Served]:
    """The daemon and its admin server (on a free loopback port, token required), in process."""
    settings = settings_for(emulator, tmp_path)
    admin = AdminConfig(port=0, token=SecretStr(TOKEN))
    made = build_daemon(settings.model_copy(update={"admin": admin}), clock=emulator.clock)
    (server,) = [s for s in made.services if isinstance(s, AdminServer)]
    task = asyncio.create_task(made.run(), name="daemon")
    ready = asyncio.ensure_future(made.ready.wait())
    await asyncio.wait({ready, task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
    assert ready.done(), "the daemon did not become ready"
    staging = tmp_path / "spool" / "staging"
    staging.mkdir()
    try:
        async with aiohttp.ClientSession() as session:
            yield Served(
                made, task, staging, url=f"http://127.0.0.1:{server.port}", session=session
            )
    finally:
        made.stop()
        code = await asyncio.wait_for(task, DEADLINE)
    assert code == EXIT_OK


async def quiet(daemon: Daemon) -> None:
    """Until every job task has ended: a job's outcome is filed just before its task ends."""
    tasks = list(daemon.jobs.values())
    if tasks:
        done, _ = await asyncio.wait(tasks, timeout=DEADLINE)
        assert len(done) == len(tasks), "job tasks still running"


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Every sample of `name` with a non-zero value, keyed by the values of `keys`."""
    found: dict[tuple[str, ...], float] = {}
    for (sample, labels), v in samples.items():
        if sample == name and v:
            got = dict(labels)
            found[tuple(got[k] for k in keys)] = v
    return found


def spy_on_run_queries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many run ids each `GET /runs?property=id==...` that reached the emulator's handler
    asked about (requests refused by a fault never get there)."""
    asked: list[int] = []
    parse_query = aep_emulator.query.parse_list_query

    def spying(*args: Any, **kwargs: Any) -> ListQuery:
        query = parse_query(*args, **kwargs)
        ids = query.id_candidates()
        if ids is not None:
            asked.append(len(ids))
        return query

    monkeypatch.setattr(aep_emulator.runs, "parse_list_query", spying)
    return asked


async def test_the_exposition_agrees_with_the_emulators_journal(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = spy_on_run_queries(monkeypatch)
    datasets = await emulator.seed(rows=10, count=JOBS)
    # Two dropped status queries in a row: aiohttp sends a GET again by itself after the
    # first, then our transport retries it. A dropped create is not re-sent blindly: it is
    # looked up by name, then created again.
    await emulator.control("POST", "/faults", {"action": "drop", "op": "runs.list", "count": 2})
    await emulator.control("POST", "/faults", {"action": "drop", "op": "flows.create"})
    async with serving(emulator, tmp_path) as run:
        for n, dataset in enumerate(datasets):
            run.drop(f"job-{n}.json", good_job(dataset, n))
        await run.filed(JOBS)
        await quiet(run.daemon)
        got = parse(await run.scrape())
        api = run.daemon.api
        assert isinstance(api, HttpAep)
        limiter = api.transport.limiter.stats
        limit = run.daemon.settings.daemon.max_in_flight
        served = (await emulator.control("GET", "/stats"))["ops"]

    journal: dict[tuple[str, str], float] = {
        (op, "error" if status == "599" else status): n
        for op, statuses in served.items()
        for status, n in statuses.items()
    }
    # Every request the emulator answered (or dropped), by operation and status, and no other.
    requests = by_label(got, "aep_exporter_api_requests_total", "operation", "status")
    assert requests == journal
    assert journal[("runs.list", "error")] == 2
    assert journal[("flows.create", "error")] == 1
    throttled = {op: n for (op, status), n in journal.items() if status == "429"}
    assert throttled, "the emulator throttled nothing: the test would prove little"
    assert by_label(got, "aep_exporter_api_throttled_total", "operation") == {
        (op,): n for op, n in throttled.items()
    }

    # Each failure was retried (none gave up): the one aiohttp sent again itself is no retry.
    failed = Counter[str]()
    for (op, status), times in journal.items():
        if status in FAILURES:
            failed[op] += round(times)
    failed["runs.list"] -= 1
    retries = by_label(got, "aep_exporter_api_retries_total", "operation")
    assert retries == {(op,): n for op, n in failed.items() if n}

    # One latency observation per exchange: aiohttp's own second send is inside one.
    for op in {op for op, _ in journal}:
        exchanges = sum(n for (o, _), n in journal.items() if o == op) - (op == "runs.list")
        count = value(got, "aep_exporter_api_request_duration_seconds_count", operation=op)
        assert count == exchanges, op
        assert value(got, "aep_exporter_api_request_duration_seconds_sum", operation=op) > 0

    # Jobs by outcome are the runs by outcome: one run per job.
    runs = list(emulator.state.all_runs())
    assert len(runs) == JOBS
    outcomes = Counter(r.status for r in runs)
    assert by_label(got, "aep_exporter_jobs_finished_total", "source", "state") == {
        ("spool", STATES[status]): n for status, n in outcomes.items()
    }
    assert value(got, "aep_exporter_jobs_in_flight") == 0
    for state in IN_FLIGHT_STATES:
        assert value(got, "aep_exporter_jobs_in_flight_by_state", state=state.value) == 0
    assert value(got, "aep_exporter_jobs_in_flight_limit") == limit

    # Status queries: the ids the poller asked about are those the emulator was asked about.
    assert value(got, "aep_exporter_poll_batch_size_count") == len(asked)
    assert value(got, "aep_exporter_poll_batch_size_sum") == sum(asked)
    assert 0 < max(asked) <= JOBS

    # Each run once, timed by its own timestamps; seen finished after it finished.
    for status, n in outcomes.items():
        count = value(got, "aep_exporter_run_duration_seconds_count", status=status)
        total = value(got, "aep_exporter_run_duration_seconds_sum", status=status)
        assert count == n
        assert total == pytest.approx(n * RUN_S, abs=0.01)
    assert value(got, "aep_exporter_run_detection_delay_seconds_count") == JOBS
    assert value(got, "aep_exporter_run_detection_delay_seconds_sum") >= 0

    # The rate limiter held requests back after the 429s' Retry-After, and cut its rate.
    assert limiter.waits > 0
    assert value(got, "aep_exporter_rate_limit_wait_seconds_count") == limiter.waits
    assert value(got, "aep_exporter_rate_limit_wait_seconds_sum") == pytest.approx(limiter.waited_s)
    assert limiter.cuts > 0
    assert value(got, "aep_exporter_rate_limit_cuts_total") == limiter.cuts
    assert value(got, "aep_exporter_rate_limit_requests_per_second") == pytest.approx(
        limiter.rate_rps
    )
    assert value(got, "aep_exporter_api_requests_in_flight") == 0


async def test_jobs_in_flight_are_shown_by_their_state(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = await emulator.seed(rows=5, count=3)
    async with serving(emulator, tmp_path) as run:
        daemon = run.daemon
        gate, held = asyncio.Event(), asyncio.Condition()
        waiting = 0
        trigger_many = daemon.api.trigger_many

        async def held_trigger(
            flow_id: str, dataset_ids: Sequence[str], *, send_by: float | None = None
        ) -> dict[str, str]:
            nonlocal waiting  # datasets whose ad hoc call is held (a call may carry several)
            async with held:
                waiting += len(dataset_ids)
                held.notify_all()
            await gate.wait()
            return await trigger_many(flow_id, dataset_ids, send_by=send_by)

        monkeypatch.setattr(daemon.api, "trigger_many", held_trigger)
        for n, dataset in enumerate(datasets):
            run.drop(f"job-{n}.json", good_job(dataset, n))
        async with asyncio.timeout(DEADLINE), held:
            await held.wait_for(lambda: waiting == len(datasets))

        during = parse(await run.scrape())
        assert value(during, "aep_exporter_jobs_in_flight") == 3
        assert by_label(during, "aep_exporter_jobs_in_flight_by_state", "state") == {
            ("triggering",): 3
        }
        assert by_label(during, "aep_exporter_jobs_finished_total", "source", "state") == {}

        gate.set()
        await run.filed(3)
        await quiet(daemon)
        after = parse(await run.scrape())
        assert value(after, "aep_exporter_jobs_in_flight") == 0
        assert by_label(after, "aep_exporter_jobs_in_flight_by_state", "state") == {}
        outcomes = Counter(r.status for r in emulator.state.all_runs())
        assert by_label(after, "aep_exporter_jobs_finished_total", "source", "state") == {
            ("spool", STATES[status]): n for status, n in outcomes.items()
        }


async def test_a_rejected_job_file_counts_as_finished_rejected(
    emulator: Emulator, tmp_path: Path
) -> None:
    async with serving(emulator, tmp_path) as run:
        run.drop("broken.json", b"{not json")
        await run.filed(1)
        got = parse(await run.scrape())
    assert by_label(got, "aep_exporter_jobs_finished_total", "source", "state") == {
        ("spool", "rejected"): 1
    }
    assert value(got, "aep_exporter_jobs_in_flight") == 0


# -- the pieces ----------------------------------------------------------------------------


def run_info(
    created_ms: int, started_ms: int | None, completed_ms: int | None, status: str = "success"
) -> RunInfo:
    return RunInfo(
        id="r1",
        flow_id="f1",
        status=status,
        created_at_ms=created_ms,
        started_at_ms=started_ms,
        completed_at_ms=completed_ms,
    )


def test_run_duration_is_from_start_else_creation_to_completion() -> None:
    assert run_duration_s(run_info(1_000, 4_000, 64_500)) == 60.5
    assert run_duration_s(run_info(1_000, None, 64_500)) == 63.5
    assert run_duration_s(run_info(1_000, 4_000, None)) is None


def test_detection_delay_is_from_completion_to_now_and_never_negative() -> None:
    done = run_info(1_000_000, 1_000_000, 1_060_000)
    assert detection_delay_s(done, now_s=1_072.25) == 12.25
    assert detection_delay_s(done, now_s=1_059.0) == 0.0  # AEP's clock ahead of ours
    assert detection_delay_s(run_info(1_000_000, None, None), now_s=2_000.0) is None


def test_jobs_in_flight_follow_moves_and_departures() -> None:
    metrics = Metrics()
    metrics.job_moved("a", JobState.RECEIVED)
    metrics.job_moved("b", JobState.RUNNING)  # resumed straight into running
    metrics.job_moved("a", JobState.FLOW_READY)
    metrics.job_moved("a", JobState.FLOW_READY)  # told twice: still one job
    metrics.job_moved("a", JobState.SUCCEEDED)  # terminal states are not "in flight"
    got = parse(generate_latest(metrics.registry).decode())
    assert value(got, "aep_exporter_jobs_in_flight") == 2
    assert by_label(got, "aep_exporter_jobs_in_flight_by_state", "state") == {
        ("flow_ready",): 1,
        ("running",): 1,
    }
    metrics.job_left("a")
    metrics.job_left("a")
    metrics.job_left("never-seen")
    got = parse(generate_latest(metrics.registry).decode())
    assert value(got, "aep_exporter_jobs_in_flight") == 1
    assert by_label(got, "aep_exporter_jobs_in_flight_by_state", "state") == {("running",): 1}
    # Every in-flight state is exposed, at 0 when empty, so dashboards see no gaps.
    for state in IN_FLIGHT_STATES:
        assert ("aep_exporter_jobs_in_flight_by_state", frozenset({("state", state.value)})) in got


def test_a_request_sent_again_by_the_http_library_counts_as_unanswered() -> None:
    metrics = Metrics()
    metrics.api_request("runs.list", 200, 0.05, unanswered=1)
    metrics.api_request("runs.list", None, 0.5)
    metrics.api_request("flows.create", 429, 0.01)
    got = parse(generate_latest(metrics.registry).decode())
    assert by_label(got, "aep_exporter_api_requests_total", "operation", "status") == {
        ("runs.list", "200"): 1,
        ("runs.list", "error"): 2,
        ("flows.create", "429"): 1,
    }
    assert by_label(got, "aep_exporter_api_throttled_total", "operation") == {("flows.create",): 1}
    assert value(got, "aep_exporter_api_request_duration_seconds_count", operation="runs.list") == 2


def test_redis_messages_are_exposed_only_with_the_intake_and_count_by_outcome() -> None:
    metrics = Metrics()
    name = "aep_exporter_redis_messages_total"
    assert not [k for k in parse(generate_latest(metrics.registry).decode()) if k[0] == name]
    metrics.redis_intake()
    metrics.redis_intake()  # a second intake (or call) registers nothing twice
    got = parse(generate_latest(metrics.registry).decode())
    # Every outcome is shown at 0 from the start, so a rate over it has no gaps.
    assert {dict(k[1])["outcome"] for k in got if k[0] == name} == set(REDIS_OUTCOMES)
    metrics.redis_messages("taken_over", 3)
    metrics.redis_messages("published")
    metrics.redis_messages("published")
    got = parse(generate_latest(metrics.registry).decode())
    assert by_label(got, name, "outcome") == {("taken_over",): 3, ("published",): 2}
    with pytest.raises(ValueError, match="not a Redis message outcome"):
        metrics.redis_messages("lost")  # labels stay a bounded set


async def test_the_poller_records_each_finished_run_once_when_it_sees_it() -> None:
    clock = FakeClock()
    aep = FakeAep(clock, run_duration_s=100)
    config = EngineConfig(poll_min_s=7, poll_max_s=60, poll_jitter=0)
    metrics = Metrics()
    poller = RunPoller(aep, config, clock, random.Random(1), metrics=metrics)
    polled_at: list[float] = []
    get_runs = aep.get_runs

    async def recording(ids: Sequence[str]) -> dict[str, RunInfo]:
        polled_at.append(clock.time())
        return await get_runs(ids)

    (run_id,) = await flow_with_runs(aep, clock, 1)
    aep.get_runs = recording  # type: ignore[method-assign, assignment]
    completed = aep.runs[run_id].complete_at
    assert completed is not None
    task = asyncio.create_task(poller.run())
    try:
        # Two jobs wait on the same run (one adopted it): it is still one run.
        waits = [asyncio.create_task(poller.wait(run_id, deadline=1e9)) for _ in range(2)]
        for _ in range(200):
            await clock.advance(1)
            if all(w.done() for w in waits):
                break
        assert {(await w).id for w in waits} == {run_id}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    seen = min(t for t in polled_at if t >= completed)
    got = parse(generate_latest(metrics.registry).decode())
    assert value(got, "aep_exporter_run_detection_delay_seconds_count") == 1
    assert value(got, "aep_exporter_run_detection_delay_seconds_sum") == pytest.approx(
        seen - completed, abs=0.001
    )
    assert seen - completed > 0  # polls every 7 s or more: it was not seen the instant it ended
    assert value(got, "aep_exporter_run_duration_seconds_count", status="success") == 1
    assert value(got, "aep_exporter_run_duration_seconds_sum", status="success") == 100
    assert value(got, "aep_exporter_poll_batch_size_count") == len(polled_at)
    assert value(got, "aep_exporter_poll_batch_size_sum") == len(polled_at)  # one id each


# -- the documentation -----------------------------------------------------------------------

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


async def test_docs_metrics_lists_every_metric_the_daemon_exposes_with_its_type(
    emulator: Emulator, tmp_path: Path
) -> None:
    """docs/metrics.md's table against the registry of a daemon built with all its services."""
    settings = settings_for(emulator, tmp_path)
    with_redis = settings.model_copy(update={"redis": RedisConfig(consumer="docs")})
    daemon = build_daemon(with_redis, clock=FakeClock())  # not run: Redis is never contacted
    exposed = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in daemon.metrics.registry.collect()
    }
    rows = re.findall(
        r"^\| `((?:aep_exporter|process|python)_[a-z_]+)` \| ([a-z]+) \|",
        METRICS_DOC.read_text(),
        re.M,
    )
    assert len(exposed) > 15  # the core's metrics, the scheduler's and the Redis intake's
    assert "process_resident_memory_bytes" in exposed  # the process collectors too
    assert dict(rows) == exposed
    assert len(rows) == len(exposed), "a metric listed twice"


def test_schedule_slots_are_counted_in_the_daemons_metrics() -> None:
    """The scheduler records through `Metrics`, like every other component, so its series
    is in the one registry /metrics exposes, under its documented name."""
    metrics = Metrics()
    metrics.schedule_slot("nightly", "missed", 3)
    metrics.schedule_slot("nightly", "fired")
    value = metrics.registry.get_sample_value
    assert (
        value("aep_exporter_schedule_slots_total", {"schedule": "nightly", "outcome": "missed"})
        == 3
    )
    assert (
        value("aep_exporter_schedule_slots_total", {"schedule": "nightly", "outcome": "fired"}) == 1
    )


def test_succeeded_exports_count_their_size_and_mark_their_schedule_and_lane() -> None:
    metrics = Metrics()
    done = Outcome(job_id="a", state=JobState.SUCCEEDED, files=2, records=30, bytes=4096)
    failed = Outcome(job_id="b", state=JobState.FAILED, files=1, records=5, bytes=100)
    metrics.exported(done, destination="lake", at=1_000.0, schedule="nightly", lane="f" * 16)
    metrics.exported(done, destination="lake", at=2_000.0, lane="f" * 16)
    metrics.exported(failed, destination="lake", at=3_000.0, schedule="nightly", lane="f" * 16)
    got = parse(generate_latest(metrics.registry).decode())
    assert value(got, "aep_exporter_exported_bytes_total", destination="lake") == 8192
    assert value(got, "aep_exporter_exported_records_total", destination="lake") == 60
    assert value(got, "aep_exporter_exported_files_total", destination="lake") == 4
    # The failed job moved neither last success.
    name = "aep_exporter_schedule_last_success_timestamp_seconds"
    assert by_label(got, name, "schedule") == {("nightly",): 1_000.0}
    name = "aep_exporter_lane_last_success_timestamp_seconds"
    assert by_label(got, name, "lane", "destination") == {("f" * 16, "lake"): 2_000.0}
    info = by_label(got, "aep_exporter_build_info", "version", "python")
    assert list(info) == [(__version__, platform.python_version())]
    metrics.flow_budget(97, 100)
    got = parse(generate_latest(metrics.registry).decode())
    assert value(got, "aep_exporter_destination_flows") == 97
    assert value(got, "aep_exporter_destination_flows_limit") == 100
    assert value(got, "process_start_time_seconds") > 0
