"""Benchmark: the export engine end to end against the emulator, under load.

`make bench-engine` runs it. Each scenario starts its own `aep-exporter emulator` child process
on 127.0.0.1 (a fresh data folder, a fixed seed), seeds datasets through the control API and
runs the exporter in this process as `aep-exporter export` wires it (`HttpAep.from_config` →
`Engine`, the real `SystemClock`), every job at once under `asyncio.gather`. Request counts
come from the emulator's journal (`/_emulator/journal`): what the server saw.

Scenarios (all by default; choose with --scenario, repeatable):

- `many`: 200 exports of 200 datasets over 4 paths (4 export lanes, one AEP flow each) on a
  busy service: 50 ms latency, 50 requests/s per org, 5% 5xx, 3% 429, a 2 s "not ready"
  window, runs of 2-10 s. The emulator keeps AEP's limit of 100 destination flows.
- `one`: the same, but the 200 jobs all export one dataset to one place.
- `baseline`: the seed's aepp helper (`createDataFlowRunIfNotExists`), one export at a time, on
  a 50-export sample of that workload, its waits scaled by the emulator's time scale (the 2 s
  window stands for AEP's ~600 s: x 2/600); then the engine on the same 50 at once, and the
  engine again with a limiter that does not hold every request back on a 429's Retry-After.
  The sequential baseline is mostly sleeping, so it runs alongside the other scenarios, on an
  emulator of its own (--serial runs it alone).
- `polling`: 1,000 runs in flight at once (runs of 60-120 s, no latency, no faults): the
  shared poller's requests per minute and how late it sees each run end, for a few
  `EngineConfig.poll_max_s` (one engine each, 1,000 runs each, side by side).

Every scenario has a hard deadline; emulators and temporary folders are always removed.
Exit status: 0 all checks held, 1 a check failed or a scenario could not finish, 2 bad usage.
See docs/benchmarks.md, "Export engine", for how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from harness import (
    BenchError,
    Checks,
    Report,
    aep_config,
    children_cpu_seconds,
    emulator_headers,
    emulator_with_datasets,
    fmt,
    machine,
    machine_busy_seconds,
    own_cpu_seconds,
    quantiles,
)

from aep_emulator.settings import DEFAULT_ORG_ID
from exporter.aep.api import RunInfo
from exporter.aep.client import HttpAep
from exporter.aep.config import AepConfig
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_NAME,
    FLOW_SERVICE_PATH,
    NOT_READY_PHRASE,
    STORAGE_SPECS,
    StorageType,
)
from exporter.aep.ratelimit import RateLimiter
from exporter.clock import SystemClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress
from exporter.engine.poller import RunPoller
from exporter.jobs import Job, JobState, Outcome

SCENARIOS = ("many", "one", "baseline", "polling")
DLZ = STORAGE_SPECS[StorageType.DLZ]
DESTINATION = "lake"
FS = FLOW_SERVICE_PATH

# The busy service of scenarios many, one and baseline (time scale 1).
NOT_READY_S = 2.0
RUN_S = (2.0, 10.0)
LATENCY_S = 0.05
SERVER_RPS = 50.0
BUSY_KNOBS = [
    "--not-ready-window",
    str(NOT_READY_S),
    "--run-duration",
    f"{RUN_S[0]:g}-{RUN_S[1]:g}",
    "--latency-ms",
    f"{LATENCY_S * 1000:g}",
    "--rate-limit",
    f"{SERVER_RPS:g}",
    "--error-5xx-rate",
    "0.05",
    "--error-429-rate",
    "0.03",
    "--time-scale",
    "1",
]
# The engine for that service: AEP's defaults shrunk to a 2 s window and runs of seconds.
BUSY_ENGINE = EngineConfig(
    not_ready_wait_s=NOT_READY_S,
    not_ready_retry_s=0.5,
    not_ready_retry_max_s=2.0,
    poll_min_s=0.5,
    poll_max_s=5.0,
)
# Jobs of scenarios many, baseline and polling are spread over this many paths: one lane
# (one AEP flow) each; a sandbox holds at most 100 flows, so one flow per dataset cannot be.
LANES = 4
TARGET_SPEEDUP = 20.0

# The seed's helper (aepp), and AEP's "not ready" window that the emulator's 2 s stands for.
AEP_NOT_READY_S = 600.0
AEPP_INITIAL_DELAY_S = 600.0
AEPP_NOT_READY_WAIT_S = 60.0
AEPP_NOT_READY_ATTEMPTS = 5
AEPP_POLL_S = 30.0
URLLIB3_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
URLLIB3_RETRY_AFTER_STATUSES = frozenset({413, 429, 503})
URLLIB3_RETRY_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PUT", "TRACE"})

# Polling: long runs, nothing else in the way.
POLL_RUN_S = (60.0, 120.0)
POLL_KNOBS = [
    "--not-ready-window",
    "0",
    "--run-duration",
    f"{POLL_RUN_S[0]:g}-{POLL_RUN_S[1]:g}",
]

DEADLINE_S = {"many": 600.0, "one": 300.0, "sample": 300.0, "baseline": 900.0, "polling": 600.0}


@dataclass
class OpCount:
    """Requests the emulator served for one operation, by kind of answer."""

    total: int = 0
    ok: int = 0
    client_4xx: int = 0
    throttled: int = 0
    server_5xx: int = 0

    def add(self, status: int) -> None:
        self.total += 1
        if status < 400:
            self.ok += 1
        elif status == 429:
            self.throttled += 1
        elif status >= 500:
            self.server_5xx += 1
        else:
            self.client_4xx += 1


def count_ops(entries: Sequence[Mapping[str, Any]]) -> dict[str, OpCount]:
    ops: dict[str, OpCount] = {}
    for e in entries:
        ops.setdefault(str(e["op"]), OpCount()).add(int(e["status"]))
    return dict(sorted(ops.items()))


def platform_ops(ops: Mapping[str, OpCount]) -> dict[str, OpCount]:
    """Everything but IMS, which the emulator neither rate-limits nor faults."""
    return {op: c for op, c in ops.items() if op != "ims.token"}


def op_rows(ops: Mapping[str, OpCount], jobs: int) -> list[Report]:
    rows = [{"op": op, "per_job": round(c.total / jobs, 2), **asdict(c)} for op, c in ops.items()]
    total = OpCount()
    for c in ops.values():
        for name, value in asdict(c).items():
            setattr(total, name, getattr(total, name) + value)
    rows.append({"op": "all", "per_job": round(total.total / jobs, 2), **asdict(total)})
    return rows


# -- logging: count the engine's events instead of printing them -----------------------------


EVENTS: Counter[str] = Counter()


def count_event(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    EVENTS[str(event.get("event"))] += 1
    raise structlog.DropEvent


def quiet_logging() -> None:
    """The engine logs every step of every job; count the events by name instead."""
    structlog.configure(
        processors=[count_event],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )


# -- the exporter under test -----------------------------------------------------------------


class TimedPoller(RunPoller):
    """The engine's poller, noting when it saw each run end and what the run looked like."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.api, engine.config, engine.clock, engine.rng)
        self.seen: dict[str, tuple[float, RunInfo]] = {}

    async def wait(self, run_id: str, *, deadline: float) -> RunInfo:
        run = await super().wait(run_id, deadline=deadline)
        self.seen.setdefault(run_id, (time.time(), run))
        return run


