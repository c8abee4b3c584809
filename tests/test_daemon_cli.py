"""`aep-exporter validate` and `aep-exporter status` as a user runs them: child processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aep_emulator.app import serve
from aep_emulator.settings import DEFAULT_ORG_ID, Span
from aep_emulator.state import EmulatorState
from exporter.cli import main
from exporter.clock import SystemClock
from exporter.daemon.journal import FILE_NAME, Journal
from exporter.jobs import JobState, Outcome
from tests.bad_jobs import BY_NAME, CASES, DESTINATIONS, MAX_JOB_FILE_BYTES, as_json, as_yaml
from tests.conftest import EMULATOR_SECRET, emulator_knobs
from tests.daemon_support import write_config as emulator_config

pytestmark = pytest.mark.slow
SECRET = "Sup3r-s3cret-VALUE-7f1c"  # never to be printed
ROOT = os.geteuid() == 0


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["COLUMNS"] = "250"  # rich tables: no wrapping of long job ids and messages
    env.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run(  # noqa: S603 - our own command, fixed arguments
        [sys.executable, "-m", "exporter", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    dests = "".join(f'[destinations.{name}]\ntype = "dlz"\n\n' for name in DESTINATIONS)
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
max_job_file_bytes = {MAX_JOB_FILE_BYTES}

{dests}{extra}""")
    return path


def good_files(tmp_path: Path) -> list[Path]:
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    files = {
        "a.json": as_json(id="nightly-a"),
        "b.yaml": as_yaml(destination="archive", format="json"),
        "c.toml": b'dataset_id = "ds_0002"\ndestination = "lake"\npath = "ml/c"\n',
    }
    for name, raw in files.items():
        (jobs / name).write_bytes(raw)
    return [jobs / name for name in files]


def assert_no_secret(done: subprocess.CompletedProcess[str]) -> None:
    assert SECRET not in done.stdout
    assert SECRET not in done.stderr


# -- validate ----------------------------------------------------------------------------------


