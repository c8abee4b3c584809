"""`aep-exporter export` as a user runs it: a child process against a running emulator."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from rich.console import Console

from aep_emulator.app import serve
from aep_emulator.settings import DEFAULT_CLIENT_ID, Knobs, Span
from aep_emulator.state import EmulatorState
from exporter.aep.config import AepConfig
from exporter.clock import SystemClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.exitcodes import Exit
from exporter.jobs import Job, JobState
from exporter.oneshot import EXIT, _export
from exporter.settings import Settings
from tests.conftest import EMULATOR_SECRET, Emulator, default_knobs, emulator_knobs

pytestmark = pytest.mark.slow
DEADLINE = 30.0


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[str, EmulatorState]]:
    """An emulator on the real clock whose waits are all zero, for child processes."""
    knobs = emulator_knobs(
        not_ready_window_s=0,
        run_duration_s=Span(min=0, max=0),
        seed=1,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as running:
        yield running


def write_config(tmp_path: Path, url: str, *, extra: str = "", aep: str = "") -> Path:
    (tmp_path / "secret").write_text(EMULATOR_SECRET + "\n")
    path = tmp_path / "exporter.toml"
    path.write_text(f"""
[aep]
platform_url = "{url}"
ims_url = "{url}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret_file = "secret"
org_id = "{Knobs().org_id}"
{aep}

[engine]
not_ready_wait_s = 0
poll_min_s = 0.05

[destinations.lake]
type = "dlz"
{extra}""")
    return path


def child_env(config: Path) -> dict[str, str]:
    """The environment of an `export` child: its notes (exporter/oneshot_state.py) go beside
    its configuration, in the test's folder, not under the home directory."""
    return {**os.environ, "XDG_STATE_HOME": str(config.parent / "state")}


async def start_export(config: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        "export",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(config),
    )