class NoHoldLimiter(RateLimiter):
    """What-if: a 429 still cuts the rate and its own request waits its Retry-After, but the
    other requests are not all held back until then."""

    def on_throttled(self, retry_after: float | None = None) -> None:
        super().on_throttled(None)


@dataclass(frozen=True)
class ClientSetup:
    """How the exporter's HTTP client is paced."""

    rate_rps: float
    min_rps: float
    concurrency: int
    hold_on_retry_after: bool = True

    def config(self, url: str) -> AepConfig:
        return aep_config(
            url,
            rate_limit_rps=self.rate_rps,
            rate_limit_min_rps=self.min_rps,
            max_concurrency=self.concurrency,
        )

    def client(self, url: str, clock: SystemClock) -> HttpAep:
        config = self.config(url)
        limiter = (
            None
            if self.hold_on_retry_after
            else NoHoldLimiter(
                clock,
                rate_rps=config.rate_limit_rps,
                min_rate_rps=config.rate_limit_min_rps,
                max_concurrency=config.max_concurrency,
            )
        )
        return HttpAep.from_config(config, clock=clock, limiter=limiter)


@dataclass
class JobTimes:
    """Wall-clock times (epoch s) at which a job reached each step."""

    flow_ready: float | None = None
    running: float | None = None
    done: float | None = None


@dataclass
class EngineRun:
    """What one batch of concurrent jobs did, seen from the exporter's side."""

    outcomes: list[Outcome]
    wall_s: float
    started_at: float
    times: dict[str, JobTimes]
    seen: dict[str, tuple[float, RunInfo]]
    limiter: dict[str, Any]
    poller_requests: int
    poller_runs_read: int
    flows_created: int
    events: dict[str, int]
    samples: list[tuple[float, int]]


async def run_engine(
    url: str,
    jobs: Sequence[Job],
    engine_config: EngineConfig,
    client: ClientSetup,
    *,
    sample_every_s: float = 0.0,
) -> EngineRun:
    """Run every job at once through one engine and one client, as the CLI wires them."""
    clock = SystemClock()
    times = {j.job_id: JobTimes() for j in jobs}
    EVENTS.clear()
    async with client.client(url, clock) as api:
        engine = Engine(
            api,
            {DESTINATION: DlzDestination(type="dlz")},
            engine_config,
            org_id=DEFAULT_ORG_ID,
            sandbox="prod",
            clock=clock,
        )
        poller = TimedPoller(engine)
        engine.poller = poller
        samples: list[tuple[float, int]] = []

        async def sample() -> None:
            while True:
                samples.append((time.time(), poller.stats.requests))
                await asyncio.sleep(sample_every_s)

        async def one(job: Job) -> Outcome:
            mark = times[job.job_id]

            async def on_state(progress: Progress) -> None:
                if progress.state == JobState.FLOW_READY:
                    mark.flow_ready = time.time()
                elif progress.state == JobState.RUNNING:
                    mark.running = time.time()

            outcome = await engine.run(job, on_state)
            mark.done = time.time()
            return outcome

        sampler = asyncio.create_task(sample()) if sample_every_s > 0 else None
        started_at, began = time.time(), time.perf_counter()
        try:
            async with engine:
                outcomes = await asyncio.gather(*(one(j) for j in jobs))
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        wall = time.perf_counter() - began
        samples.append((time.time(), poller.stats.requests))
        return EngineRun(
            outcomes=list(outcomes),
            wall_s=wall,
            started_at=started_at,
            times=times,
            seen=dict(poller.seen),
            limiter=asdict(api.transport.limiter.stats),
            poller_requests=poller.stats.requests,
            poller_runs_read=poller.stats.runs_read,
            flows_created=engine.lanes.created,
            events=dict(EVENTS),
            samples=samples,
        )


