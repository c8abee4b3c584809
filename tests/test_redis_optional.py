"""The redis client is an extra (`pip install 'aep-exporter[redis]'`): without it everything
but the Redis intake works, and configuring the intake says what to install.

Child processes run the real command line with the client made unimportable
(`sys.modules['redis'] = None`, what Python does for a package that is not installed)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aep_emulator.app import serve
from aep_emulator.settings import Span
from aep_emulator.state import EmulatorState
from exporter.clock import SystemClock
from exporter.daemon.config import REDIS_EXTRA
from exporter.daemon.core import EXIT_CONFIG, EXIT_OK
from tests.conftest import emulator_knobs
from tests.daemon_support import Running, drop_job, results, until_results
from tests.daemon_support import write_config as daemon_config
from tests.test_oneshot import write_config as oneshot_config

pytestmark = pytest.mark.slow
DEADLINE = 30.0
LAKE = {"destination": "lake", "path": "ml/one"}
WITHOUT_REDIS = (
    "import sys; sys.modules['redis'] = None; "
    "from exporter.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(name="live")
async def live_fixture(tmp_path: Path) -> AsyncIterator[tuple[str, EmulatorState]]:
    """An emulator on the real clock whose waits are all zero, for child processes."""
    knobs = emulator_knobs(
        not_ready_window_s=0,
        run_duration_s=Span(min=0, max=0),
        seed=1,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as running:
        yield running


async def without_redis(*args: str) -> tuple[int, str, str]:
    """`aep-exporter <args>` in a child process that cannot import redis."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITHOUT_REDIS,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_command_line_settings_and_assembly_import_no_redis() -> None:
    code = (
        "import sys, exporter.cli, exporter.settings, exporter.daemon.assemble; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(DEADLINE):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert json.loads(out.decode().replace("'", '"')) == []


async def test_without_redis_a_config_without_redis_validates_and_one_shot_exports(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    dataset = state.lake.create_dataset("prod", "features", 7, rng=random.Random(1), now_ms=0)
    config = oneshot_config(tmp_path, url)
    code, out, err = await without_redis("validate", "--config", str(config))
    assert code == EXIT_OK, err
    code, out, err = await without_redis(
        "export",
        "--config",
        str(config),
        *("--dataset", dataset.id, "--destination", "lake", "--path", "ml/f", "--json"),
    )
    assert code == EXIT_OK, err
    assert json.loads(out)["records"] == 7


async def test_without_redis_the_daemon_runs_jobs_from_its_spool(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    dataset = state.lake.create_dataset("prod", "features", 3, rng=random.Random(2), now_ms=0)
    config = daemon_config(tmp_path, url)
    spool = tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITHOUT_REDIS,
        *("run", "--config", str(config)),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    daemon = Running(proc, tmp_path / "daemon.log")
    daemon._reader = asyncio.create_task(daemon._read())
    try:
        name = drop_job(spool, "one.json", {"id": "one", "dataset_id": dataset.id, **LAKE})
        await until_results(spool, [name], deadline_s=DEADLINE)
        assert results(spool)[name]["state"] == "succeeded"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            code = await proc.wait()
            await daemon._reader
    assert code == EXIT_OK, (tmp_path / "daemon.log").read_text()


@pytest.mark.parametrize("command", ["validate", "run"])
async def test_without_redis_a_redis_section_is_a_config_error_saying_what_to_install(
    tmp_path: Path, command: str
) -> None:
    config = daemon_config(tmp_path, "http://127.0.0.1:9", redis={"consumer": "c1"})
    code, _, err = await without_redis(command, "--config", str(config))
    assert code == EXIT_CONFIG
    assert REDIS_EXTRA in err
    assert "Traceback" not in err
