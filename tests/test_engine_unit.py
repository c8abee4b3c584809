"""The engine's pieces against FakeAep and a hand-driven clock: cadence, batching,
deadlines, single-flight and clean-up, without HTTP and without sleeping."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from exporter.aep.api import RunInfo
from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress
from exporter.engine.lanes import LaneManager
from exporter.engine.poller import (
    BATCH_HISTORY,
    COMPACT_MIN,
    PollerStats,
    RunPoller,
    RunTimedOut,
    StatusUnreadable,
)
from exporter.engine.trigger import Triggerer
from exporter.errors import (
    NotReadyError,
    PreconditionFailed,
    RequestError,
    ServerError,
    ThrottledError,
)
from exporter.jobs import Job, JobState

CONFIG = EngineConfig(
    not_ready_wait_s=600,
    poll_min_s=5,
    poll_max_s=60,
    poll_growth=0.25,
    poll_jitter=0,
    status_unreadable_s=300,
    join_coalesce_s=0,
    trigger_coalesce_s=0,
    max_flows=10_000,  # the poller's tests want a run per flow
)
DESTS = {"lake": DlzDestination(type="dlz")}


def job(dataset: str = "d1", **changes: object) -> Job:
    return Job.model_validate(
        {"dataset_id": dataset, "destination": "lake", "path": "ml/x", **changes}
    )


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def aep(clock: FakeClock) -> FakeAep:
    return FakeAep(clock, ready_after_s=600, run_duration_s=100)


@pytest.fixture
async def poller(aep: FakeAep, clock: FakeClock) -> AsyncIterator[RunPoller]:
    poller = RunPoller(aep, CONFIG, clock, random.Random(1))
    task = asyncio.create_task(poller.run())
    yield poller
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def lanes(aep: FakeAep, clock: FakeClock) -> LaneManager:
    return LaneManager(
        aep,
        DESTS,
        CONFIG,
        org_id="o",
        sandbox="prod",
        clock=clock,
        identity_key=b"k",
        rng=random.Random(1),
    )


async def flow_with_runs(
    aep: FakeAep, clock: FakeClock, datasets: int, *, lanes_made: int | None = None
) -> list[str]:
    """`datasets` runs started now, spread over `lanes_made` lanes (one each by default)."""
    runs = []
    manager = lanes(aep, clock)  # one manager: a new one would list every flow made so far
    spread = lanes_made or datasets
    for i in range(datasets):
        flow, _ = await manager.member(job(f"d{i}", path=f"ml/x{i % spread}"))
        await clock.advance(0)
        aep.ready_after_s = -1e9  # skip the window: these tests are about polling
        runs.append(await aep.trigger(flow.id, f"d{i}"))
    return runs


async def test_one_request_per_hundred_runs_in_flight(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    runs = await flow_with_runs(aep, clock, 250, lanes_made=5)
    aep.calls.clear()
    waits = [asyncio.create_task(poller.wait(r, deadline=1e9)) for r in runs]
    await settle()
    assert aep.calls["runs.list"] == 3
    assert list(poller.stats.batch_sizes) == [100, 100, 50]
    await clock.advance(130)  # runs end at 100; the next polls see it
    await settle()
    done = await asyncio.gather(*waits)
    assert {r.status for r in done} == {"success"}
    assert aep.calls["adhoc.run"] == 0


async def test_finished_runs_are_let_go_while_others_wait(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    """A daemon that runs for weeks finishes runs all the time while others wait: what the
    poller keeps must follow the runs in flight, not everything finished lately."""
    runs = await flow_with_runs(aep, clock, 400, lanes_made=8)
    for run in runs[:100]:  # these never end, so the poller always has runs in flight
        aep.runs[run].complete_at = None
    stay = [asyncio.create_task(poller.wait(r, deadline=1e9)) for r in runs[:100]]
    for batch in range(3):
        start = 100 + 100 * batch
        waits = [
            asyncio.create_task(poller.wait(r, deadline=1e9)) for r in runs[start : start + 100]
        ]
        await clock.advance(130)  # ended at 100 (the runs' own clock) and read since
        await settle()
        assert all(w.done() for w in waits)
    # Each finished run held its entries until `status_unreadable_s` (900 s) after its
    # last read; now they are swept once they outnumber the live ones (two entries each).
    assert poller.in_flight == 100
    assert poller.held <= 2 * 100 + 2 * max(COMPACT_MIN, 100)
    for w in stay:
        w.cancel()
    await settle()
    assert poller.held == 0


def test_poll_stats_keep_only_recent_batches() -> None:
    stats = PollerStats()
    for size in range(5000):
        stats.batch_sizes.append(size)
    assert len(stats.batch_sizes) == BATCH_HISTORY
    assert stats.batch_sizes[-1] == 4999


async def test_runs_started_apart_still_share_requests(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    aep.run_outcome = "never"
    runs = await flow_with_runs(aep, clock, 200, lanes_made=4)
    waits = []
    for r in runs:  # one run every half second: no two are ever due at the same moment
        waits.append(asyncio.create_task(poller.wait(r, deadline=1e9)))
        await clock.advance(0.5)
    await clock.advance(100)
    aep.calls.clear()
    poller.stats.batch_sizes.clear()
    for _ in range(300):
        await clock.advance(1)
    # Read one by one, 200 runs polled every 30-60 s would take about 1,500 requests.
    assert aep.calls["runs.list"] <= 60
    assert sum(poller.stats.batch_sizes) / len(poller.stats.batch_sizes) >= 50
    for w in waits:
        w.cancel()


async def test_cadence_grows_with_a_runs_age_up_to_the_cap(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    aep.run_outcome = "never"
    (run,) = await flow_with_runs(aep, clock, 1)
    aep.calls.clear()
    polled_at: list[float] = []
    original = aep.get_runs

    async def recording(ids: Sequence[str]) -> dict[str, RunInfo]:
        polled_at.append(clock.monotonic())
        return await original(ids)

    aep.get_runs = recording  # type: ignore[method-assign, assignment]
    wait = asyncio.create_task(poller.wait(run, deadline=clock.monotonic() + 3600))
    for _ in range(400):
        await clock.advance(1)
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert gaps[0] == pytest.approx(CONFIG.poll_min_s, abs=1)
    assert max(gaps) <= CONFIG.poll_max_s + 1
    assert gaps[-1] == pytest.approx(CONFIG.poll_max_s, abs=1)
    assert gaps == sorted(gaps)
    wait.cancel()


async def test_the_deadline_ends_the_wait_exactly(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    aep.run_outcome = "never"
    (run,) = await flow_with_runs(aep, clock, 1)
    start = clock.monotonic()
    wait = asyncio.create_task(poller.wait(run, deadline=start + 500))
    await clock.advance(499)
    assert not wait.done()
    await clock.advance(1)
    await settle()
    with pytest.raises(RunTimedOut):
        await wait


async def test_unreadable_status_fails_after_the_limit_and_never_retriggers(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    (run,) = await flow_with_runs(aep, clock, 1)
    aep.fail_next("runs.list", lambda: ServerError("down", status=503), times=10_000)
    aep.calls.clear()
    wait = asyncio.create_task(poller.wait(run, deadline=1e9))
    await clock.advance(CONFIG.status_unreadable_s - 1)
    assert not wait.done()
    await clock.advance(1)
    with pytest.raises(StatusUnreadable, match="could not be read for 300 s"):
        await wait
    assert aep.calls["adhoc.run"] == 0
    assert aep.calls["runs.list"] >= 5


async def test_a_poll_that_fails_once_is_retried_on_schedule(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    (run,) = await flow_with_runs(aep, clock, 1)
    aep.fail_next("runs.list", ServerError("blip", status=502), times=2)
    wait = asyncio.create_task(poller.wait(run, deadline=1e9))
    for _ in range(200):
        await clock.advance(1)
    assert (await wait).status == "success"


async def test_concurrent_joins_share_one_creation(aep: FakeAep, clock: FakeClock) -> None:
    manager = lanes(aep, clock)
    flows = await asyncio.gather(*(manager.member(job(f"d{i}")) for i in range(100)))
    assert len({f.id for f, _ in flows}) == 1
    assert aep.calls["flows.create"] == 1
    assert aep.calls["connections.create"] == 1
    assert aep.calls["sourceConnections.create"] == 1


async def test_a_refused_flow_leaves_no_orphans(aep: FakeAep, clock: FakeClock) -> None:
    manager = lanes(aep, clock)
    aep.fail_next("flows.create", RequestError("bad schedule", status=400))
    with pytest.raises(RequestError):
        await manager.member(job())
    assert aep.entities["sourceConnections"] == {}
    assert aep.entities["targetConnections"] == {}
    assert len(aep.entities["connections"]) == 1  # the destination's, kept for reuse


async def test_an_interrupted_creation_is_resumed_not_repeated(
    aep: FakeAep, clock: FakeClock
) -> None:
    aep.fail_next("flows.create", ServerError("gone", status=503))
    with pytest.raises(ServerError):
        await lanes(aep, clock).member(job())
    assert len(aep.entities["sourceConnections"]) == 1  # retryable: kept to resume
    await lanes(aep, clock).member(job())
    assert aep.calls["sourceConnections.create"] == 1
    assert aep.calls["targetConnections.create"] == 1
    assert len(aep.entities["flows"]) == 1


async def test_a_foreign_flow_with_our_name_is_refused(aep: FakeAep, clock: FakeClock) -> None:
    flow, _ = await lanes(aep, clock).member(job())
    aep.entities["flows"][flow.id]["flowSpec"]["id"] = "not-a-dataset-flow-spec"
    engine = Engine(aep, DESTS, CONFIG, org_id="o", sandbox="prod", clock=clock, identity_key=b"k")
    outcome = await engine.run(job(id="other"))
    assert outcome.state == JobState.REJECTED
    assert "not-a-dataset-flow-spec" in outcome.message


async def test_the_trigger_waits_from_created_at_not_a_fixed_sleep(
    aep: FakeAep, clock: FakeClock
) -> None:
    engine = Engine(
        aep,
        DESTS,
        CONFIG,
        org_id="o",
        sandbox="prod",
        clock=clock,
        identity_key=b"k",
        rng=random.Random(2),
    )
    await engine.lanes.member(job())  # the dataset joined at t=0
    await clock.advance(550)
    async with engine:
        run = asyncio.create_task(engine.run(job(id="later")))
        await settle()
        assert aep.calls["adhoc.run"] == 0
        await clock.advance(49)
        assert aep.calls["adhoc.run"] == 0
        await clock.advance(1)
        await settle()
        assert aep.calls["adhoc.run"] == 1  # at createdAt + 600 s: 50 s after the job began
        for _ in range(30):
            await clock.advance(10)
        outcome = await run
    assert outcome.state == JobState.SUCCEEDED
    assert aep.calls["flows.create"] == 1


async def test_jobs_sharing_a_run_park_the_flow_without_racing(
    aep: FakeAep, clock: FakeClock
) -> None:
    engine = Engine(aep, DESTS, CONFIG, org_id="o", sandbox="prod", clock=clock, identity_key=b"k")
    async with engine:
        runs = [asyncio.create_task(engine.run(job(id=f"j{i}"))) for i in range(20)]
        for _ in range(100):
            await clock.advance(10)
        outcomes = await asyncio.gather(*runs)
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}
    assert len({o.run_id for o in outcomes}) == 1
    assert aep.calls["flows.patch"] == 0  # created parked: nothing to change afterwards
    assert aep.calls["flows.action"] == 1  # disabled once, after the last of them
    (flow,) = aep.entities["flows"].values()
    assert flow["state"] == "disabled"


class Refused(Exception):
    """What a test's fence raises: the job may not be sent."""