def make_jobs(prefix: str, datasets: Sequence[str], *, shared: bool = False) -> list[Job]:
    """One job per dataset, spread over `LANES` paths (one lane each); `shared`: one path."""
    return [
        Job(
            id=f"{prefix}-{i:04d}",
            dataset_id=ds,
            destination=DESTINATION,
            path="bench/shared" if shared else f"bench/{prefix}/lane-{i % LANES}",
        )
        for i, ds in enumerate(datasets)
    ]


def detection_delays(run: EngineRun) -> list[float]:
    """How long after each run's `completedAtUTC` the engine saw it end."""
    return [
        seen - info.completed_at_ms / 1000
        for seen, info in run.seen.values()
        if info.completed_at_ms is not None
    ]


def run_durations(run: EngineRun) -> list[float]:
    return [
        (info.completed_at_ms - info.created_at_ms) / 1000
        for _, info in run.seen.values()
        if info.completed_at_ms is not None
    ]


def phases(run: EngineRun) -> Report:
    """Where each job's wall time went: building its flow (received → flow ready),
    triggering (→ running: the "not ready" wait, 429s, retries), the run (→ its end seen by the
    poller) and parking the flow afterwards (→ outcome)."""
    spans: dict[str, list[float]] = {"flow": [], "trigger": [], "run": [], "after": []}
    last: tuple[float, str] | None = None
    for o in run.outcomes:
        t = run.times[o.job_id]
        seen = run.seen.get(o.run_id or "")
        if t.flow_ready is None or t.running is None or t.done is None or seen is None:
            continue
        spans["flow"].append(t.flow_ready - run.started_at)
        spans["trigger"].append(t.running - t.flow_ready)
        spans["run"].append(max(0.0, seen[0] - t.running))
        spans["after"].append(max(0.0, t.done - seen[0]))
        if last is None or t.done > last[0]:
            last = (t.done, o.job_id)
    report: Report = {name: quantiles(values, digits=3) for name, values in spans.items()}
    if last is not None:
        t = run.times[last[1]]
        o = next(o for o in run.outcomes if o.job_id == last[1])
        seen_at = run.seen[o.run_id or ""][0]
        assert t.flow_ready is not None
        assert t.running is not None
        assert t.done is not None
        report["last_job"] = {
            "flow": round(t.flow_ready - run.started_at, 2),
            "trigger": round(t.running - t.flow_ready, 2),
            "run": round(seen_at - t.running, 2),
            "after": round(t.done - seen_at, 2),
        }
    return report


def engine_summary(run: EngineRun, ops: Mapping[str, OpCount], jobs: int) -> Report:
    total = sum(c.total for c in ops.values())
    return {
        "jobs": jobs,
        "wall_s": round(run.wall_s, 2),
        "outcomes": dict(Counter(str(o.state) for o in run.outcomes)),
        "requests": total,
        "requests_per_job": round(total / jobs, 2),
        "ops": op_rows(ops, jobs),
        "throttled_journal": sum(c.throttled for c in ops.values()),
        "limiter": {k: round(v, 2) if isinstance(v, float) else v for k, v in run.limiter.items()},
        "poller": {
            "requests": run.poller_requests,
            "mean_batch": round(run.poller_runs_read / run.poller_requests, 1)
            if run.poller_requests
            else 0,
        },
        "detection_delay_s": quantiles(detection_delays(run), digits=3),
        "longest_run_s": round(max(run_durations(run), default=0.0), 1),
        "phases_s": phases(run),
        "events": dict(sorted(run.events.items())),
    }


# -- scenario many: 200 exports, 200 datasets ----------------------------------------------------


async def scenario_many(args: argparse.Namespace, checks: Checks) -> Report:
    n = args.jobs
    async with emulator_with_datasets(BUSY_KNOBS, args.seed, n, 100, "many") as (_, control, ds):
        since = await control.last_seq()
        run = await run_engine(control.url, make_jobs("many", ds), BUSY_ENGINE, busy_client(args))
        ops = platform_ops(count_ops(await control.journal(since)))
    report = engine_summary(run, ops, n)
    adhoc = ops.get("adhoc.run", OpCount())
    flows = ops.get("flows.create", OpCount())
    longest_run = max(run_durations(run), default=RUN_S[1])
    report["floors_s"] = {
        "rate": round(report["requests"] / SERVER_RPS, 1),
        "critical_path": round(NOT_READY_S + longest_run, 1),
        "longest_run": round(longest_run, 1),
    }
    report["flows_created"] = flows.ok
    report["adhoc"] = asdict(adhoc)
    checks.check("many", "every job succeeded", report["outcomes"] == {"succeeded": n})
    lanes = min(n, LANES)
    runs = len({o.run_id for o in run.outcomes if o.run_id})
    report["distinct_runs"] = runs
    checks.check("many", f"{lanes} flows created (one per lane)", flows.ok == lanes, flows.ok)
    checks.check("many", f"{n} distinct runs, one per job", runs == n, runs)
    return report


def busy_client(args: argparse.Namespace, *, hold: bool = True) -> ClientSetup:
    return ClientSetup(args.rate_rps, args.min_rps, args.concurrency, hold_on_retry_after=hold)


# -- scenario one: 200 jobs, one dataset, one place ----------------------------------------------


