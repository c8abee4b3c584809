"""Schedules on a fake clock, through a real in-process daemon and the emulator: fires at the
slots, one job per slot however often it is fired, no overlapping runs, misfires skipped or
coalesced, and a restart across a slot; plus the `[[schedules]]` configuration and `status`.

The emulator shares the daemon's fake clock, which jumps to the next sleeper's deadline
whenever everything waits, also while a request is on the wire or the journal is written. A
metronome sleeping half a second at a time keeps those jumps short, so a job takes some 5 s
of that clock and a test acts well within a slot of a minute."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from aep_emulator.settings import Knobs
from exporter.clock import FakeClock
from exporter.daemon.config import DaemonConfig, LogConfig, ScheduleConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.daemon.journal import FILE_NAME, JobRecord, Journal, schedule_slots, summary
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.errors import ConfigError
from exporter.settings import Settings, load_settings
from exporter.sources.schedules import Schedules, iso, slot_job_id, trigger_of, upcoming, utc
from tests.aepclient_support import config_for
from tests.conftest import Emulator, default_knobs
from tests.daemon_support import spool_daemon, triggers_by_job
from tests.test_packaging import example_copy

DEADLINE = 30.0  # real seconds: a bound on a wait for an event, never a sleep
NAME = "features"
Logs = Sequence[MutableMapping[str, Any]]
MINUTE = timedelta(seconds=60)
SECOND = timedelta(seconds=1)
GRACE_S = 30
ENGINE = EngineConfig(
    not_ready_wait_s=2,
    not_ready_retry_s=0.5,
    not_ready_retry_max_s=1,
    poll_min_s=0.5,
    poll_max_s=2,
    status_unreadable_s=3600,
)


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs(not_ready_window_s=2, run_duration_s={"min": 2, "max": 2})


def schedule(dataset: str, **changes: Any) -> ScheduleConfig:
    base: dict[str, Any] = {
        "name": NAME,
        "interval_s": 60,
        "misfire_grace_s": GRACE_S,
        "job": {"dataset_id": dataset, "destination": "lake", "path": "ml/features"},
    }
    return ScheduleConfig.model_validate({**base, **changes})


def settings_for(emulator: Emulator, tmp_path: Path, *schedules: ScheduleConfig) -> Settings:
    daemon = DaemonConfig(
        state_dir=tmp_path / "state",
        spool_dir=tmp_path / "spool",
        watch=False,
        rescan_s=60,
        shutdown_grace_s=1,
    )
    return Settings.model_construct(
        aep=config_for(emulator, rate_limit_rps=200, max_concurrency=32),
        engine=ENGINE,
        destinations={"lake": DlzDestination(type="dlz")},
        daemon=daemon,
        log=LogConfig(),
        schedules=list(schedules),
    )


@dataclass
class Running:
    daemon: Daemon
    task: asyncio.Task[int]
    schedules: Schedules
    clock: FakeClock

    @property
    def counts(self) -> dict[str, int]:
        return self.schedules.counts[NAME]

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait, on the daemon's and the scheduler's notifications, until `predicate`."""

        async def watch(condition: asyncio.Condition) -> None:
            async with condition:
                await condition.wait_for(predicate)

        watchers = {
            asyncio.ensure_future(watch(c)) for c in (self.daemon.filed, self.schedules.decided)
        }
        try:
            done, _ = await asyncio.wait(
                {*watchers, self.task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for watcher in watchers:
                watcher.cancel()
        if self.task in done:
            pytest.fail(f"the daemon stopped: exit {self.task.result()}")
        assert predicate(), f"not within {DEADLINE} s: {what}"

    async def hold(self, until: datetime) -> None:
        """The scheduler does not run (a stalled loop, a suspended machine) while the clock
        moves on to `until`."""
        self.schedules.scheduler.pause()
        await self.clock.sleep(until.timestamp() - self.clock.time())
        self.schedules.scheduler.resume()


@asynccontextmanager
async def running(emulator: Emulator, settings: Settings) -> AsyncIterator[Running]:
    daemon = spool_daemon(settings, clock=emulator.clock)
    service = Schedules(daemon.admissions)
    daemon.add_service(service)
    metronome = asyncio.create_task(tick(emulator.clock), name="metronome")
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({ready, task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    assert ready.done(), "the daemon did not become ready"
    try:
        yield Running(daemon, task, service, emulator.clock)
    finally:
        # No fire and no job in flight at the stop: the engine's shared flow lookup outlives
        # a job cancelled meanwhile and may send a request after the session is closed.
        service.scheduler.pause()
        if daemon.jobs:
            await asyncio.wait(list(daemon.jobs.values()), timeout=DEADLINE)
        daemon.stop()
        code = await asyncio.wait_for(task, DEADLINE)
        metronome.cancel()
    assert code == EXIT_OK


async def tick(clock: FakeClock) -> None:
    while True:
        await clock.sleep(0.5)


def jobs(tmp_path: Path) -> dict[str, JobRecord]:
    _, records = summary(tmp_path / "state" / FILE_NAME, recent=1000)
    return {r.job_id: r for r in records if r.source == "schedule"}


def fired(logs: Logs) -> list[datetime]:
    return [slot(e["slot"]) for e in logs if e["event"] == "schedule_fired"]


def slot(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- firing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", [{"interval_s": 60}, {"interval_s": None, "cron": "* * * * *"}])
async def test_a_schedule_fires_at_its_slots_and_each_fire_is_one_job(
    emulator: Emulator, tmp_path: Path, trigger: dict[str, Any]
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    started = emulator.clock.time()
    with capture_logs() as logs:
        async with running(
            emulator, settings_for(emulator, tmp_path, schedule(dataset, **trigger))
        ) as run:
            ready = emulator.clock.time()
            await run.until(lambda: run.daemon.counts.filed >= 3, "3 jobs")

    slots = fired(logs)  # three, or more: the clock does not wait for the test
    # Slots on the minute from the first one at or after the start, one after the other.
    assert started <= slots[0].timestamp() < ready + 60
    assert [s - slots[0] for s in slots] == [MINUTE * n for n in range(len(slots))]
    assert all(s.second == 0 and s.microsecond == 0 for s in slots)
    assert all(e["late_s"] < 1 for e in events(logs, "schedule_fired"))  # on time
    ids = [slot_job_id(NAME, s) for s in slots]
    assert ids[0] == f"features@{iso(slots[0])}"
    found = jobs(tmp_path)
    assert sorted(found) == ids
    assert [found[i].state.value for i in ids[:3]] == ["succeeded"] * 3
    assert {found[i].name for i in ids} == {NAME}
    assert {found[i].spec["path"] for i in ids} == {"ml/features"}
    triggers = triggers_by_job(emulator.state)
    assert [triggers[i] for i in ids[:3]] == [1, 1, 1]
    assert run.counts == dict.fromkeys(run.counts, 0) | {"fired": len(slots)}
    metric = run.daemon.metrics.registry.get_sample_value(
        "aep_exporter_schedule_slots_total", {"schedule": NAME, "outcome": "fired"}
    )
    assert metric == len(slots)
    # The latest slot handled is journaled: where the next start resumes.
    assert schedule_slots(tmp_path / "state" / FILE_NAME) == {NAME: slots[-1].timestamp()}


async def test_a_slot_fired_twice_is_one_job(emulator: Emulator, tmp_path: Path) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    with capture_logs() as logs:
        async with running(emulator, settings_for(emulator, tmp_path, schedule(dataset))) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first fire's job")
            first = fired(logs)[0]
            nxt = first + MINUTE
            # Two fires of the next slot at once, before the scheduler gets there itself.
            twice = await asyncio.gather(
                run.schedules.fire(NAME, nxt), run.schedules.fire(NAME, nxt)
            )
            assert sorted(a.value for a in twice if a) == ["duplicate", "started"]
            await run.until(lambda: run.counts["duplicate"] >= 2, "the scheduler's own fire")
            await run.until(lambda: run.daemon.counts.filed >= 2, "the job of the slot")

    job_id = slot_job_id(NAME, nxt)
    assert fired(logs)[:2] == [first, nxt]
    assert {slot_job_id(NAME, first), job_id} <= set(jobs(tmp_path))
    assert jobs(tmp_path)[job_id].state.value == "succeeded"
    assert triggers_by_job(emulator.state)[job_id] == 1
    duplicates = events(logs, "schedule_fire_duplicate")
    assert [d["job_id"] for d in duplicates] == [job_id, job_id]
    assert run.counts["duplicate"] == 2


async def test_a_slot_is_skipped_while_the_previous_job_is_in_flight(
    emulator: Emulator, tmp_path: Path
) -> None:
    await emulator.control("PATCH", "/config", {"run_duration_s": {"min": 140, "max": 140}})
    dataset = (await emulator.seed(rows=20))[0]
    with capture_logs() as logs:
        async with running(emulator, settings_for(emulator, tmp_path, schedule(dataset))) as run:
            await run.until(lambda: run.daemon.counts.filed >= 2, "two jobs")

    first, second = fired(logs)[:2]
    # The first run lasts over two minutes: the two slots within it are skipped.
    assert second - first == 3 * MINUTE
    skipped = events(logs, "schedule_overlap_skipped")[:2]
    assert [slot(e["slot"]) for e in skipped] == [first + MINUTE, first + 2 * MINUTE]
    assert [e["running"] for e in skipped] == [[slot_job_id(NAME, first)]] * 2
    found = jobs(tmp_path)
    assert found[slot_job_id(NAME, first)].state.value == "succeeded"
    assert found[slot_job_id(NAME, second)].state.value == "succeeded"
    assert slot_job_id(NAME, first + MINUTE) not in found
    # The emulator ran the schedule's exports one after the other.
    runs = sorted(emulator.state.all_runs(), key=lambda r: r.created)
    assert runs[0].request_id.startswith(slot_job_id(NAME, first))
    assert all(b.created >= a.complete_at for a, b in itertools.pairwise(runs))


# -- misfires ----------------------------------------------------------------------------------


async def test_a_slot_noticed_beyond_grace_is_skipped(emulator: Emulator, tmp_path: Path) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    with capture_logs() as logs:
        async with running(emulator, settings_for(emulator, tmp_path, schedule(dataset))) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first job")
            first = fired(logs)[0]
            # The next slot passes unseen, and is noticed 45 s late (grace: 30 s).
            await run.hold(until=first + MINUTE + timedelta(seconds=45))
            await run.until(lambda: run.counts["missed"] >= 1, "the missed slot")
            assert run.counts["fired"] == 1
            await run.until(lambda: run.counts["fired"] >= 2, "the slot after it")

    [missed] = events(logs, "schedule_missed")
    assert slot(missed["slot"]) == first + MINUTE
    assert missed["missed"] == 1
    assert 45 <= missed["late_s"] < 46
    assert missed["reason"] == "noticed too late"
    assert fired(logs)[:2] == [first, first + 2 * MINUTE]
    assert slot_job_id(NAME, first + MINUTE) not in jobs(tmp_path)


async def test_slots_noticed_late_within_grace_coalesce_into_one_fire(
    emulator: Emulator, tmp_path: Path
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    config = schedule(dataset, misfire_grace_s=300)
    with capture_logs() as logs:
        async with running(emulator, settings_for(emulator, tmp_path, config)) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first job")
            first = fired(logs)[0]
            await run.hold(until=first + timedelta(seconds=200))  # three slots pass unseen
            await run.until(lambda: run.counts["fired"] >= 3, "the coalesced fire and the next")

    assert fired(logs)[:3] == [first, first + 3 * MINUTE, first + 4 * MINUTE]
    [coalesced] = events(logs, "schedule_coalesced")
    assert slot(coalesced["slot"]) == first + 3 * MINUTE
    assert slot(coalesced["first_coalesced"]) == first + MINUTE
    assert coalesced["coalesced"] == 2
    assert run.counts["coalesced"] == 2
    assert events(logs, "schedule_missed") == []
    assert slot_job_id(NAME, first + MINUTE) not in jobs(tmp_path)


async def test_without_coalescing_late_slots_fire_one_after_the_other(
    emulator: Emulator, tmp_path: Path
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    config = schedule(dataset, misfire_grace_s=300, coalesce=False)
    with capture_logs() as logs:
        async with running(emulator, settings_for(emulator, tmp_path, config)) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first job")
            first = fired(logs)[0]
            await run.hold(until=first + timedelta(seconds=130))  # two slots pass unseen
            await run.until(lambda: run.daemon.counts.filed >= 3, "both late slots' jobs")

    assert fired(logs)[:3] == [first, first + MINUTE, first + 2 * MINUTE]
    found = jobs(tmp_path)
    one, two = (found[slot_job_id(NAME, first + n * MINUTE)] for n in (1, 2))
    assert one.state.value == two.state.value == "succeeded"
    assert two.created >= one.updated  # the second started once the first had finished
    assert events(logs, "schedule_overlap_skipped") == []
    assert events(logs, "schedule_coalesced") == []


# -- a restart across a slot -------------------------------------------------------------------


async def test_a_slot_that_fell_while_the_daemon_was_down_fires_once_within_grace(
    emulator: Emulator, tmp_path: Path
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    settings = settings_for(emulator, tmp_path, schedule(dataset))
    with capture_logs() as logs:
        async with running(emulator, settings) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first job")
        [first] = fired(logs)
        await emulator.clock.sleep(first.timestamp() + 75 - emulator.clock.time())  # down
        async with running(emulator, settings) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the late slot's job")
        assert fired(logs) == [first, first + MINUTE]
        async with running(emulator, settings) as run:  # at once again: nothing is due
            await run.until(lambda: run.counts["fired"] >= 1, "the next slot")

    [late] = [e for e in events(logs, "schedule_fired") if slot(e["slot"]) == first + MINUTE]
    assert 15 <= late["late_s"] < 20  # and the start took a moment
    assert fired(logs) == [first, first + MINUTE, first + 2 * MINUTE]
    ids = [slot_job_id(NAME, first + n * MINUTE) for n in range(3)]
    assert sorted(jobs(tmp_path)) == ids
    assert [triggers_by_job(emulator.state)[i] for i in ids[:2]] == [1, 1]
    assert events(logs, "schedule_missed") == []


DOWN = "the daemon was not running"


async def test_a_slot_that_fell_while_the_daemon_was_down_is_skipped_beyond_grace(
    emulator: Emulator, tmp_path: Path
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    settings = settings_for(emulator, tmp_path, schedule(dataset))
    with capture_logs() as logs:
        async with running(emulator, settings) as run:
            await run.until(lambda: run.daemon.counts.filed >= 1, "the first job")
        [first] = fired(logs)
        await emulator.clock.sleep(first.timestamp() + 105 - emulator.clock.time())  # down
        async with running(emulator, settings) as run:
            await run.until(lambda: run.counts["missed"] >= 1, "the missed slot")
            assert run.counts["fired"] == 0
            await run.until(lambda: run.counts["fired"] >= 1, "the next slot")

    # Only the slots that fell while it was down: a starved loop under the auto-advancing
    # fake clock may also see a live slot "noticed too late", which is not this test's case.
    [missed] = [e for e in events(logs, "schedule_missed") if e["reason"] == DOWN]
    assert slot(missed["slot"]) == first + MINUTE
    assert 45 <= missed["late_s"] < 50
    assert fired(logs)[:2] == [first, first + 2 * MINUTE]
    assert slot_job_id(NAME, first + MINUTE) not in jobs(tmp_path)


async def test_a_schedule_long_stopped_counts_its_missed_slots(
    emulator: Emulator, tmp_path: Path
) -> None:
    dataset = (await emulator.seed(rows=20))[0]
    settings = settings_for(emulator, tmp_path, schedule(dataset, interval_s=10))
    with capture_logs() as logs:
        async with running(emulator, settings) as run:
            await run.until(lambda: run.counts["fired"] >= 1, "the first fire")
            run.schedules.scheduler.pause()  # one fire, finished before the stop
            await run.until(lambda: run.daemon.counts.filed >= 1, "its job")
        # The latest slot handled: fired, or skipped while its job ran.
        last = utc(schedule_slots(tmp_path / "state" / FILE_NAME)[NAME])
        await emulator.clock.sleep(last.timestamp() + 3600 - emulator.clock.time())
        async with running(emulator, settings) as run:
            await run.until(lambda: run.counts["fired"] >= 1, "the first slot within grace")

    # Only the slots that fell while it was down: a starved loop under the auto-advancing
    # fake clock may also see a live slot "noticed too late", which is not this test's case.
    [missed] = [e for e in events(logs, "schedule_missed") if e["reason"] == DOWN]
    [coalesced] = events(logs, "schedule_coalesced")
    latest = fired(logs)[-1]
    # Slots every 10 s, an hour later: those older than 30 s are missed, the rest coalesce
    # into one fire, of the latest; each slot is accounted for once.
    assert slot(missed["slot"]) == last + timedelta(seconds=10)
    assert 356 <= missed["missed"] <= 357  # 10 s .. 3560 s, and the start took a moment
    assert slot(coalesced["first_coalesced"]) == last + 10 * (missed["missed"] + 1) * SECOND
    assert 3600 * SECOND <= latest - last <= 3610 * SECOND
    assert missed["missed"] + coalesced["coalesced"] + 1 == (latest - last) / (10 * SECOND)


# -- configuration -----------------------------------------------------------------------------


def write_settings(tmp_path: Path, schedules: str) -> Path:
    (tmp_path / "secret").write_text("s3cr3t-value\n")
    path = tmp_path / "exporter.toml"
    path.write_text(f"""
[aep]
platform_url = "http://127.0.0.1:9"
ims_url = "http://127.0.0.1:9"
client_id = "emulator-client"
client_secret_file = "secret"
org_id = "EMULATOR000000000000000@AdobeOrg"

[daemon]
state_dir = "state"
spool_dir = "spool"

[destinations.lake]
type = "dlz"
{schedules}""")
    return path


def load(tmp_path: Path, schedules: str) -> Settings:
    return load_settings(write_settings(tmp_path, schedules))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXPORTER_"):
            monkeypatch.delenv(name)


JOB = 'job = { dataset_id = "ds_1", destination = "lake", path = "ml/x" }'


@pytest.mark.usefixtures("clean_environment")
def test_schedules_load_from_toml(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        f"""
[[schedules]]
name = "hourly"
cron = "0 * * * mon-fri"
timezone = "Europe/Berlin"
{JOB}

[[schedules]]
name = "often"
interval_s = 900
misfire_grace_s = 60
coalesce = false
enabled = false
[schedules.job]
dataset_id = "ds_2"
destination = "lake"
path = "ml/y"
format = "json"
""",
    )
    hourly, often = settings.schedules
    assert (hourly.name, hourly.cron, hourly.timezone, hourly.misfire_grace_s) == (
        "hourly",
        "0 * * * mon-fri",
        "Europe/Berlin",
        300,
    )
    assert hourly.coalesce
    assert hourly.enabled
    assert hourly.describe() == "cron 0 * * * mon-fri (Europe/Berlin)"
    assert (often.interval_s, often.coalesce, often.enabled, often.job.format) == (
        900,
        False,
        False,
        "json",
    )
    # In Berlin, 9:00 on a Friday is 8:00 UTC (winter time); the next is Monday's.
    friday = datetime(2026, 1, 2, 7, 30, tzinfo=UTC)
    nxt = trigger_of(hourly).get_next_fire_time(None, friday)
    assert nxt == datetime(2026, 1, 2, 8, 0, tzinfo=UTC)


BAD: list[tuple[str, str]] = [
    (f'name = "x"\n{JOB}', "give exactly one of cron and interval_s"),
    (f'name = "x"\ncron = "* * * * *"\ninterval_s = 60\n{JOB}', "exactly one of cron and"),
    (f'name = "x"\ncron = "0 6 * * 1-5"\n{JOB}', "name days of the week (mon-fri"),
    (f'name = "x"\ncron = "0 6 * *"\n{JOB}', "a cron expression has 5 fields"),
    (f'name = "x"\ncron = "61 * * * *"\n{JOB}', "not a valid cron expression"),
    (f'name = "x"\ncron = "0 0 30 2 *"\n{JOB}', "never fires"),
    (f'name = "x"\ninterval_s = 0\n{JOB}', "interval_s"),
    (f'name = "x"\ninterval_s = 60\ntimezone = "Mars/Olympus"\n{JOB}', "unknown time zone"),
    (f'name = "no spaces"\ninterval_s = 60\n{JOB}', "schedules.0.name"),
    (f'name = "x"\ninterval_s = 60\nsurprise = 1\n{JOB}', "surprise"),
    (
        'name = "x"\ninterval_s = 60\n'
        'job = { id = "fixed", dataset_id = "ds_1", destination = "lake", path = "ml/x" }',
        "remove job.id",
    ),
    (
        'name = "x"\ninterval_s = 60\n'
        'job = { dataset_id = "ds_1", destination = "lake", path = "../up" }',
        "schedules.0.job.path",
    ),
    (
        'name = "x"\ninterval_s = 60\n'
        'job = { dataset_id = "ds_1", destination = "nowhere", path = "ml/x" }',
        "schedule 'x': unknown destination 'nowhere'; configured: lake",
    ),
]


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(("body", "expected"), BAD)
def test_a_bad_schedule_is_a_clear_config_error(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f"[[schedules]]\n{body}\n")
    assert expected in str(raised.value)
    assert "s3cr3t-value" not in str(raised.value)


@pytest.mark.usefixtures("clean_environment")
def test_the_example_schedule_loads_with_its_documented_defaults(tmp_path: Path) -> None:
    config = example_copy(tmp_path)
    text = config.read_text()
    example = text[text.index("# [[schedules]]") :]
    settings_lines = [
        line.removeprefix("# ")
        for line in example.splitlines()
        if line == "# [[schedules]]" or re.fullmatch(r"# [a-z_]+ = .+", line)
    ]
    config.write_text(text + "\n" + "\n".join(settings_lines) + "\n")
    [loaded] = load_settings(config, credentials_directory=str(tmp_path / "creds")).schedules
    assert loaded.name == "nightly-churn"
    assert loaded.job.destination == "ml-features-s3"
    defaults = ScheduleConfig.model_fields
    for key in ("misfire_grace_s", "coalesce", "enabled"):
        assert getattr(loaded, key) == defaults[key].default, key


@pytest.mark.usefixtures("clean_environment")
def test_two_schedules_of_one_name_are_refused(tmp_path: Path) -> None:
    one = f'[[schedules]]\nname = "x"\ninterval_s = 60\n{JOB}\n'
    with pytest.raises(ConfigError, match="schedule 'x' is declared twice"):
        load(tmp_path, one + one)


@pytest.mark.slow
def test_status_shows_each_schedule_with_its_last_and_next_slots(tmp_path: Path) -> None:
    config = write_settings(
        tmp_path,
        f"""
[[schedules]]
name = "yearly"
cron = "0 0 1 1 *"
{JOB}

[[schedules]]
name = "paused"
interval_s = 60
enabled = false
{JOB}
""",
    )

    async def last_fired() -> None:
        journal = await Journal.open(tmp_path / "state")
        try:
            await journal.mark_slot("yearly", datetime(2025, 1, 1, tzinfo=UTC).timestamp())
        finally:
            await journal.close()

    asyncio.run(last_fired())
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["COLUMNS"] = "250"
    done = subprocess.run(  # noqa: S603 - our own command, fixed arguments
        [sys.executable, "-m", "exporter", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    year = datetime.now(UTC).year
    rows = {line.split()[1]: line for line in done.stdout.splitlines() if "│ yearly" in line}
    yearly = rows["yearly"]
    assert "cron 0 0 1 1 * (UTC)" in yearly
    assert "2025-01-01T00:00:00Z" in yearly
    nxt = ", ".join(f"{y}-01-01T00:00:00Z" for y in (year + 1, year + 2, year + 3))
    assert nxt in yearly
    paused = next(line for line in done.stdout.splitlines() if "│ paused" in line)
    assert "every 60 s" in paused
    assert "disabled" in paused


def slots_of(cron: str, since: datetime, count: int) -> list[str]:
    config = ScheduleConfig.model_validate(
        {
            "name": "dst",
            "cron": cron,
            "timezone": "Europe/Berlin",
            "job": {"dataset_id": "ds_0001", "destination": "lake", "path": "ml/dst"},
        }
    )
    return [iso(s) for s in upcoming(config, None, since.timestamp(), count)]


def test_a_fixed_time_fires_once_in_the_night_the_clocks_go_back() -> None:
    # 2026-10-25 in Berlin: 02:00-03:00 happens twice (CEST, then CET).
    night = datetime(2026, 10, 24, 12, tzinfo=UTC)
    assert slots_of("30 2 * * *", night, 3) == [
        "2026-10-25T00:30:00Z",  # 02:30 CEST, the first 02:30
        "2026-10-26T01:30:00Z",  # not 2026-10-25T01:30Z, the second 02:30 (CET)
        "2026-10-27T01:30:00Z",
    ]
    assert slots_of("0,30 2 * * *", night, 3)[:2] == [
        "2026-10-25T00:00:00Z",
        "2026-10-25T00:30:00Z",
    ]
    assert slots_of("0,30 2 * * *", night, 3)[2] == "2026-10-26T01:00:00Z"


def test_a_wildcard_hour_goes_on_by_real_time_through_the_repeated_hour() -> None:
    night = datetime(2026, 10, 24, 23, 50, tzinfo=UTC)  # 01:50 CEST
    assert slots_of("*/30 * * * *", night, 5) == [
        "2026-10-25T00:00:00Z",  # 02:00 CEST
        "2026-10-25T00:30:00Z",  # 02:30 CEST
        "2026-10-25T01:00:00Z",  # 02:00 CET
        "2026-10-25T01:30:00Z",  # 02:30 CET
        "2026-10-25T02:00:00Z",  # 03:00 CET
    ]


def test_a_grace_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="misfire_grace_s"):
        ScheduleConfig.model_validate(
            {
                "name": "x",
                "interval_s": 60,
                "misfire_grace_s": 0,
                "job": {"dataset_id": "ds_0001", "destination": "lake", "path": "ml/x"},
            }
        )