async def test_every_trigger_call_is_fenced_for_each_job_it_carries(
    aep: FakeAep, clock: FakeClock
) -> None:
    """Right before each ad hoc call, every job it would carry is asked. A job whose fence
    refuses gets the fence's error and is left out; its dataset is left out of the call
    unless another job still waits for it; the call is not sent for nobody."""
    engine = Engine(aep, DESTS, CONFIG, org_id="o", sandbox="prod", clock=clock, identity_key=b"k")
    asked: Counter[str] = Counter()

    def fence(name: str, *, allow: bool) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            asked[name] += 1
            if not allow:
                raise Refused(name)

        return check

    # The first call is "not ready": every job still in it is asked again before the next.
    aep.fail_next("adhoc.run", NotReadyError("not ready", status=400, operation="adhoc.run"))
    async with engine:
        tasks = {
            "alone": engine.run(job("d1", id="alone"), fence=fence("alone", allow=False)),
            "kept": engine.run(job("d2", id="kept"), fence=fence("kept", allow=True)),
            "dropped": engine.run(job("d2", id="dropped"), fence=fence("dropped", allow=False)),
        }
        running = {name: asyncio.create_task(run) for name, run in tasks.items()}
        for _ in range(100):
            await clock.advance(10)
        ended = await asyncio.gather(*running.values(), return_exceptions=True)
        results = dict(zip(running, ended, strict=True))
    assert isinstance(results["alone"], Refused)
    assert isinstance(results["dropped"], Refused)
    kept = results["kept"]
    assert not isinstance(kept, BaseException)
    assert kept.state == JobState.SUCCEEDED
    assert asked == {"alone": 1, "dropped": 1, "kept": 2}
    assert aep.calls["adhoc.run"] == 2
    assert [r.dataset_id for r in aep.runs.values()] == ["d2"], "d1 was never sent"