async def scenario_one(args: argparse.Namespace, checks: Checks) -> Report:
    n = args.jobs
    seed = args.seed + 1
    async with emulator_with_datasets(BUSY_KNOBS, seed, 1, 100, "one") as (_, control, ds):
        since = await control.last_seq()
        jobs = make_jobs("one", ds * n, shared=True)
        run = await run_engine(control.url, jobs, BUSY_ENGINE, busy_client(args))
        ops = platform_ops(count_ops(await control.journal(since)))
    report = engine_summary(run, ops, n)
    adhoc = ops.get("adhoc.run", OpCount())
    flows = ops.get("flows.create", OpCount())
    flow_ids = {o.flow_id for o in run.outcomes}
    report["flows_created"] = flows.ok
    report["distinct_flows"] = len(flow_ids)
    report["runs_started"] = adhoc.ok
    report["distinct_runs_reported"] = len({o.run_id for o in run.outcomes})
    report["adhoc"] = asdict(adhoc)
    checks.check("one", "every job succeeded", report["outcomes"] == {"succeeded": n})
    checks.check("one", "exactly one flow", flows.ok == 1 and len(flow_ids) == 1, flows.ok)
    return report


# -- scenario baseline: the seed's helper, one export at a time ----------------------------------


class HelperAbort(Exception):
    """A call whose answer the helper needs failed: aepp would raise (KeyError, RetryError)."""

    def __init__(self, step: str, status: int) -> None:
        super().__init__(f"{step} answered {status}")
        self.step, self.status = step, status


class Aepp:
    """The calls `ExportDatasetToDataLandingZone.createDataFlowRunIfNotExists` makes, in order,
    with its waits x `scale`. Transport as aepp's session has it: urllib3 `Retry(total=1,
    backoff_factor=2, status_forcelist=(429, 500, 502, 503, 504))`: one retry for its default
    methods (not POST, not PATCH), after Retry-After when a 429/503 carries one (seconds the
    emulator means as real ones: not scaled), else after its backoff (0 s before a first retry;
    scaled anyway)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, scale: float) -> None:
        self.session, self.url, self.scale = session, url, scale
        self.headers: dict[str, str] = {}
        self.slept_s = 0.0
        self.run_s = 0.0
        self.requests = 0
        self.in_requests_s = 0.0
        self.retry_after_s = 0.0

    async def login(self) -> None:
        self.headers = {
            **await emulator_headers(self.session, self.url),
            "Content-Type": "application/json",
        }

    async def sleep(self, aep_seconds: float) -> None:
        self.slept_s += aep_seconds * self.scale
        await asyncio.sleep(aep_seconds * self.scale)

    async def call(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        for attempt in (1, 2):
            sent = time.perf_counter()
            async with self.session.request(
                method, self.url + path, json=body, headers={**self.headers, **(headers or {})}
            ) as resp:
                status, text = resp.status, await resp.text()
                retry_after = resp.headers.get("Retry-After")
            self.requests += 1
            self.in_requests_s += time.perf_counter() - sent
            if attempt == 2 or status not in URLLIB3_RETRY_STATUSES:
                break
            if method not in URLLIB3_RETRY_METHODS:
                break
            if retry_after and status in URLLIB3_RETRY_AFTER_STATUSES:
                self.retry_after_s += float(retry_after)
                await asyncio.sleep(float(retry_after))
            else:
                await self.sleep(0.0)  # urllib3: backoff_factor * 2**(n-1), but 0 for n = 1
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = None
        return status, answer

    async def create(self, what: str, body: Mapping[str, Any]) -> str:
        status, answer = await self.call("POST", f"{FS}/{what}", body)
        if not isinstance(answer, dict) or "id" not in answer:
            raise HelperAbort(f"{what}.create", status)
        return str(answer["id"])

    async def export(self, dataset_id: str, name: str) -> str:
        """One export; returns the run's final status, or raises HelperAbort."""
        base = await self.create(
            "connections",
            {
                "name": name,
                "auth": None,
                "connectionSpec": {"id": DLZ.connection_spec_id, "version": "1.0"},
            },
        )
        status, specs = await self.call("GET", f"{FS}/connectionSpecs")
        items = specs.get("items", []) if isinstance(specs, dict) else []
        source_spec = next((s["id"] for s in items if s["name"] == DATALAKE_SOURCE_SPEC_NAME), None)
        if source_spec is None:
            raise HelperAbort("connectionSpecs.list", status)
        source = await self.create(
            "sourceConnections",
            {
                "name": name,
                "connectionSpec": {"id": source_spec, "version": "1.0"},
                "data": {"format": "parquet"},
                "params": {"datasets": [{"dataSetId": dataset_id, "name": name}]},
            },
        )
        target = await self.create(
            "targetConnections",
            {
                "name": name,
                "baseConnectionId": base,
                "params": {
                    "mode": "Server-to-server",
                    "compression": "gzip",
                    "datasetFileType": "parquet",
                    "path": f"baseline/{dataset_id}",
                },
                "connectionSpec": {"id": DLZ.connection_spec_id, "version": "1.0"},
            },
        )
        year = 365 * 86400
        flow_id = await self.create(
            "flows",
            {
                "name": name,
                "flowSpec": {"id": DLZ.dataset_flow_spec_id, "version": "1.0"},
                "sourceConnectionIds": [source],
                "targetConnectionIds": [target],
                "transformations": [],
                "scheduleParams": {
                    "interval": 1,
                    "timeUnit": "day",
                    "startTime": int(time.time()) + year,
                },
            },
        )
        await self.sleep(AEPP_INITIAL_DELAY_S)
        run_id = await self.trigger(flow_id, dataset_id)
        triggered = time.monotonic()
        final = await self.wait(run_id)
        self.run_s += time.monotonic() - triggered
        # Park the flow; aepp checks neither answer (its PATCH is refused: 'Replace' of the
        # whole scheduleParams with only startTime).
        _, flow = await self.call("GET", f"{FS}/flows/{flow_id}")
        etag = ""
        with contextlib.suppress(KeyError, IndexError, TypeError):
            etag = str(flow["items"][0]["etag"])
        patch = [
            {
                "op": "Replace",
                "path": "/scheduleParams",
                "value": {"startTime": int(time.time()) + year},
            }
        ]
        await self.call("PATCH", f"{FS}/flows/{flow_id}", patch, {"If-Match": etag})
        await self.call("POST", f"{FS}/flows/{flow_id}/action?op=disable")
        return final

    async def trigger(self, flow_id: str, dataset_id: str) -> str:
        """tenacity: retry_if_result("not ready" in the answer), wait_fixed(60),
        stop_after_attempt(5); the run id is the last segment of the statusURL."""
        body = {
            "activationInfo": {
                "destinations": [{"flowId": flow_id, "datasets": [{"id": dataset_id}]}]
            }
        }
        for attempt in range(1, AEPP_NOT_READY_ATTEMPTS + 1):
            status, answer = await self.call(
                "POST", ADHOC_PATH, body, {"Accept": ADHOC_DATASET_ACCEPT}
            )
            if NOT_READY_PHRASE not in json.dumps(answer):
                try:
                    url = answer["destinations"][0]["datasets"][0]["statusURL"]
                except (KeyError, IndexError, TypeError):
                    raise HelperAbort("adhoc.run", status) from None
                return str(url).rsplit("/", 1)[-1]
            if attempt < AEPP_NOT_READY_ATTEMPTS:
                await self.sleep(AEPP_NOT_READY_WAIT_S)
        raise HelperAbort("adhoc.run (not ready 5 times: RetryError)", 400)

    async def wait(self, run_id: str) -> str:
        """aepp's loop, made sane: it reads the status (aepp waits for output metrics that a
        failed run never gets) and the scenario's deadline bounds it."""
        while True:
            _, answer = await self.call("GET", f"{FS}/runs/{run_id}")
            with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
                run = answer["items"][0]
                status = run["metrics"]["statusSummary"]["status"]
                if status in ("success", "failed") and run["metrics"]["durationSummary"].get(
                    "completedAtUTC"
                ):
                    return str(status)
            await self.sleep(AEPP_POLL_S)


