"""Reload (SIGHUP): a real `aep-exporter run` takes new destinations and schedules from its
rewritten config file without disturbing a job in flight, and refuses a broken one keeping
the old; in process, what a reload applies, what it leaves for a restart, and how reloads
asked for during one coalesce."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from aep_emulator.app import serve
from aep_emulator.settings import Knobs, Span
from aep_emulator.state import EmulatorState
from exporter.clock import SystemClock
from exporter.daemon.config import DaemonConfig, LogConfig, ScheduleConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.errors import ConfigError
from exporter.settings import Settings
from exporter.sources.schedules import Schedules, trigger_of
from tests.aepclient_support import config_for
from tests.conftest import EMULATOR_SECRET, Emulator, emulator_knobs
from tests.daemon_support import (
    Running,
    daemon_process,
    drop_job,
    results,
    spool_daemon,
    until_results,
    write_config,
)

DEADLINE = 30.0


# -- a real daemon, a real signal --------------------------------------------------------------


def config_text(tmp_path: Path, url: str, extra: str, **sections: dict[str, Any]) -> Path:
    """The daemon's config file, written whole each time as an operator would (aside, then
    renamed over the old one)."""
    written = write_config(tmp_path, url, engine={"not_ready_wait_s": 0.2}, **sections)
    staged = tmp_path / "next.toml"
    staged.write_text(written.read_text() + extra)
    staged.replace(written)
    return written


def schedule_toml(name: str, dataset: str, destination: str) -> str:
    return f"""
