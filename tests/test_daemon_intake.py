"""Intake through a real in-process daemon and the emulator: the bad-input corpus lands in
rejected/ with its reasons while good jobs export, files wait in incoming/ while the daemon is
full, and half-written files are left alone until renamed."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exporter.daemon.config import DaemonConfig, LogConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.daemon.journal import FILE_NAME, summary
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.jobs import Outcome, Parsed
from exporter.settings import Settings
from exporter.sources.spool import RESULT_SUFFIX, Spool
from tests.aepclient_support import config_for
from tests.bad_jobs import (
    BY_NAME,
    CASES,
    DESTINATIONS,
    DUPLICATE_ID,
    MAX_JOB_FILE_BYTES,
    ORIGINAL_NAME,
    Case,
)
from tests.conftest import Emulator
from tests.daemon_support import spool_daemon, spool_of

ROOT = os.geteuid() == 0
DEADLINE = 20.0  # real seconds: a bound on a wait for an event, never a sleep
ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=30,
    status_unreadable_s=120,
)


def settings_for(emulator: Emulator, tmp_path: Path, **daemon: Any) -> Settings:
    config = DaemonConfig(
        state_dir=tmp_path / "state",
        spool_dir=tmp_path / "spool",
        max_job_file_bytes=MAX_JOB_FILE_BYTES,
        watch=True,
        rescan_s=5,
        shutdown_grace_s=1,
        **daemon,
    )
    return Settings.model_construct(
        aep=config_for(emulator, rate_limit_rps=200, max_concurrency=32),
        engine=ENGINE,
        destinations={name: DlzDestination(type="dlz") for name in DESTINATIONS},
        daemon=config,
        log=LogConfig(),
    )


def good_job(dataset: str, n: int, **changes: Any) -> bytes:
    spec = {"dataset_id": dataset, "destination": DESTINATIONS[n % 2], "path": f"ml/good-{n}"}
    return json.dumps({**spec, **changes}).encode()


@dataclass
class Running:
    daemon: Daemon
    task: asyncio.Task[int]
    staging: Path
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spool(self) -> Spool:
        return spool_of(self.daemon)

    def drop(self, name: str, make: bytes | Case) -> None:
        """Write in a folder beside incoming/, then rename in: what a careful writer does."""
        staged = self.staging / name
        if isinstance(make, bytes):
            staged.write_bytes(make)
        else:
            make.create(staged)
        staged.rename(self.spool.dirs["incoming"] / name)

    async def filed(self, count: int) -> None:
        """Wait until `count` job files have left processing/ with their result."""
        daemon = self.daemon

        async def enough() -> None:
            async with daemon.filed:
                await daemon.filed.wait_for(lambda: daemon.counts.filed >= count)

        waiter = asyncio.ensure_future(enough())
        done, _ = await asyncio.wait(
            {waiter, self.task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self.task in done:
            pytest.fail(f"the daemon stopped: exit {self.task.result()}")
        assert waiter in done, f"{daemon.counts.filed} of {count} files filed in {DEADLINE}s"

    def names(self, folder: str) -> list[str]:
        return sorted(p.name for p in self.spool.dirs[folder].iterdir())

    def result(self, folder: str, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(
            (self.spool.dirs[folder] / f"{name}{RESULT_SUFFIX}").read_text()
        )
        return loaded


@asynccontextmanager
async def running(emulator: Emulator, tmp_path: Path, **daemon: Any) -> AsyncIterator[Running]:
    made = spool_daemon(settings_for(emulator, tmp_path, **daemon), clock=emulator.clock)
    task = asyncio.create_task(made.run(), name="daemon")
    ready = asyncio.ensure_future(made.ready.wait())
    await asyncio.wait({ready, task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    assert ready.done(), "the daemon did not become ready"
    staging = tmp_path / "spool" / "staging"
    staging.mkdir()
    try:
        yield Running(made, task, staging)
    finally:
        made.stop()
        code = await asyncio.wait_for(task, DEADLINE)
    assert code == EXIT_OK


def record(run: Running, monkeypatch: pytest.MonkeyPatch, *methods: str) -> None:
    """Note, at each call of the spool's `methods`, the jobs in flight and the folders."""
    spool = run.spool

    def wrap(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def recorder(path: Path, *args: Any, **kwargs: Any) -> Any:
            run.seen.append(
                {
                    "call": method,
                    "path": path,
                    "in_flight": len(run.daemon.jobs),
                    "incoming": sum(1 for _ in spool.dirs["incoming"].iterdir()),
                    "processing": sum(1 for _ in spool.dirs["processing"].iterdir()),
                }
            )
            return original(path, *args, **kwargs)

        return recorder

    for method in methods:
        monkeypatch.setattr(spool, method, wrap(method, getattr(spool, method)))


def calls(run: Running, method: str) -> Iterable[dict[str, Any]]:
    return [c for c in run.seen if c["call"] == method]


async def test_the_corpus_is_rejected_and_the_good_jobs_export(
    emulator: Emulator, tmp_path: Path
) -> None:
    datasets = await emulator.seed(rows=30, count=3)
    bad = [c for c in CASES if not c.needs_non_root]
    good = {f"good-{n:02}.json": good_job(datasets[n % 3], n) for n in range(10)}
    good[ORIGINAL_NAME] = good_job(datasets[0], 99, id=DUPLICATE_ID)
    async with running(emulator, tmp_path) as run:
        # The duplicate's first comer goes in first: a scan that sees the duplicate sees it
        # too, and claims it first (oldest first, then by name).
        run.drop(ORIGINAL_NAME, good.pop(ORIGINAL_NAME))
        for n, case in enumerate(bad):
            run.drop(case.name, case)
            if n % 10 == 0:
                run.drop(*good.popitem())
        while good:
            run.drop(*good.popitem())
        total = 1 + len(bad) + 10
        await run.filed(total)

        assert run.names("incoming") == run.names("processing") == run.names("failed") == []
        rejected = run.names("rejected")  # symlinks and all, followed or not
        for case in bad:
            assert case.name in rejected, case.name
            result = run.result("rejected", case.name)
            assert result["state"] == "rejected", (case.name, result)
            assert result["file"] == case.name
            missing = [w for w in case.expect if w not in result["message"]]
            assert not missing, f"{case.name}: {result['message']!r} lacks {missing}"
        assert (run.spool.dirs["rejected"] / "link-outside.json").is_symlink()
        assert (run.spool.dirs["rejected"] / "folder.json").is_dir()
        assert (run.spool.dirs["rejected"] / "pipe.json").is_fifo()
        assert len(run.names("rejected")) == 2 * len(bad)

        done = run.names("done")
        assert len(done) == 2 * 11
        for name in done:
            if name.endswith(RESULT_SUFFIX):
                continue
            result = run.result("done", name)
            assert result["state"] == "succeeded", (name, result)
            assert result["records"] == 30, result
            assert result["files"] >= 1, result
        assert run.result("done", ORIGINAL_NAME)["job_id"] == DUPLICATE_ID
        assert run.daemon.counts.rejected == len(bad)

        # Still accepting after all that.
        assert not run.task.done()
        run.drop("after.json", good_job(datasets[1], 100))
        await run.filed(total + 1)
        assert run.result("done", "after.json")["state"] == "succeeded"

        counts, recent = summary(run.daemon.settings.daemon.state_dir / FILE_NAME, recent=100)
        assert counts == {"rejected": len(bad), "succeeded": 12}
        rejected_names = {r.name for r in recent if r.state.value == "rejected"}
        assert rejected_names == {c.name for c in bad}


@pytest.mark.skipif(
    ROOT,
    reason="root reads files whatever their mode (CAP_DAC_OVERRIDE); "
    "tests/test_spool.py checks this case as nobody in a child process",
)
async def test_an_unreadable_file_is_rejected(emulator: Emulator, tmp_path: Path) -> None:
    case = BY_NAME["unreadable.json"]
    async with running(emulator, tmp_path) as run:
        run.drop(case.name, case)
        await run.filed(1)
        message = run.result("rejected", case.name)["message"]
        assert all(w in message for w in case.expect), message


async def test_a_file_that_breaks_the_reader_is_rejected_and_intake_goes_on(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    async with running(emulator, tmp_path) as run:
        read = run.spool.read

        def broken(path: Path, destinations: Any) -> Parsed:
            if path.name == "poison.json":
                raise RuntimeError("a bug the corpus has not found yet")
            return read(path, destinations)

        monkeypatch.setattr(run.spool, "read", broken)
        run.drop("poison.json", good_job(dataset, 1))
        await run.filed(1)
        message = run.result("rejected", "poison.json")["message"]
        assert "internal error reading the job file" in message
        assert "a bug the corpus has not found yet" in message
        run.drop("fine.json", good_job(dataset, 2))
        await run.filed(2)
        assert run.result("done", "fine.json")["state"] == "succeeded"


async def test_backpressure_keeps_files_waiting_unread_in_incoming(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = await emulator.seed(rows=10, count=2)
    async with running(emulator, tmp_path, max_in_flight=3) as run:
        record(run, monkeypatch, "claim", "read", "finish")
        for n in range(20):
            run.drop(f"job-{n:02}.json", good_job(datasets[n % 2], n))
        await run.filed(20)

        assert run.names("incoming") == run.names("processing") == []
        assert len(run.names("done")) == 40
        assert len(list(calls(run, "claim"))) == len(list(calls(run, "read"))) == 20
        for call in calls(run, "claim"):  # room for one more, or it would not claim
            assert call["in_flight"] < 3, call
            assert call["processing"] < 3, call
        for call in calls(run, "read"):  # only claimed files are read
            assert call["path"].parent == run.spool.dirs["processing"], call
            assert call["processing"] <= 3, call
        for call in calls(run, "finish"):
            assert call["in_flight"] <= 3, call
            assert call["processing"] <= 3, call
        # The daemon was full while files waited: the limit was what held them back.
        assert any(c["in_flight"] == 3 and c["incoming"] > 0 for c in calls(run, "finish"))


async def test_files_being_written_are_left_alone_until_renamed(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    async with running(emulator, tmp_path) as run:
        record(run, monkeypatch, "claim", "read")
        incoming = run.spool.dirs["incoming"]
        scans = 0
        waiting = run.spool.waiting

        def counting(limit: int) -> list[Path]:
            nonlocal scans
            scans += 1
            return waiting(limit)

        monkeypatch.setattr(run.spool, "waiting", counting)
        (incoming / ".hidden.json").write_bytes(good_job(dataset, 1))
        (incoming / "upload.json.tmp").write_bytes(good_job(dataset, 2))
        before = scans
        run.drop("now.json", good_job(dataset, 3))
        await run.filed(1)  # a whole export later: not-ready wait, run, polls
        assert scans - before >= 3

        assert sorted(p.name for p in incoming.iterdir()) == [".hidden.json", "upload.json.tmp"]
        assert (incoming / ".hidden.json").read_bytes() == good_job(dataset, 1)
        touched = {c["path"].name for c in run.seen}
        assert touched == {"now.json"}

        (incoming / ".hidden.json").rename(incoming / "hidden.json")
        (incoming / "upload.json.tmp").rename(incoming / "upload.json")
        await run.filed(3)
        assert run.names("incoming") == []
        for name in ("hidden.json", "upload.json", "now.json"):
            assert run.result("done", name)["state"] == "succeeded"
        outcome = Outcome.model_validate(
            {
                k: v
                for k, v in run.result("done", "hidden.json").items()
                if k not in ("file", "finished_at")
            }
        )
        assert outcome.records == 5