async def run_baseline(args: argparse.Namespace) -> Report:
    n = args.sample
    scale = NOT_READY_S / AEP_NOT_READY_S
    async with (
        emulator_with_datasets(BUSY_KNOBS, args.seed + 2, n, 100, "base") as (_, control, ds),
        aiohttp.ClientSession() as session,
    ):
        helper = Aepp(session, control.url, scale)
        await helper.login()
        since = await control.last_seq()
        results: Counter[str] = Counter()
        aborted: Counter[str] = Counter()
        per_export: list[float] = []
        began = time.perf_counter()
        for i, dataset_id in enumerate(ds):
            one = time.perf_counter()
            try:
                results[await helper.export(dataset_id, f"aepp export {i:04d}")] += 1
            except HelperAbort as exc:
                aborted[f"{exc.step} {exc.status}"] += 1
            per_export.append(time.perf_counter() - one)
        wall = time.perf_counter() - began
        ops = platform_ops(count_ops(await control.journal(since)))
    total = sum(c.total for c in ops.values())
    return {
        "exports": n,
        "scale": round(scale, 5),
        "wall_s": round(wall, 1),
        "succeeded": results.get("success", 0),
        "failed_runs": results.get("failed", 0),
        "aborted": sum(aborted.values()),
        "aborted_by": dict(aborted),
        "per_export_s": quantiles(per_export, digits=3),
        "slept_s": round(helper.slept_s, 1),
        "mean_request_ms": round(helper.in_requests_s / max(1, helper.requests) * 1000, 1),
        "retry_after_s": round(helper.retry_after_s, 1),
        "unaccounted_s": round(
            wall - helper.slept_s - helper.in_requests_s - helper.retry_after_s, 1
        ),
        "trigger_to_end_s": round(helper.run_s, 1),
        "requests": total,
        "requests_per_export": round(total / n, 2),
        "ops": op_rows(ops, n),
    }


async def engine_sample(args: argparse.Namespace, checks: Checks, *, hold: bool) -> Report:
    n = args.sample
    name = "sample" if hold else "sample-nohold"
    seed = args.seed + (3 if hold else 4)
    async with emulator_with_datasets(BUSY_KNOBS, seed, n, 100, name) as (_, control, ds):
        since = await control.last_seq()
        run = await run_engine(
            control.url, make_jobs(name, ds), BUSY_ENGINE, busy_client(args, hold=hold)
        )
        ops = platform_ops(count_ops(await control.journal(since)))
    report = engine_summary(run, ops, n)
    checks.check(
        "baseline", f"engine ({name}): every job succeeded", report["outcomes"] == {"succeeded": n}
    )
    return report


# -- scenario polling: 1,000 runs in flight --------------------------------------------------------