async def test_a_call_held_past_a_fences_send_by_time_is_fenced_again_not_sent(
    aep: FakeAep, clock: FakeClock
) -> None:
    """A fence says by when the call must be on the wire (the job's lease); a call that could
    go out only later is not sent, and the jobs are fenced again before the next try."""
    engine = Engine(aep, DESTS, CONFIG, org_id="o", sandbox="prod", clock=clock, identity_key=b"k")
    windows = iter([-1.0, 30.0])  # the first renewal's window has passed by the send
    asked = 0

    async def fence() -> float:
        nonlocal asked
        asked += 1
        return clock.monotonic() + next(windows)

    async with engine:
        running = asyncio.create_task(engine.run(job("d1", id="fenced"), fence=fence))
        for _ in range(100):
            await clock.advance(10)
            if running.done():
                break
        outcome = await running
    assert outcome.state == JobState.SUCCEEDED
    assert asked == 2
    assert aep.calls["adhoc.unsent"] == 1
    assert aep.calls["adhoc.run"] == 1  # only the call within its window reached AEP
    assert engine.triggerer.sent == 1


async def test_a_job_resumed_past_its_timeout_still_reads_its_run_once() -> None:
    """A resumed job's timeout counts from its first start; one long spent still gets
    `poll_max_s` to read its run, so a run that ended while the daemon was down is reported."""
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=-1e9, run_duration_s=100)
    engine = Engine(aep, DESTS, CONFIG, org_id="o", sandbox="prod", clock=clock, identity_key=b"k")
    async with engine:
        first = await engine.run(job("d1", id="late", timeout=1800), wait=False)
        assert first.run_id is not None
        await clock.advance(3600)  # down for an hour: the run ended meanwhile
        began = clock.monotonic()
        again = await engine.run(
            job("d1", id="late", timeout=1800),
            resume=Progress(JobState.RUNNING, flow_id=first.flow_id, run_id=first.run_id),
            first_started=clock.time() - 5000,
        )
    assert again.state == JobState.SUCCEEDED, again
    assert again.run_id == first.run_id
    assert clock.monotonic() - began <= CONFIG.poll_max_s


