"""The daemon on the AEP seam's in-memory fake, and the boundary its job sources keep.

The daemon needs only `AepApi` (the token check, draining, closing included), so its tests
can run without HTTP; its sources see it only through `Admissions`."""

from __future__ import annotations

import ast
import asyncio
import json
import random
from pathlib import Path

from exporter.aep.client import HttpAep
from exporter.aep.config import AepConfig
from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.daemon.assemble import build_daemon
from exporter.daemon.config import AdminConfig, DaemonConfig, LogConfig, RedisConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.settings import Settings
from exporter.sources.redis.intake import RedisIntake
from exporter.sources.spool import RESULT_SUFFIX
from tests.daemon_support import spool_daemon, spool_of

DEADLINE = 20.0  # real seconds: a bound on a wait for an event, never a sleep
PACKAGE = Path(__file__).parent.parent / "exporter"


def fake_settings(tmp_path: Path) -> Settings:
    return Settings.model_construct(
        aep=AepConfig.model_validate(
            {"client_id": "c", "client_secret": "s", "org_id": "o@AdobeOrg"}
        ),
        engine=EngineConfig(poll_min_s=5, poll_max_s=30),
        destinations={"lake": DlzDestination(type="dlz")},
        daemon=DaemonConfig(
            state_dir=tmp_path / "state",
            spool_dir=tmp_path / "spool",
            watch=False,
            rescan_s=1,
            shutdown_grace_s=1,
        ),
        log=LogConfig(),
    )


async def test_a_daemon_on_the_fake_runs_a_spool_job_and_stops_cleanly(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=-1e9, run_duration_s=30)
    daemon = spool_daemon(fake_settings(tmp_path), clock=clock, api=aep, rng=random.Random(7))
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(DEADLINE):
        await daemon.ready.wait()
    spool = spool_of(daemon)
    staged = tmp_path / "spool" / "job.json.tmp"
    job = {"id": "on-fake", "dataset_id": "d1", "destination": "lake", "path": "ml/x"}
    staged.write_text(json.dumps(job))
    staged.rename(spool.dirs["incoming"] / "job.json")
    async with asyncio.timeout(DEADLINE), daemon.filed:
        await daemon.filed.wait_for(lambda: daemon.counts.filed >= 1)
    daemon.stop()
    async with asyncio.timeout(DEADLINE):
        assert await task == EXIT_OK
    result = json.loads((spool.dirs["done"] / f"job.json{RESULT_SUFFIX}").read_text())
    assert result["state"] == "succeeded"
    assert [run.dataset_id for run in aep.runs.values()] == ["d1"]


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_job_sources_and_ops_services_do_not_reach_into_the_daemon() -> None:
    """They are handed `Admissions` (and what else they use, by name), never the `Daemon`."""
    paths = [*(PACKAGE / "sources").rglob("*.py"), *(PACKAGE / "ops").glob("*.py")]
    reaching = sorted(
        str(p.relative_to(PACKAGE)) for p in paths if "exporter.daemon.core" in imported_modules(p)
    )
    assert len(paths) > 8
    assert reaching == []


def test_one_random_generator_is_handed_to_everything_that_jitters(tmp_path: Path) -> None:
    """`build_daemon` passes its generator down (AEP client, engine, Redis store, storage
    retries): seeding it makes every jittered delay of a daemon reproducible."""
    settings = fake_settings(tmp_path)
    settings = settings.model_copy(
        update={
            "admin": AdminConfig(enabled=False),
            "redis": RedisConfig(url="redis://127.0.0.1:1/0", consumer="c"),
        }
    )
    rng = random.Random(11)
    daemon = build_daemon(settings, clock=FakeClock(), rng=rng)
    assert isinstance(daemon.api, HttpAep)
    (redis,) = (s for s in daemon.services if isinstance(s, RedisIntake))
    assert daemon.rng is rng
    assert daemon.admissions.rng is rng
    assert daemon.api.transport.rng is rng
    assert daemon.engine.poller._rng is rng
    assert redis.store._rng is rng


async def test_the_core_knows_no_source_the_spool_is_a_service(tmp_path: Path) -> None:
    """Without services the daemon runs and stops without making a spool folder; the spool's
    service owns the journal source `spool` (its recovery: tests/test_daemon_crash.py)."""
    clock = FakeClock(auto_advance=True)
    bare = Daemon(fake_settings(tmp_path), clock=clock, api=FakeAep(clock))
    task = asyncio.create_task(bare.run())
    async with asyncio.timeout(DEADLINE):
        await bare.ready.wait()
    bare.stop()
    async with asyncio.timeout(DEADLINE):
        assert await task == EXIT_OK
    assert (tmp_path / "state").is_dir()
    assert not (tmp_path / "spool").exists()
    with_spool = spool_daemon(fake_settings(tmp_path), clock=clock, api=FakeAep(clock))
    assert [list(s.sources) for s in with_spool.services] == [["spool"]]