async def export(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await start_export(config, *args)
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_exports_a_dataset_and_prints_the_outcome_as_json(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    dataset = state.lake.create_dataset("prod", "features", 42, rng=random.Random(1), now_ms=0)
    config = write_config(tmp_path, url)
    code, out, err = await export(
        config, "--dataset", dataset.id, "--destination", "lake", "--path", "ml/features", "--json"
    )
    assert code == 0, err
    outcome = json.loads(out)
    assert outcome["state"] == "succeeded"
    assert outcome["records"] == 42
    assert outcome["files"] == 1
    assert EMULATOR_SECRET not in out + err


async def test_a_failed_run_exits_1_and_says_why(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    state.knobs = Knobs.model_validate({**state.knobs.model_dump(), "run_failure_rate": 1.0})
    dataset = state.lake.create_dataset("prod", "f", 5, rng=random.Random(2), now_ms=0)
    code, _, err = await export(
        write_config(tmp_path, url),
        "--dataset",
        dataset.id,
        "--destination",
        "lake",
        "--path",
        "ml/x",
    )
    assert code == 1
    assert "failed" in err
    assert "ACTIVATION_BATCH-0000-FAILED" in err


async def test_no_wait_returns_once_triggered(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    state.knobs = Knobs.model_validate(
        {**state.knobs.model_dump(), "run_duration_s": {"min": 1e6, "max": 1e6}}
    )
    dataset = state.lake.create_dataset("prod", "f", 5, rng=random.Random(3), now_ms=0)
    code, out, _ = await export(
        write_config(tmp_path, url),
        "--dataset",
        dataset.id,
        "--destination",
        "lake",
        "--path",
        "ml/x",
        "--no-wait",
        "--json",
    )
    assert code == 0
    outcome = json.loads(out)
    assert outcome["state"] == "running"
    assert outcome["run_id"] in {r.id for r in state.all_runs()}


# Runs the CLI as `python -m exporter` does, then says which scheduler modules it loaded.
LOADED = """
import atexit, sys
atexit.register(
    lambda: print("loaded:" + ",".join(sorted(m for m in sys.modules if "apscheduler" in m)),
                  file=sys.stderr)
)
from exporter.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


async def test_an_export_does_not_load_the_scheduler(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    """The settings models and the one-shot path are import-light: APScheduler (schedule
    behaviour, `exporter.sources.schedules`) is loaded by the daemon only."""
    url, state = live
    dataset = state.lake.create_dataset("prod", "light", 5, rng=random.Random(2), now_ms=0)
    args = ["--dataset", dataset.id, "--destination", "lake", "--path", "ml/light", "--json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOADED,
        "export",
        "--config",
        str(write_config(tmp_path, url)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(tmp_path / "exporter.toml"),
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["state"] == "succeeded"
    assert err.decode().splitlines()[-1] == "loaded:"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "json", "--compression", "none"], "gzip"),
        (["--destination", "nowhere"], "unknown destination 'nowhere'"),
        (["--path", "../up"], "path"),
    ],
)
async def test_bad_jobs_exit_2_with_a_reason(
    tmp_path: Path, live: tuple[str, EmulatorState], args: list[str], words: str
) -> None:
    url, _ = live
    base = {"--dataset": "5c8c3c555033b814b69f947f", "--destination": "lake", "--path": "ml/x"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code, _, err = await export(
        write_config(tmp_path, url), *[x for pair in base.items() for x in pair]
    )
    assert code == 2
    assert words in err


async def test_a_bad_config_lists_every_problem_without_secrets(tmp_path: Path) -> None:
    config = tmp_path / "exporter.toml"
    config.write_text("""
[aep]
client_id = "x"
client_secret = "do-not-print-this-secret"
org_id = "o"
platform_url = "http://example.com"
colour = "blue"

[destinations.s3]
type = "s3"
bucket = "Bad_Bucket"
secret_access_key = "also-a-secret-value"
access_key_id = "ABCDEFGHIJKLMNOPQRST"
""")
    code, _, err = await export(config, "--dataset", "d1", "--destination", "s3", "--path", "x")
    assert code == 2
    for words in ("aep.colour", "aep.platform_url", "destinations.s3", "bucket"):
        assert words in err
    assert "do-not-print-this-secret" not in err
    assert "also-a-secret-value" not in err


async def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    code, _, err = await export(
        tmp_path / "nope.toml", "--dataset", "d", "--destination", "x", "--path", "p"
    )
    assert code == 2
    assert "nope.toml: no such config file" in err


@pytest.mark.parametrize("knobs", [default_knobs(run_duration_s={"min": 1e7, "max": 1e7})])
async def test_a_run_past_the_timeout_exits_3(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed(rows=5)
    settings = Settings.model_construct(
        aep=AepConfig(
            platform_url=emulator.url,
            ims_url=emulator.url,
            client_id=DEFAULT_CLIENT_ID,
            client_secret=SecretStr(EMULATOR_SECRET),
            org_id=emulator.knobs.org_id,
        ),
        engine=EngineConfig(not_ready_wait_s=60, poll_max_s=60),
        destinations={"lake": DlzDestination(type="dlz")},
    )
    job = Job(dataset_id=dataset, destination="lake", path="ml/x", timeout=900)
    outcome = await _export(
        settings, job, Console(file=io.StringIO()), wait=True, clock=emulator.clock
    )
    assert outcome.state == JobState.TIMED_OUT
    assert EXIT[outcome.state] == 3


async def test_a_wrong_secret_exits_4_and_says_so_once(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, _ = live
    config = write_config(tmp_path, url)
    (tmp_path / "secret").write_text("not-the-emulator-secret\n")
    code, _, err = await export(
        config, "--dataset", "5c8c3c555033b814b69f947f", "--destination", "lake", "--path", "x"
    )
    assert code == 4 == Exit.CREDENTIALS_REFUSED.value, err
    said = [line for line in err.splitlines() if "invalid_client" in line or "401" in line]
    assert len(said) == 1, err
    assert "credentials were refused" in err
    assert "not-the-emulator-secret" not in err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("url", "attempts", "words"),
    [
        (f"http://127.0.0.1:{closed_port()}", 1, "cannot connect to IMS"),
        # A name that does not exist is not retried: six attempts allowed, one made.
        ("https://nowhere.invalid", 6, "cannot resolve IMS's host name"),
    ],
)
async def test_an_unreachable_aep_exits_5_with_a_code(
    tmp_path: Path, url: str, attempts: int, words: str
) -> None:
    config = write_config(tmp_path, url, aep=f"max_attempts = {attempts}")
    code, _, err = await export(
        config, "--dataset", "5c8c3c555033b814b69f947f", "--destination", "lake", "--path", "x"
    )
    assert code == 5 == Exit.UNREACHABLE.value, err
    assert words in err
    assert "aep_token_retry" not in err
    assert not [x for x in err.splitlines() if x.strip().startswith(":")], err  # empty code
    assert "AEP or IMS could not be reached" in err


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_on_a_terminal_it_shows_progress_without_rich_source_locations(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    dataset = state.lake.create_dataset("prod", "tty", 5, rng=random.Random(4), now_ms=0)
    main, child = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        "export",
        "--config",
        str(write_config(tmp_path, url)),
        *("--dataset", dataset.id, "--destination", "lake", "--path", "ml/tty"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env={**child_env(tmp_path / "exporter.toml"), "COLUMNS": "200", "TERM": "xterm"},
    )
    os.close(child)
    try:
        async with asyncio.timeout(DEADLINE):
            shown = (await asyncio.to_thread(read_all, main)).decode(errors="replace")
            code = await proc.wait()
    finally:
        os.close(main)
    assert code == 0, shown
    assert "in all)" in shown  # the spinner's clock
    assert "run in progress" in shown
    assert "succeeded" in shown
    assert "oneshot.py" not in shown


async def until_logged(proc: asyncio.subprocess.Process, event: str) -> dict[str, Any]:
    """The first JSON log line of `event` on the child's stderr (it logs JSON off a terminal)."""
    assert proc.stderr is not None
    async with asyncio.timeout(DEADLINE):
        while line := await proc.stderr.readline():
            if line.startswith(b"{") and (entry := json.loads(line))["event"] == event:
                return dict(entry)
    raise AssertionError(f"the child ended without logging {event}")


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    assert proc.stderr is not None
    async with asyncio.timeout(DEADLINE):
        rest = await proc.stderr.read()
        code = await proc.wait()
    return code, rest.decode()


async def test_ctrl_c_leaves_the_run_to_aep_and_the_same_command_follows_it(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    state.knobs = Knobs.model_validate(
        {**state.knobs.model_dump(), "run_duration_s": {"min": 1e6, "max": 1e6}}
    )
    dataset = state.lake.create_dataset("prod", "f", 5, rng=random.Random(5), now_ms=0)
    config = write_config(tmp_path, url)
    args = ("--dataset", dataset.id, "--destination", "lake", "--path", "ml/again")
    proc = await start_export(config, *args)
    triggered = await until_logged(proc, "run_triggered")
    proc.send_signal(signal.SIGINT)
    code, err = await finish(proc)
    assert code == Exit.INTERRUPTED.value == 130, err
    assert f"stopped by SIGINT: run {triggered['run_id']}" in err
    assert len(list(state.all_runs())) == 1

    code, out, err = await export(config, *args, "--no-wait", "--json")
    assert code == 0, err
    assert json.loads(out)["run_id"] == triggered["run_id"]  # followed, not started again
    assert "resuming" in err
    assert len(list(state.all_runs())) == 1


async def test_sigterm_stops_the_wait_cleanly_with_its_own_code(
    tmp_path: Path, live: tuple[str, EmulatorState]
) -> None:
    url, state = live
    dataset = state.lake.create_dataset("prod", "f", 5, rng=random.Random(6), now_ms=0)
    config = write_config(tmp_path, url)
    config.write_text(
        config.read_text().replace(
            "not_ready_wait_s = 0", "not_ready_wait_s = 3600\njoin_coalesce_s = 0"
        )
    )
    proc = await start_export(
        config, "--dataset", dataset.id, "--destination", "lake", "--path", "ml/term"
    )
    await until_logged(proc, "trigger_waiting_for_dataset")  # an hour's wait under way
    proc.send_signal(signal.SIGTERM)
    code, err = await finish(proc)
    assert code == Exit.TERMINATED.value == 143, err
    assert "stopped by SIGTERM: no run was started in AEP (flow " in err
    assert not list(state.all_runs())