def test_lane_names_carry_the_fingerprint_and_not_the_dataset() -> None:
    manager = lanes(FakeAep(FakeClock()), FakeClock())
    key = manager.key(job("d1"))
    assert key == manager.key(job("d2", labels={"a": "b"}))
    assert key.fingerprint in key.flow_name()
    assert key.flow_name(2).endswith(" #2")
    for other in (job(path="ml/y"), job(format="json"), job(mode="daily")):
        assert manager.key(other).fingerprint != key.fingerprint


async def test_the_unreadable_limit_holds_where_float_rounding_would_disagree(
    aep: FakeAep, clock: FakeClock, poller: RunPoller
) -> None:
    # At this moment `(t + 300) - t < 300` in floating point: a poller that schedules the
    # check at `t + 300` but decides with the difference would wake, decide "not yet", and
    # wake again at once, forever, blocking the event loop.
    start = 3943.616755677566
    limit = CONFIG.status_unreadable_s
    assert (start + limit) - start < limit
    (run,) = await flow_with_runs(aep, clock, 1)
    await clock.advance(start - clock.monotonic())
    assert clock.monotonic() == start
    aep.fail_next("runs.list", lambda: ServerError("down", status=503), times=10_000)
    wait = asyncio.create_task(poller.wait(run, deadline=1e9))
    await clock.advance(limit)
    with pytest.raises(StatusUnreadable):
        await asyncio.wait_for(wait, 5)