async def scenario_polling(args: argparse.Namespace, checks: Checks) -> Report:
    n = args.poll_runs
    settings = args.poll_max
    client = ClientSetup(rate_rps=5000, min_rps=5000, concurrency=64)
    async with emulator_with_datasets(POLL_KNOBS, args.seed + 5, n * len(settings), 10, "poll") as (
        _,
        control,
        ds,
    ):
        since = await control.last_seq()
        configs = [EngineConfig(not_ready_wait_s=0, poll_max_s=p) for p in settings]
        runs = await asyncio.gather(
            *(
                run_engine(
                    control.url,
                    make_jobs(f"poll{p:g}", ds[i * n : (i + 1) * n]),
                    config,
                    client,
                    sample_every_s=1.0,
                )
                for i, (p, config) in enumerate(zip(settings, configs, strict=True))
            )
        )
        journal = await control.journal(since, "runs.list")
    rows = []
    last_trigger = max(t.running or 0.0 for run in runs for t in run.times.values())
    first_end = min(
        info.completed_at_ms / 1000
        for run in runs
        for _, info in run.seen.values()
        if info.completed_at_ms is not None
    )
    window = max(0.0, first_end - last_trigger)
    for p, config, run in zip(settings, configs, runs, strict=True):
        in_window = requests_between(run.samples, last_trigger, first_end)
        rows.append(
            {
                "poll_max_s": p,
                "runs": n,
                "outcomes": dict(Counter(str(o.state) for o in run.outcomes)),
                "poller_requests_per_min": round(in_window / window * 60, 1) if window else None,
                "poller_requests_total": run.poller_requests,
                "mean_batch": round(run.poller_runs_read / run.poller_requests, 1)
                if run.poller_requests
                else 0,
                "detection_delay_s": quantiles(detection_delays(run), digits=3),
                "wall_s": round(run.wall_s, 1),
                "defaults": config.poll_max_s == EngineConfig().poll_max_s,
            }
        )
        checks.check(
            "polling",
            f"poll_max_s={p:g}: every job succeeded",
            rows[-1]["outcomes"] == {"succeeded": n},
        )
    lists = [e for e in journal if last_trigger * 1000 <= e["time_ms"] <= first_end * 1000]
    started = min(run.started_at for run in runs)
    return {
        "client": asdict(client),
        "runs_per_engine": n,
        "engines": len(settings),
        "run_duration_s": list(POLL_RUN_S),
        "window_s": [round(last_trigger - started, 1), round(first_end - started, 1)],
        "runs_list_per_min_all_engines": round(len(lists) / window * 60, 1) if window else None,
        "rows": rows,
    }


