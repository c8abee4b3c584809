"""Prometheus metrics of one daemon, in a registry of its own (tests build many daemons).

Components take an optional `Metrics` and call its verbs (`api_request`, `poll_batch`,
`run_ended`, ...); without one they record nothing, so unit tests and `FakeAep` need none.
Labels are bounded sets: operation names (`flows.create`, `runs.list`, `ims.token`), status
codes, job states and sources; never ids. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)

from exporter import __version__
from exporter.jobs import TERMINAL, JobState, Outcome

if TYPE_CHECKING:
    from exporter.aep.api import RunInfo

PREFIX = "aep_exporter"
IN_FLIGHT_STATES = tuple(s for s in JobState if s not in TERMINAL)
TRANSPORT_ERROR = "error"  # the status label of a request that got no HTTP answer
# What became of a Redis stream message (docs/metrics.md).
# What a local disk write was for (`exporter.daemon.storage`): each shown at 0 from the start.
STORAGE_OPERATIONS = ("intake", "journal", "result")
REDIS_OUTCOMES = ("started", "resumed", "taken_over", "duplicate", "dead_lettered", "published")

# Seconds on the wire: AEP answers in tens of milliseconds to tens of seconds (60 s timeout).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Seconds held back by the rate limiter: none at all up to Retry-After pauses of minutes.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Run ids per status query: one run up to AEP's maximum of 100 per filter.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100)
# Event-loop lag: a healthy loop wakes within a millisecond or two; the stall alarm is seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Export runs last from under a minute to hours.
RUN_BUCKETS = (15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)
# A finished run is seen at the next poll: within the poll cadence (3 s to 2 min by default).
DETECTION_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 300, 600)


def run_duration_s(run: RunInfo) -> float | None:
    """How long AEP took over the run, by its own timestamps (started, else created, to
    completed); None while it has not completed."""
    if run.completed_at_ms is None:
        return None
    began = run.started_at_ms if run.started_at_ms is not None else run.created_at_ms
    return max(0.0, (run.completed_at_ms - began) / 1000)


def detection_delay_s(run: RunInfo, now_s: float) -> float | None:
    """Seconds from the run's completion (AEP's clock) to `now_s` (ours), when we saw it.
    Clock skew can make it negative; that is reported as 0."""
    if run.completed_at_ms is None:
        return None
    return max(0.0, now_s - run.completed_at_ms / 1000)


class Metrics:
    """Every metric the daemon exposes on `/metrics`; components record into it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_finished = Counter(
            f"{PREFIX}_jobs_finished",
            "Jobs that reached a terminal state (rejected ones included), by source and state.",
            ["source", "state"],
            registry=r,
        )
        self.jobs_in_flight = Gauge(
            f"{PREFIX}_jobs_in_flight", "Jobs being worked on now.", registry=r
        )
        self.jobs_in_flight_by_state = Gauge(
            f"{PREFIX}_jobs_in_flight_by_state",
            "Jobs being worked on now, by the last state their journal records.",
            ["state"],
            registry=r,
        )
        self.jobs_in_flight_limit = Gauge(
            f"{PREFIX}_jobs_in_flight_limit",
            "How many jobs may be in flight at once (daemon.max_in_flight).",
            registry=r,
        )
        self.api_requests = Counter(
            f"{PREFIX}_api_requests",
            "HTTP requests sent to AEP and IMS (each attempt), by operation and status code; "
            'status "error" when no answer came (connection failed or dropped, timeout).',
            ["operation", "status"],
            registry=r,
        )
        self.api_request_duration = Histogram(
            f"{PREFIX}_api_request_duration_seconds",
            "Time from sending a request to its answer (or failure), rate limit wait excluded.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.api_retries = Counter(
            f"{PREFIX}_api_retries",
            "Requests sent again after a retryable failure or a refused token, by operation.",
            ["operation"],
            registry=r,
        )
        self.api_throttled = Counter(
            f"{PREFIX}_api_throttled",
            "429 Too Many Requests answers, by operation.",
            ["operation"],
            registry=r,
        )
        self.api_requests_in_flight = Gauge(
            f"{PREFIX}_api_requests_in_flight",
            "Requests to AEP holding a rate limiter slot now.",
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            f"{PREFIX}_rate_limit_wait_seconds",
            "Time requests were held back by the client-side rate limit (only those held).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.rate_limit_rate = Gauge(
            f"{PREFIX}_rate_limit_requests_per_second",
            "The request rate the adaptive limiter allows now.",
            registry=r,
        )
        self.rate_limit_cuts = Counter(
            f"{PREFIX}_rate_limit_cuts",
            "Times the limiter cut its rate after 429s.",
            registry=r,
        )
        self.poll_batch_size = Histogram(
            f"{PREFIX}_poll_batch_size",
            "Run ids asked about per status query (`GET /runs?property=id==...`).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            f"{PREFIX}_run_duration_seconds",
            "Duration of finished AEP runs by their own timestamps, by run status.",
            ["status"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.run_detection_delay = Histogram(
            f"{PREFIX}_run_detection_delay_seconds",
            "Time from a run's completion (its completedAt) to the poll that saw it.",
            buckets=DETECTION_BUCKETS,
            registry=r,
        )
        self.event_loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop woke the admin server's monitor (it asks every second).",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.schedule_slots = Counter(
            f"{PREFIX}_schedule_slots",
            "Schedule slots handled, by schedule and outcome (fired, duplicate, overlapping, "
            "missed, coalesced).",
            ["schedule", "outcome"],
            registry=r,
        )
        self.storage_errors = Counter(
            f"{PREFIX}_storage_errors",
            "Local disk operations that failed and will be retried, by operation.",
            ["operation"],
            registry=r,
        )
        for operation in STORAGE_OPERATIONS:
            self.storage_errors.labels(operation)
        for state in IN_FLIGHT_STATES:  # shown as 0, not absent, while no job is there
            self.jobs_in_flight_by_state.labels(state.value)
        self._exports(r)
        self._job_states: dict[str, JobState] = {}
        self._redis_messages: Counter | None = None  # only with the Redis intake

    def _exports(self, r: CollectorRegistry) -> None:
        """What was exported, when each schedule and lane last succeeded, the flow budget, the
        build, and the process (CPU, memory, descriptors, garbage collector)."""
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the running version and Python in its labels.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.exported_bytes = Counter(
            f"{PREFIX}_exported_bytes",
            "Bytes AEP wrote to the destination for succeeded jobs (its sizeSummary), by "
            "destination.",
            ["destination"],
            registry=r,
        )
        self.exported_records = Counter(
            f"{PREFIX}_exported_records",
            "Records AEP exported for succeeded jobs (its recordSummary), by destination.",
            ["destination"],
            registry=r,
        )
        self.exported_files = Counter(
            f"{PREFIX}_exported_files",
            "Files AEP wrote for succeeded jobs (its fileSummary), by destination.",
            ["destination"],
            registry=r,
        )
        self.schedule_last_success = Gauge(
            f"{PREFIX}_schedule_last_success_timestamp_seconds",
            "When a job of the schedule last succeeded (Unix time), by schedule.",
            ["schedule"],
            registry=r,
        )
        self.lane_last_success = Gauge(
            f"{PREFIX}_lane_last_success_timestamp_seconds",
            "When a job on the lane last succeeded (Unix time), by lane fingerprint and "
            "destination.",
            ["lane", "destination"],
            registry=r,
        )
        self.destination_flows = Gauge(
            f"{PREFIX}_destination_flows",
            "Destination dataflows in the sandbox when the lanes last counted them (before "
            "making a flow).",
            registry=r,
        )
        self.destination_flows_limit = Gauge(
            f"{PREFIX}_destination_flows_limit",
            "The flow budget: destination dataflows the lanes may hold (engine.max_flows).",
            registry=r,
        )
        ProcessCollector(registry=r)  # process_*: CPU, memory, open descriptors, start time
        r.register(PLATFORM_COLLECTOR)  # python_info
        r.register(GC_COLLECTOR)  # python_gc_*

    # -- jobs ------------------------------------------------------------------------------

    def job_moved(self, job_id: str, state: JobState) -> None:
        """A job in flight is now in `state` (also when it starts or resumes)."""
        if state in TERMINAL:
            return
        old = self._job_states.get(job_id)
        if old == state:
            return
        if old is None:
            self.jobs_in_flight.inc()
        else:
            self.jobs_in_flight_by_state.labels(old.value).dec()
        self._job_states[job_id] = state
        self.jobs_in_flight_by_state.labels(state.value).inc()

    def job_left(self, job_id: str) -> None:
        """A job's task ended (finished, cancelled, or stopped with the daemon)."""
        old = self._job_states.pop(job_id, None)
        if old is not None:
            self.jobs_in_flight.dec()
            self.jobs_in_flight_by_state.labels(old.value).dec()

    def job_finished(self, source: str, state: JobState) -> None:
        self.jobs_finished.labels(source, state.value).inc()

    def exported(
        self,
        outcome: Outcome,
        *,
        destination: str,
        at: float,
        schedule: str | None = None,
        lane: str | None = None,
    ) -> None:
        """A job ended with `outcome` at `at` (Unix time): a succeeded one counts its bytes,
        records and files, and marks its schedule's and lane's last success."""
        if outcome.state is not JobState.SUCCEEDED:
            return
        self.exported_bytes.labels(destination).inc(outcome.bytes)
        self.exported_records.labels(destination).inc(outcome.records)
        self.exported_files.labels(destination).inc(outcome.files)
        if schedule is not None:
            self.schedule_last_success.labels(schedule).set(at)
        if lane is not None:
            self.lane_last_success.labels(lane, destination).set(at)

    def flow_budget(self, flows: int, limit: int) -> None:
        """The lanes counted `flows` destination dataflows in the sandbox, `limit` allowed."""
        self.destination_flows.set(flows)
        self.destination_flows_limit.set(limit)

    def schedule_slot(self, schedule: str, outcome: str, count: int = 1) -> None:
        """`count` slots of `schedule` handled: fired, duplicate, overlapping, missed or
        coalesced (`exporter.sources.schedules`)."""
        self.schedule_slots.labels(schedule, outcome).inc(count)

    def storage_error(self, operation: str) -> None:
        """A local write for `operation` (one of `STORAGE_OPERATIONS`) failed; it is retried."""
        self.storage_errors.labels(operation).inc()

    # -- requests --------------------------------------------------------------------------

    def api_request(
        self, operation: str, status: int | None, seconds: float, *, unanswered: int = 0
    ) -> None:
        """One exchange and its answer's status (None: no answer came). `unanswered` counts
        sends within it that got no answer (the HTTP library re-sent on a closed connection)."""
        label = TRANSPORT_ERROR if status is None else str(status)
        self.api_requests.labels(operation, label).inc()
        if unanswered:
            self.api_requests.labels(operation, TRANSPORT_ERROR).inc(unanswered)
        self.api_request_duration.labels(operation).observe(seconds)
        if status == 429:
            self.api_throttled.labels(operation).inc()

    def api_retry(self, operation: str) -> None:
        self.api_retries.labels(operation).inc()

    def rate_limited(self, seconds: float) -> None:
        self.rate_limit_wait.observe(seconds)

    def rate_cut(self) -> None:
        self.rate_limit_cuts.inc()

    def watch_limiter(self, rate: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Read the limiter's current rate and requests in flight at each scrape."""
        self.rate_limit_rate.set_function(rate)
        self.api_requests_in_flight.set_function(in_flight)

    # -- runs ------------------------------------------------------------------------------

    def loop_lag(self, seconds: float) -> None:
        self.event_loop_lag.observe(max(0.0, seconds))

    def poll_batch(self, size: int) -> None:
        self.poll_batch_size.observe(size)

    def run_ended(self, run: RunInfo, *, now_s: float) -> None:
        """A poll found `run` finished; `now_s` is the wall time of that poll."""
        duration = run_duration_s(run)
        delay = detection_delay_s(run, now_s)
        if duration is not None:
            self.run_duration.labels(run.status).observe(duration)
        if delay is not None:
            self.run_detection_delay.observe(delay)

    # -- sources ---------------------------------------------------------------------------

    def redis_intake(self) -> None:
        """Expose the Redis intake's message counter (each outcome at 0): only a daemon with
        [redis] configured has it. Once per registry; a second call changes nothing."""
        if self._redis_messages is None:
            self._redis_messages = Counter(
                f"{PREFIX}_redis_messages",
                "Redis stream messages handled, by what became of them.",
                ["outcome"],
                registry=self.registry,
            )
            for outcome in REDIS_OUTCOMES:
                self._redis_messages.labels(outcome)

    def redis_messages(self, outcome: str, count: int = 1) -> None:
        """`count` Redis stream messages met `outcome` (one of `REDIS_OUTCOMES`)."""
        if outcome not in REDIS_OUTCOMES:
            raise ValueError(f"not a Redis message outcome: {outcome}")
        self.redis_intake()
        assert self._redis_messages is not None
        self._redis_messages.labels(outcome).inc(count)