async def test_lane_conflicts_wait_on_the_callers_rng_and_stop_at_patch_attempts() -> None:
    """Every PATCH meets a 412: the change is tried `patch_attempts` times, then fails; the
    waits between tries are drawn from the rng the caller passed (same seed, same waits)."""

    async def conflicted(seed: int) -> float:
        clock = FakeClock(auto_advance=True)
        aep = FakeAep(clock, ready_after_s=600, run_duration_s=100)
        manager = LaneManager(
            aep,
            DESTS,
            CONFIG,
            org_id="o",
            sandbox="prod",
            clock=clock,
            identity_key=b"k",
            rng=random.Random(seed),
        )
        await manager.member(job("d1"))
        aep.fail_next("flows.patch", lambda: PreconditionFailed("stale", status=412), times=100)
        began = clock.monotonic()
        with pytest.raises(PreconditionFailed):
            await manager.member(job("d2"))
        assert aep.calls["flows.patch"] == CONFIG.patch_attempts
        await manager.aclose()
        return clock.monotonic() - began

    first, again, other = await conflicted(7), await conflicted(7), await conflicted(8)
    assert first > 0
    assert first == again
    assert first != other


async def marks_unreadable_for(
    error: Callable[[], Exception], *, status_unreadable_s: float
) -> tuple[BaseException | str, list[float]]:
    """A trigger whose reads of the flow's runs fail with `error()` every time: what the job
    gets, and when (virtual seconds from the start) each read was made."""
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=0, run_duration_s=100)
    config = CONFIG.model_copy(
        update={
            "not_ready_wait_s": 0,
            "not_ready_retry_s": 4,
            "not_ready_retry_max_s": 8,
            "status_unreadable_s": status_unreadable_s,
        }
    )
    flow, joined_ms = await lanes(aep, clock).member(job())
    reads: list[float] = []
    began = clock.monotonic()

    def failing() -> Exception:
        reads.append(clock.monotonic() - began)
        return error()

    aep.fail_next("runs.list", failing, times=10_000)
    triggerer = Triggerer(aep, config, clock, random.Random(1))

    async def told(mark_ms: int) -> None:
        return None

    try:
        got: BaseException | str = await triggerer.trigger(
            flow.info(), "d1", joined_ms=joined_ms, deadline=1e9, before_send=told
        )
    except Exception as exc:
        got = exc
    await triggerer.aclose()
    return got, reads


async def test_trigger_gives_up_reading_marks_at_status_unreadable_s_not_after() -> None:
    got, reads = await marks_unreadable_for(
        lambda: ServerError("down", status=503), status_unreadable_s=30
    )
    assert isinstance(got, StatusUnreadable)
    # Waits of 2-4, 4-8, then 4-8 s (half to all of a doubling ceiling); the last read
    # is at the 30 s deadline exactly: the wait before it was cut to end there.
    assert reads[0] == 0
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert 2 <= gaps[0] <= 4
    assert all(4 <= g <= 8 for g in gaps[1:-1])
    assert reads[-1] == pytest.approx(30)


async def test_trigger_honours_retry_after_when_reading_marks() -> None:
    got, reads = await marks_unreadable_for(
        lambda: ThrottledError("slow down", status=429, retry_after=25),
        status_unreadable_s=60,
    )
    assert isinstance(got, StatusUnreadable)
    assert reads == pytest.approx([0, 25, 50, 60])