def requests_between(samples: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """Poller requests between two times, from its counter sampled every second."""

    def at(t: float) -> float:
        before = [s for s in samples if s[0] <= t]
        after = [s for s in samples if s[0] >= t]
        if not before:
            return float(samples[0][1])
        if not after:
            return float(samples[-1][1])
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    return at(end) - at(start) if samples else 0.0


# -- running it all --------------------------------------------------------------------------


async def bounded(name: str, work: Awaitable[Report]) -> Report:
    """A scenario under its hard deadline; failing to run is reported, not raised."""
    try:
        async with asyncio.timeout(DEADLINE_S[name]):
            return await work
    except TimeoutError:
        return {"error": f"stopped at its deadline of {DEADLINE_S[name]:g} s"}
    except (BenchError, aiohttp.ClientError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def speedups(base: Report, sample: Report, nohold: Report) -> Report:
    if "error" in base or "error" in sample:
        return {}
    # The engine cannot beat its own floor: the "not ready" window, then the longest run (with
    # lanes, the requests before the triggers are a few per lane, not per job).
    floor = NOT_READY_S + sample["longest_run_s"]
    out = {
        "target": TARGET_SPEEDUP,
        "engine": round(base["wall_s"] / sample["wall_s"], 1),
        "engine_floor_s": round(floor, 1),
        "ceiling": round(base["wall_s"] / floor, 1),
    }
    if "error" not in nohold:
        out["engine_without_hold"] = round(base["wall_s"] / nohold["wall_s"], 1)
    done = base["succeeded"] + base["failed_runs"]
    if base["aborted"] and done:
        # The helper's wall had it aborted nothing: its mean time per finished export.
        whole = base["wall_s"] / done * base["exports"]
        out["helper_without_aborts_s"] = round(whole, 1)
        out["engine_vs_helper_without_aborts"] = round(whole / sample["wall_s"], 1)
        out["ceiling_without_aborts"] = round(whole / floor, 1)
    return out


async def bench(args: argparse.Namespace) -> tuple[Report, Checks]:
    quiet_logging()
    checks = Checks()
    chosen = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    scenarios: Report = {}
    report: Report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "client": {
            "rate_limit_rps": args.rate_rps,
            "rate_limit_min_rps": args.min_rps,
            "max_concurrency": args.concurrency,
        },
        "engine": BUSY_ENGINE.model_dump(),
        "scenarios": scenarios,
    }
    began, cpu = time.perf_counter(), cpu_seconds()
    background: asyncio.Task[Report] | None = None
    if "baseline" in chosen and not args.serial:
        background = asyncio.create_task(bounded("baseline", run_baseline(args)))
    try:
        for name in chosen:
            if name == "many":
                scenarios["many"] = await bounded("many", scenario_many(args, checks))
            elif name == "one":
                scenarios["one"] = await bounded("one", scenario_one(args, checks))
            elif name == "baseline":
                sample = await bounded("sample", engine_sample(args, checks, hold=True))
                nohold = await bounded("sample", engine_sample(args, checks, hold=False))
                scenarios["baseline"] = {
                    "exports": args.sample,
                    "engine": sample,
                    "engine_without_hold": nohold,
                }
                if background is None:
                    scenarios["baseline"]["helper"] = await bounded("baseline", run_baseline(args))
            elif name == "polling":
                scenarios["polling"] = await bounded("polling", scenario_polling(args, checks))
        if background is not None:
            scenarios["baseline"]["helper"] = await background
    finally:
        if background is not None and not background.done():
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    if "baseline" in scenarios:
        part = scenarios["baseline"]
        part["alongside"] = background is not None
        part["speedup"] = speedups(part["helper"], part["engine"], part["engine_without_hold"])
        checks.check("baseline", "the helper ran", "error" not in part["helper"])
    for name, part in scenarios.items():
        if "error" in part:
            checks.check(name, "ran to the end", False, part["error"])
    wall = time.perf_counter() - began
    report["total_wall_s"] = round(wall, 1)
    used = [b - a for a, b in zip(cpu, cpu_seconds(), strict=True)]
    if wall > 0 and used[2] >= 0:
        # Busy cores of the whole machine, and what this benchmark and its emulators took.
        report["cpu_cores"] = {
            "benchmark": round(used[0] / wall, 2),
            "emulators": round(used[1] / wall, 2),
            "other": round(max(0.0, used[2] - used[0] - used[1]) / wall, 2),
        }
    report["checks"] = checks.results
    return report, checks


def cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds used so far by this process, by its reaped children (the emulators) and by
    the whole machine (from /proc/stat; -1 where there is none)."""
    busy = machine_busy_seconds()
    return own_cpu_seconds(), children_cpu_seconds(), -1.0 if busy is None else busy


# -- the human report ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = ["  " + line]
    for r in cells:
        out.append(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return out


def ops_table(rows: Sequence[Report]) -> list[str]:
    return table(
        ["operation", "requests", "per job", "2xx", "4xx", "429", "5xx"],
        [
            [
                r["op"],
                r["total"],
                r["per_job"],
                r["ok"],
                r["client_4xx"],
                r["throttled"],
                r["server_5xx"],
            ]
            for r in rows
        ],
    )


def q(d: Report) -> str:
    return f"{fmt(d['median'])} / {fmt(d['p95'])} / {fmt(d['max'])}"


def engine_lines(r: Report) -> list[str]:
    lim, ph = r["limiter"], r["phases_s"]
    lines = [
        f"  wall {fmt(r['wall_s'])} s; outcomes {r['outcomes']}; {r['requests']} requests "
        f"({r['requests_per_job']} per job)",
        f"  429s: {r['throttled_journal']} in the journal, {lim['throttled']} seen by the client "
        f"limiter ({lim['cuts']} rate cuts, now {fmt(lim['rate_rps'])} rps; {lim['waits']} waits, "
        f"{fmt(lim['waited_s'])} s waited in all)",
        f"  poller: {r['poller']['requests']} requests, {r['poller']['mean_batch']} runs each; "
        f"run end seen after (median / p95 / max) {q(r['detection_delay_s'])} s",
        "  where a job's time goes (median / p95 / max s): "
        + "; ".join(f"{k} {q(ph[k])}" for k in ("flow", "trigger", "run", "after")),
    ]
    if "last_job" in ph:
        lines.append(f"  the last job to finish: {ph['last_job']}")
    return lines


def human_many(r: Report) -> list[str]:
    f, a = r["floors_s"], r["adhoc"]
    return [
        *engine_lines(r),
        f"  lower bounds: rate {fmt(f['rate'])} s ({r['requests']} requests / {SERVER_RPS:g} "
        f"rps); critical path {fmt(f['critical_path'])} s ({NOT_READY_S:g} s not ready + "
        f"longest run {fmt(f['longest_run'])} s)",
        f"  flows created {r['flows_created']} (lanes), runs {r['distinct_runs']}; ad hoc "
        f"calls: {a['ok']} ok, "
        f"{a['client_4xx']} 4xx, {a['server_5xx']} 5xx, {a['throttled']} 429",
        *ops_table(r["ops"]),
    ]


def human_one(r: Report) -> list[str]:
    a = r["adhoc"]
    return [
        *engine_lines(r),
        f"  flows created {r['flows_created']} (distinct in outcomes: {r['distinct_flows']}); "
        f"runs started {r['runs_started']} (distinct in outcomes: "
        f"{r['distinct_runs_reported']}); triggers sent {a['total']}: {a['ok']} ok, "
        f"{a['client_4xx']} 4xx (already running: adopted), {a['server_5xx']} 5xx, "
        f"{a['throttled']} 429",
        *ops_table(r["ops"]),
    ]


def human_baseline(b: Report) -> list[str]:
    h, e, nh = b.get("helper", {}), b["engine"], b["engine_without_hold"]
    parts = (
        ("aepp helper, sequential", h),
        ("engine, all at once", e),
        ("engine, no Retry-After hold", nh),
    )
    rows = [
        [label, x["wall_s"], x["succeeded"], x["aborted"], x["requests_per_export"]]
        if x is h
        else [label, x["wall_s"], x["outcomes"].get("succeeded", 0), 0, x["requests_per_job"]]
        for label, x in parts
        if "error" not in x
    ]
    out = table(
        [f"{b['exports']} exports", "wall s", "succeeded", "aborted", "requests each"], rows
    )
    out += [f"  {label}: {x['error']}" for label, x in parts if "error" in x]
    sp = b.get("speedup", {})
    if sp:
        out.append(
            f"  speed-up (helper wall / engine wall): {sp['engine']}x (target "
            f"{sp['target']:g}x: {'met' if sp['engine'] >= sp['target'] else 'NOT met'}); with no "
            f"global Retry-After hold {sp.get('engine_without_hold', '-')}x; against the helper "
            f"had it aborted nothing ({sp.get('helper_without_aborts_s', '-')} s) "
            f"{sp.get('engine_vs_helper_without_aborts', '-')}x"
        )
        out.append(
            f"  the engine's floor here: {sp['engine_floor_s']} s ({NOT_READY_S:g} s "
            f"not ready + the longest run): no engine beats {sp['ceiling']}x on this sample "
            f"({sp.get('ceiling_without_aborts', '-')}x against the helper with no abort)"
        )
    if "error" not in h:
        alongside = "; ran alongside the other scenarios" if b.get("alongside") else ""
        out.append(
            f"  helper: per export (median / p95 / max) {q(h['per_export_s'])} s; asleep by "
            f"design {h['slept_s']} s (x {h['scale']}), on Retry-After {h['retry_after_s']} s; "
            f"in requests {h['mean_request_ms']} ms each; unaccounted {h['unaccounted_s']} s; "
            f"aborted by {h['aborted_by'] or 'nothing'}{alongside}"
        )
    for label, x in parts[1:]:
        if "error" not in x:
            out += [f"  {label}:", *engine_lines(x)]
    return out


def human_polling(p: Report) -> list[str]:
    w, c = p["window_s"], p["client"]
    rows = [
        [
            f"{r['poll_max_s']:g}" + (" (default)" if r["defaults"] else ""),
            r["poller_requests_per_min"],
            r["mean_batch"],
            r["detection_delay_s"]["median"],
            r["detection_delay_s"]["p95"],
            r["detection_delay_s"]["max"],
            r["outcomes"],
        ]
        for r in p["rows"]
    ]
    return [
        f"  every run in flight from {w[0]} s to {w[1]} s after the start; client: "
        f"AepConfig(rate_limit_rps={c['rate_rps']:g}, rate_limit_min_rps={c['min_rps']:g}, "
        f"max_concurrency={c['concurrency']}); EngineConfig defaults but not_ready_wait_s=0",
        *table(
            ["poll_max_s", "poller req/min", "runs/req", "end seen: median", "p95", "max", ""],
            rows,
        ),
        "  runs.list in the journal meanwhile, all engines: "
        f"{p['runs_list_per_min_all_engines']}/min",
    ]


def human(report: Report) -> str:
    m, c, s = report["machine"], report["client"], report["scenarios"]
    out = [
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['system']}",
        f"client (many, one, baseline): AepConfig(rate_limit_rps={c['rate_limit_rps']:g}, "
        f"rate_limit_min_rps={c['rate_limit_min_rps']:g}, max_concurrency={c['max_concurrency']})",
    ]
    show = {
        "many": human_many,
        "one": human_one,
        "baseline": human_baseline,
        "polling": human_polling,
    }
    for name, part in s.items():
        out += ["", f"== {title(name, part)} =="]
        if "error" in part:
            out.append(f"  error: {part['error']}")
        else:
            out += show[name](part)
    failed = [x for x in report["checks"] if not x["ok"]]
    out += [
        "",
        f"checks: {len(report['checks']) - len(failed)} of {len(report['checks'])} held",
        *(f"  FAILED {x['scenario']}: {x['check']} ({x['detail']})" for x in failed),
        f"total wall time {report['total_wall_s']} s; "
        + ", ".join(f"{k} {v} cores" for k, v in report.get("cpu_cores", {}).items()),
    ]
    return "\n".join(out)


def title(name: str, part: Report) -> str:
    if name == "many":
        return f"many: {part.get('jobs', '')} exports of as many datasets, on a busy service"
    if name == "one":
        return f"one: {part.get('jobs', '')} jobs exporting one dataset to one place"
    if name == "baseline":
        return "baseline: the seed's aepp helper, one export at a time, vs the engine"
    if "error" in part:
        return "polling"
    low, high = part["run_duration_s"]
    return (
        f"polling: {part['runs_per_engine']} runs in flight in each of {part['engines']} "
        f"engines, runs of {low:g}-{high:g} s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the export engine against the AEP emulator (see the module "
        "docstring and docs/benchmarks.md)."
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    p.add_argument("--jobs", type=int, default=200, help="jobs in scenarios many and one")
    p.add_argument("--sample", type=int, default=50, help="exports in scenario baseline")
    p.add_argument(
        "--poll-runs", type=int, default=1000, help="runs in flight per engine in scenario polling"
    )
    p.add_argument(
        "--poll-max",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[120.0, 15.0, 5.0],
        metavar="S,S,...",
        help="EngineConfig.poll_max_s of each engine in scenario polling (default 120,15,5)",
    )
    p.add_argument(
        "--rate-rps", type=float, default=50.0, help="AepConfig.rate_limit_rps (default 50)"
    )
    p.add_argument(
        "--min-rps",
        type=float,
        default=50.0,
        help="AepConfig.rate_limit_min_rps (default 50: the known limit; 0.5 is the library's)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="AepConfig.max_concurrency")
    p.add_argument(
        "--serial",
        action="store_true",
        help="run the sequential baseline on its own, not alongside the other scenarios",
    )
    p.add_argument("--seed", type=int, default=1, help="emulator seed (each scenario adds to it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args(argv)
    if min(args.jobs, args.sample, args.poll_runs) < 1:
        p.error("--jobs, --sample and --poll-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report, checks = asyncio.run(bench(args))
    except KeyboardInterrupt:
        return 130
    text = json.dumps(report, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text if args.json else human(report))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