def test_validate_lists_the_config_and_each_good_job(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    files = good_files(tmp_path)
    done = cli("validate", "--config", config, *files)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"ok  {config}: 2 destination(s): archive, lake"
    assert lines[1] == (
        f"ok  {files[0]}: job nightly-a exports ds_0001 to lake:ml/features as parquet/gzip"
    )
    assert re.fullmatch(
        rf"ok  {re.escape(str(files[1]))}: job job-[0-9a-f]{{24}} exports ds_0001 to "
        r"archive:ml/features as json/gzip",
        lines[2],
    ), lines[2]
    assert lines[3].startswith(f"ok  {files[2]}: job job-")
    assert "exports ds_0002 to lake:ml/c as parquet/gzip" in lines[3]
    assert len(lines) == 4
    assert done.stderr == ""
    assert_no_secret(done)


def test_validate_without_job_files_checks_the_config(tmp_path: Path) -> None:
    done = cli("validate", "--config", write_config(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok  ")
    assert "2 destination(s): archive, lake" in done.stdout


def test_validate_gives_each_bad_job_its_reason_and_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    files = good_files(tmp_path)
    # The corpus as it arrives in a spool (its makers expect <spool>/incoming/<name>).
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    bad = [c for c in CASES if c.caught_by == "spool" and not (c.needs_non_root and ROOT)]
    for case in bad:
        case.create(incoming / case.name)
    done = cli("validate", "--config", config, files[0], *(incoming / c.name for c in bad))
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].startswith(f"ok  {files[0]}: job nightly-a")
    reasons = dict(line.removeprefix("bad ").split(": ", 1) for line in done.stderr.splitlines())
    assert sorted(reasons) == sorted(str(incoming / c.name) for c in bad)
    for case in bad:
        reason = reasons[str(incoming / case.name)]
        assert all(w in reason for w in case.expect), (case.name, reason)
    assert_no_secret(done)


def test_validate_reports_one_bad_job_among_good_ones(tmp_path: Path) -> None:
    files = good_files(tmp_path)
    bad = tmp_path / "jobs" / BY_NAME["path-dotdot.json"].name
    BY_NAME["path-dotdot.json"].create(bad)
    done = cli("validate", "--config", write_config(tmp_path), files[0], bad, files[1])
    assert done.returncode == 1
    assert done.stderr == (f"bad {bad}: path: must not contain empty, '.' or '..' segments\n")
    assert [line[:3] for line in done.stdout.splitlines()] == ["ok ", "ok ", "ok "]


def test_validate_lists_every_config_problem_without_secrets(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        extra='[engine]\npoll_min_s = -1\n\n[destinations.bucket]\ntype = "s3"\n'
        'bucket = "Not_A_Bucket"\n',
    )
    # A typo in the secret's key: the secret is the value of an unknown field.
    text = (
        config.read_text()
        .replace('client_secret_file = "secret"', f'client_secrett = "{SECRET}"')
        .replace(f"max_job_file_bytes = {MAX_JOB_FILE_BYTES}", "max_in_flight = 0")
    )
    config.write_text(text)
    done = cli("validate", "--config", config, *good_files(tmp_path))
    assert done.returncode == 2
    assert done.stdout == ""
    err = done.stderr
    assert f"error: {config}: 5 problem(s)" in err, err
    for where in (
        "aep.client_secrett",
        "aep.client_secret",
        "engine.poll_min_s",
        "destinations.bucket",
        "daemon.max_in_flight",
    ):
        assert re.search(rf"^\s+{re.escape(where)}\b.*: ", err, re.MULTILINE), (where, err)
    assert_no_secret(done)


def test_validate_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    done = cli("validate", "--config", tmp_path / "nope.toml")
    assert done.returncode == 2
    assert f"{tmp_path / 'nope.toml'}: no such config file" in done.stderr


# -- status ------------------------------------------------------------------------------------


async def fill_journal(state_dir: Path) -> None:
    journal = await Journal.open(state_dir)
    try:
        for n in range(3):
            job_id = f"export-{n}"
            await journal.add(job_id, source="spool", name=f"{job_id}.json", spec={})
            await journal.advance(job_id, JobState.FLOW_READY, flow_id=f"flow-{n}")
            await journal.advance(job_id, JobState.TRIGGERING, intent_ms=1)
            await journal.advance(job_id, JobState.RUNNING, run_id=f"run-{n}")
            await journal.finish(
                Outcome(
                    job_id=job_id,
                    state=JobState.SUCCEEDED,
                    run_id=f"run-{n}",
                    files=2,
                    records=1200 + n,
                )
            )
        await journal.add("broken", source="spool", name="broken.json", spec={})
        await journal.finish(
            Outcome(
                job_id="broken",
                state=JobState.FAILED,
                message="dataset ds_9 not found in sandbox prod",
            )
        )
        for name in ("x.txt", "y.json"):
            reject = Outcome(
                job_id=f"rejected:{name}", state=JobState.REJECTED, message=f"{name} is not a job"
            )
            await journal.add(
                reject.job_id,
                source="spool",
                name=name,
                spec={},
                state=JobState.REJECTED,
                outcome=reject,
            )
        await journal.add("slow", source="spool", name="slow.json", spec={})
        await journal.advance("slow", JobState.FLOW_READY, flow_id="flow-s")
        await journal.advance("slow", JobState.TRIGGERING, intent_ms=1)
        await journal.advance("slow", JobState.RUNNING, run_id="run-slow")
    finally:
        await journal.close()


def row(out: str, *cells: str) -> bool:
    """Whether a table line holds `cells` in order."""
    pattern = r"\W+".join(re.escape(c) for c in cells)
    return any(re.search(rf"(^|\W){pattern}(\W|$)", line) for line in out.splitlines())


async def test_status_counts_jobs_by_state_and_lists_recent_outcomes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    await fill_journal(tmp_path / "state")
    done = cli("status", "--config", config)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"jobs in {tmp_path / 'state' / FILE_NAME}" in out
    for state, count in (("succeeded", "3"), ("failed", "1"), ("rejected", "2"), ("running", "1")):
        assert row(out, state, count), (state, out)
    assert "most recent" in out
    assert row(out, "export-2", "succeeded", "1202", "2")
    assert row(out, "broken", "failed", "0", "0", "dataset ds_9 not found in sandbox prod")
    assert row(out, "rejected:x.txt", "rejected", "0", "0", "x.txt is not a job")
    assert row(out, "slow", "running", "run-slow")
    assert len(recent_rows(out)) == 7
    assert_no_secret(done)

    few = cli("status", "--config", config, "--recent", "2")
    assert few.returncode == 0
    latest = recent_rows(few.stdout)
    assert len(latest) == 2, few.stdout
    assert row(latest[0], "slow", "running")  # the newest first


def recent_rows(out: str) -> list[str]:
    return [
        line
        for line in out.split("most recent", 1)[1].splitlines()
        if re.match(r"│ \d{4}-\d\d-\d\d ", line)
    ]


def test_status_without_a_journal_says_so_and_exits_1(tmp_path: Path) -> None:
    done = cli("status", "--config", write_config(tmp_path))
    assert done.returncode == 1
    assert done.stdout == ""
    message = " ".join(done.stderr.split())
    assert message == (
        f"no journal at {tmp_path / 'state' / FILE_NAME}: the daemon has not run with this "
        "configuration"
    )


def test_validate_lists_each_schedule_with_its_next_slot(tmp_path: Path) -> None:
    schedules = """
[[schedules]]
name = "hourly-lake"
interval_s = 3600
job = { dataset_id = "ds_0001", destination = "lake", path = "ml/hourly" }

[[schedules]]
name = "paused"
cron = "0 2 * * *"
enabled = false
job = { dataset_id = "ds_0002", destination = "archive", path = "ml/nightly" }
"""
    done = cli("validate", "--config", write_config(tmp_path, schedules))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    hourly = re.fullmatch(
        r"ok  schedule hourly-lake: (.+), exports ds_0001 to lake; next slot "
        r"(\d{4}-\d\d-\d\dT(\d\d):00:00Z)",
        lines[1],
    )
    assert hourly is not None, lines[1]
    assert lines[2].startswith("ok  schedule paused: ")
    assert lines[2].endswith("exports ds_0002 to archive; disabled")


# -- lanes -------------------------------------------------------------------------------------


@pytest.fixture
async def aep(tmp_path: Path) -> AsyncIterator[tuple[str, EmulatorState]]:
    """An emulator on the real clock whose waits are all zero, for child processes."""
    knobs = emulator_knobs(
        not_ready_window_s=0,
        run_duration_s=Span(min=0, max=0),
        seed=1,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as running:
        yield running


async def acli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`cli`, without blocking the event loop the emulator serves on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["COLUMNS"] = "250"
    env.pop("CREDENTIALS_DIRECTORY", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(
        list(map(str, args)), proc.returncode, out.decode(), err.decode()
    )


def lanes_config(tmp_path: Path, url: str, **engine: Any) -> Path:
    return emulator_config(
        tmp_path, url, engine={"not_ready_wait_s": 0, "poll_min_s": 0.05, **engine}
    )


async def export_to(config: Path, dataset: str, path: str) -> str:
    done = await acli(
        "export", "--config", config, "--dataset", dataset, "--destination", "lake",
        "--path", path, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["state"] == "succeeded", outcome
    flow_id: str = outcome["flow_id"]
    return flow_id


def flows_in(state: EmulatorState) -> set[str]:
    return set(state.sandbox(DEFAULT_ORG_ID, "prod").flows)


async def test_lanes_list_shows_one_lane_for_two_exports_to_one_place(
    tmp_path: Path, aep: tuple[str, EmulatorState]
) -> None:
    url, state = aep
    config = lanes_config(tmp_path, url)
    datasets = [
        state.lake.create_dataset("prod", f"features{n}", 5, rng=random.Random(n), now_ms=0).id
        for n in range(2)
    ]
    (flow_id,) = {await export_to(config, d, "ml/lane") for d in datasets}

    listed = await acli("lanes", "list", "--config", config, "--json")
    assert listed.returncode == 0, listed.stderr
    (lane,) = json.loads(listed.stdout)
    assert lane["flow_id"] == flow_id
    assert lane["datasets"] == 2
    assert (lane["destination"], lane["path"], lane["mode"]) == ("lake", "ml/lane", "once")
    assert lane["jobs_here"] == 0
    assert set(lane) == {
        "lane", "flow_id", "name", "destination", "path", "format", "compression", "mode",
        "datasets", "state", "schedule", "end_time", "last_run", "jobs_here",
    }  # fmt: skip

    table = await acli("lanes", "list", "--config", config)
    assert table.returncode == 0, table.stderr
    assert "export lanes in sandbox prod" in table.stdout
    assert row(table.stdout, lane["lane"], flow_id, "lake", "ml/lane", "PARQUET/GZIP", "once", "2")
    end = datetime.fromtimestamp(lane["end_time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert end in table.stdout
    assert EMULATOR_SECRET not in table.stdout + table.stderr


async def test_lanes_prune_dry_run_lists_and_prune_retires_an_idle_lane(
    tmp_path: Path, aep: tuple[str, EmulatorState]
) -> None:
    url, state = aep
    dataset = state.lake.create_dataset("prod", "features", 5, rng=random.Random(1), now_ms=0)
    kept = lanes_config(tmp_path, url)  # lane_idle_s: an hour, and a run just now
    flow_id = await export_to(kept, dataset.id, "ml/once")
    none = await acli("lanes", "prune", "--config", kept)
    assert none.returncode == 0, none.stderr
    assert "no idle one-off lane to retire in sandbox prod" in none.stdout
    assert flow_id in flows_in(state)

    idle = lanes_config(tmp_path, url, lane_idle_s=0)
    dry = await acli("lanes", "prune", "--config", idle, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    answer = json.loads(dry.stdout)
    assert answer["dry_run"] is True
    assert [lane["flow_id"] for lane in answer["retired"]] == [flow_id]
    assert flow_id in flows_in(state)  # only listed
    shown = await acli("lanes", "prune", "--config", idle, "--dry-run")
    assert "would retire 1 lane flow(s) in sandbox prod" in shown.stdout
    assert "dry run: nothing was changed" in shown.stdout
    assert flow_id in flows_in(state)

    pruned = await acli("lanes", "prune", "--config", idle)
    assert pruned.returncode == 0, pruned.stderr
    assert "retired 1 lane flow(s) in sandbox prod" in pruned.stdout
    assert flow_id in pruned.stdout
    assert flow_id not in flows_in(state)
    listed = await acli("lanes", "list", "--config", idle, "--json")
    assert json.loads(listed.stdout) == []
    empty = await acli("lanes", "list", "--config", idle)
    assert empty.stdout.strip() == "no export lanes in sandbox prod"


async def test_lanes_exit_codes(tmp_path: Path, aep: tuple[str, EmulatorState]) -> None:
    url, _ = aep
    missing = await acli("lanes", "list", "--config", tmp_path / "nope.toml")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ")
    config = lanes_config(tmp_path, url)
    (tmp_path / "client_secret").write_text("not-the-secret")
    for args in (("list",), ("prune", "--dry-run")):
        refused = await acli("lanes", *args, "--config", config)
        assert refused.returncode == 1, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("error: AEP: "), line
        assert refused.stdout == ""


LONG_ID = "nightly-churn-features-to-the-ml-bucket-2026-11-30T02:00:00Z"


async def test_status_needs_no_aep_credentials_filters_and_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the journal's folder is configured: no [aep] section, no secret anywhere. (In
    process: the command reads files only.)"""
    for name in [k for k in os.environ if k.startswith("EXPORTER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "80")
    config = tmp_path / "local.toml"
    config.write_text('[daemon]\nstate_dir = "state"\n')
    await fill_journal(tmp_path / "state")
    journal = await Journal.open(tmp_path / "state")
    try:
        await journal.add(LONG_ID, source="http", name="req-1", spec={})
    finally:
        await journal.close()

    def status(*args: str) -> str:
        assert main(["status", "--config", str(config), *args]) == 0
        return capsys.readouterr().out

    document = json.loads(status("--json"))
    assert document["counts"] == {
        "failed": 1,
        "received": 1,
        "rejected": 2,
        "running": 1,
        "succeeded": 3,
    }
    assert document["jobs"][0]["job_id"] == LONG_ID
    assert document["jobs"][0]["source"] == "http"
    export_2 = next(j for j in document["jobs"] if j["job_id"] == "export-2")
    assert (export_2["run_id"], export_2["outcome"]["records"]) == ("run-2", 1202)

    narrowed = json.loads(status("--json", "--state", "failed", "--state", "running"))
    assert narrowed["counts"] == {"failed": 1, "running": 1}
    assert {j["job_id"] for j in narrowed["jobs"]} == {"broken", "slow"}
    http = json.loads(status("--json", "--source", "http"))
    assert [j["job_id"] for j in http["jobs"]] == [LONG_ID]

    table = status("--source", "http")
    assert LONG_ID in table  # whole, on one line, on an 80-column terminal
    assert "export-2" not in table
    assert "(source http)" in table


def test_status_with_no_configuration_file_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("EXPORTER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EXPORTER_DAEMON__STATE_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setattr("exporter.settings.SYSTEM_CONFIG", tmp_path / "absent.toml")
    assert main(["status"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"no journal at {tmp_path / 'nothing-here' / FILE_NAME}" in err
    assert "no configuration file found: --config was not given" in err