[[schedules]]
name = "{name}"
interval_s = 1
misfire_grace_s = 5
job = {{ dataset_id = "{dataset}", destination = "{destination}", path = "ml/{name}" }}
"""


LAKE2 = '\n[destinations.lake2]\ntype = "dlz"\n'


async def until_line(running: Running, event: str, **fields: Any) -> dict[str, Any]:
    """The first log line of `event` with these `fields`, once the daemon has written it."""
    async with asyncio.timeout(DEADLINE):
        while True:
            for line in running.lines:
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            seen = sum(1 for line in running.lines if line.get("event") == event)
            await running.until(event, count=seen + 1, deadline_s=DEADLINE)


def lines(running: Running, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        line
        for line in running.lines
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
    ]


def at(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(line["timestamp"])


def slot_of(line: dict[str, Any]) -> datetime:
    return datetime.strptime(line["slot"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def job(dataset: str, name: str, destination: str) -> dict[str, Any]:
    return {"id": name, "dataset_id": dataset, "destination": destination, "path": f"ml/{name}"}


def set_run_duration(state: EmulatorState, seconds: float) -> None:
    state.knobs = Knobs.model_validate(
        {**state.knobs.model_dump(), "run_duration_s": {"min": seconds, "max": seconds}}
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_sighup_takes_new_destinations_and_schedules_and_refuses_a_broken_config(
    tmp_path: Path,
) -> None:
    knobs = emulator_knobs(
        not_ready_window_s=0.2,
        run_duration_s=Span(min=0.1, max=0.2),
        seed=5,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        dataset = state.lake.create_dataset(
            "prod", "features", 10, rng=random.Random(1), now_ms=0
        ).id
        spool = tmp_path / "spool"
        config = config_text(tmp_path, url, schedule_toml("old", dataset, "lake"))
        async with daemon_process(config, tmp_path / "daemon.log") as running:
            await running.until("daemon_ready")
            await until_line(running, "schedule_fired", schedule="old")

            # Before: lake2 is unknown.
            drop_job(spool, "early.json", job(dataset, "early", "lake2"))
            await until_results(spool, ["early.json"], deadline_s=DEADLINE)
            assert results(spool)["early.json"]["state"] == "rejected"

            # A job in flight, its run lasting seconds, when the new config comes.
            set_run_duration(state, 4)
            drop_job(spool, "inflight.json", job(dataset, "inflight", "lake"))
            await until_line(running, "run_triggered", job_id="inflight")
            set_run_duration(state, 0.1)
            config_text(
                tmp_path,
                url,
                LAKE2 + schedule_toml("new", dataset, "lake2"),
                daemon={"max_in_flight": 50},  # not taken without a restart
            )
            running.proc.send_signal(signal.SIGHUP)
            done = await until_line(running, "reload_done")
            assert done["destinations_added"] == ["lake2"]
            assert done["destinations_removed"] == []
            restart = await until_line(running, "reload_needs_restart")
            assert restart["sections"] == ["daemon"]
            assert lines(running, "schedule_removed", schedule="old")
            assert lines(running, "schedule_added", schedule="new")

            drop_job(spool, "later.json", job(dataset, "later", "lake2"))
            fired = await until_line(running, "schedule_fired", schedule="new")
            await until_line(running, "job_finished", job_id=fired["job_id"], state="succeeded")
            await until_results(spool, ["later.json", "inflight.json"], deadline_s=DEADLINE)
            found = results(spool)
            assert found["later.json"]["state"] == "succeeded"
            assert found["inflight.json"]["state"] == "succeeded"  # undisturbed by the reload
            assert at(lines(running, "job_finished", job_id="inflight")[0]) > at(done)
            # The removed schedule fires no slot after the reload.
            assert all(
                slot_of(f) < at(done) for f in lines(running, "schedule_fired", schedule="old")
            )

            # Broken configs are refused, with the reason, and the old one stays.
            good = config.read_text()
            broken = {
                "syntax": good + "\n[destinations.lake3\n",
                "destination": good + schedule_toml("third", dataset, "nowhere"),
            }
            for n, text in enumerate(broken.values(), start=1):
                config.write_text(text)
                running.proc.send_signal(signal.SIGHUP)
                await running.until("reload_refused", count=n, deadline_s=DEADLINE)
            syntax, destination = lines(running, "reload_refused")
            assert "line" in syntax["reason"]
            assert "schedule 'third': unknown destination 'nowhere'" in destination["reason"]
            assert all(EMULATOR_SECRET not in r["reason"] for r in (syntax, destination))
            assert len(lines(running, "reload_done")) == 1

            new_fires = len(lines(running, "schedule_fired", schedule="new"))
            drop_job(spool, "after.json", job(dataset, "after", "lake2"))
            await until_results(spool, ["after.json"], deadline_s=DEADLINE)
            assert results(spool)["after.json"]["state"] == "succeeded"
            await running.until("schedule_fired", count=len(lines(running, "schedule_fired")) + 1)
            assert len(lines(running, "schedule_fired", schedule="new")) > new_fires
            assert not lines(running, "schedule_added", schedule="third")

            running.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                assert await running.proc.wait() == 0


# -- in process --------------------------------------------------------------------------------

ENGINE = EngineConfig(
    not_ready_wait_s=2,
    not_ready_retry_s=0.5,
    not_ready_retry_max_s=1,
    poll_min_s=0.5,
    poll_max_s=2,
    status_unreadable_s=3600,
)


def settings_for(
    emulator: Emulator,
    tmp_path: Path,
    *schedules: ScheduleConfig,
    destinations: tuple[str, ...] = ("lake",),
    max_in_flight: int = 100,
) -> Settings:
    return Settings.model_construct(
        aep=config_for(emulator),
        engine=ENGINE,
        destinations={name: DlzDestination(type="dlz") for name in destinations},
        daemon=DaemonConfig(
            state_dir=tmp_path / "state",
            spool_dir=tmp_path / "spool",
            watch=False,
            rescan_s=60,
            shutdown_grace_s=1,
            max_in_flight=max_in_flight,
        ),
        log=LogConfig(),
        schedules=list(schedules),
    )


def yearly(name: str, cron: str, destination: str = "lake") -> ScheduleConfig:
    """A schedule whose slot is days away: nothing fires while a test looks."""
    return ScheduleConfig.model_validate(
        {
            "name": name,
            "cron": cron,
            "job": {"dataset_id": "ds_1", "destination": destination, "path": f"ml/{name}"},
        }
    )


@asynccontextmanager
async def running(emulator: Emulator, settings: Settings) -> AsyncIterator[Daemon]:
    daemon = spool_daemon(settings, clock=emulator.clock)
    daemon.add_service(Schedules(daemon.admissions))
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({ready, task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    assert ready.done(), "the daemon did not become ready"
    try:
        yield daemon
    finally:
        daemon.stop()
        code = await asyncio.wait_for(task, DEADLINE)
    assert code == EXIT_OK


def triggered(config: ScheduleConfig) -> str:
    return str(trigger_of(config))


def scheduled(daemon: Daemon) -> dict[str, str]:
    [service] = [s for s in daemon.services if isinstance(s, Schedules)]
    return {job.id: str(job.trigger) for job in service.scheduler.get_jobs()}


async def test_a_reload_applies_destinations_and_schedules_and_no_other_section(
    emulator: Emulator, tmp_path: Path
) -> None:
    a, gone = yearly("a", "0 6 2 1 *"), yearly("gone", "0 6 3 1 *")
    before = settings_for(emulator, tmp_path, a, gone)
    changed = yearly("a", "0 7 2 1 *")
    added = yearly("b", "0 6 4 1 *", destination="lake2")
    after = settings_for(
        emulator,
        tmp_path,
        changed,
        added,
        destinations=("lake", "lake2"),
        max_in_flight=5,
    )
    heard: list[object] = []
    with capture_logs() as logs:
        async with running(emulator, before) as daemon:
            daemon.on_reloading.append(lambda: heard.append("reloading"))
            daemon.on_reloaded.append(heard.append)
            assert scheduled(daemon) == {"a": triggered(a), "gone": triggered(gone)}
            assert await daemon.reload(lambda: after) is True
            assert scheduled(daemon) == {"a": triggered(changed), "b": triggered(added)}
            assert sorted(daemon.settings.destinations) == ["lake", "lake2"]
            assert daemon.settings.schedules == [changed, added]
            assert daemon.settings.daemon.max_in_flight == 100  # needs a restart
            assert daemon.room == 100

            def refuse() -> Settings:
                raise ConfigError("exporter.toml: 1 problem(s)\n  aep.client_id: Field required")

            assert await daemon.reload(refuse) is False
            assert sorted(daemon.settings.destinations) == ["lake", "lake2"]
            assert set(scheduled(daemon)) == {"a", "b"}

    assert heard == ["reloading", True, "reloading", False]
    names = [e["event"] for e in logs if e["event"].startswith(("reload", "schedule"))]
    assert names == [
        "schedule_started",
        "schedule_started",
        "reload_started",
        "schedule_removed",
        "schedule_changed",
        "schedule_added",
        "reload_done",
        "reload_needs_restart",
        "reload_started",
        "reload_refused",
    ]
    [refused] = [e for e in logs if e["event"] == "reload_refused"]
    assert refused["reason"].endswith("aep.client_id: Field required")
    [restart] = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert restart["sections"] == ["daemon"]


async def test_reloads_asked_for_during_a_reload_coalesce_into_one(
    emulator: Emulator, tmp_path: Path
) -> None:
    settings = settings_for(emulator, tmp_path)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def load() -> Settings:
        calls.append(len(calls))
        if len(calls) == 1:
            entered.set()
            assert release.wait(DEADLINE), "never released"
        return settings

    with capture_logs() as logs:
        async with running(emulator, settings) as daemon:
            first = asyncio.create_task(daemon.reload(load))
            assert await asyncio.to_thread(entered.wait, DEADLINE)
            # Two more SIGHUPs while the first reload reads the file: one more reload reads
            # the newest file once the first is done; the third adds nothing.
            second = asyncio.create_task(daemon.reload(load))
            third = asyncio.create_task(daemon.reload(load))
            assert await asyncio.wait_for(third, DEADLINE) is None
            assert not second.done()
            release.set()
            both = await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
            assert list(both) == [True, True]

    assert calls == [0, 1]
    events = [e["event"] for e in logs if e["event"].startswith("reload")]
    assert events == [
        "reload_started",
        "reload_coalesced",
        "reload_done",
        "reload_started",
        "reload_done",
    ]
