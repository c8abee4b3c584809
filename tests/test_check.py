"""`aep-exporter check` and `aep-exporter datasets list` against a running emulator.

The command runs as a user runs it (`main([...])`, its own event loop, in a thread) over HTTP
to an emulator on the real clock; its waits are all zero, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aep_emulator.app import serve
from aep_emulator.settings import (
    DEFAULT_CLIENT_ID,
    Knobs,
    Permission,
    Span,
)
from aep_emulator.state import EmulatorState, ScriptedFault
from exporter.aep.spec_check import (
    auth_problems,
    encryption_problems,
    problems,
    target_problems,
)
from exporter.cli import main
from exporter.clock import SystemClock
from exporter.daemon.journal import Journal
from exporter.jobs import JobState
from tests.conftest import EMULATOR_SECRET, emulator_knobs
from tests.pgp_support import Keypair

DEADLINE = 20.0
GCS_SECRET = "A" * 40  # the shape of a Google HMAC secret (40 base64 characters)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[str, EmulatorState]]:
    knobs = emulator_knobs(
        not_ready_window_s=0,
        run_duration_s=Span(min=0, max=0),
        seed=1,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as running:
        yield running


def dataset(state: EmulatorState, name: str, sandbox: str = "prod", rows: int = 3) -> str:
    rng = random.Random(f"{sandbox}/{name}")  # distinct ids across sandboxes too
    made = state.lake.create_dataset(sandbox, name, rows, rng=rng, now_ms=0)
    return made.id


def write_config(
    tmp_path: Path,
    url: str,
    *,
    secret: str = EMULATOR_SECRET,
    sandbox: str = "prod",
    gcs_secret: str = GCS_SECRET,
    extra: str = "",
) -> Path:
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "gcs-secret").write_text(gcs_secret + "\n")
    path = tmp_path / "exporter.toml"
    path.write_text(f"""
[aep]
platform_url = "{url}"
ims_url = "{url}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret_file = "secret"
org_id = "{Knobs().org_id}"
sandbox = "{sandbox}"

[daemon]
state_dir = "{tmp_path / "state"}"
spool_dir = "{tmp_path / "spool"}"

[destinations.lake]
type = "dlz"

[destinations.bucket]
type = "s3"
bucket = "ml-features"
role_arn = "arn:aws:iam::123456789012:role/aep-exporter"

[destinations.gcs]
type = "gcs"
bucket = "ml-exports"
access_key_id = "GOOG1EXAMPLEKEYID"
secret_access_key_file = "{tmp_path / "gcs-secret"}"
{extra}""")
    return path


def spool_job(tmp_path: Path, name: str, dataset_id: str, destination: str = "lake") -> Path:
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / name
    path.write_text(
        json.dumps({"dataset_id": dataset_id, "destination": destination, "path": "ml/features"})
    )
    return path


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """The command's exit code, its stdout lines and its stderr."""
    capsys.readouterr()
    async with asyncio.timeout(DEADLINE):
        code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def problem_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem")]


async def test_a_healthy_configuration_passes(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = live
    features = dataset(state, "features")
    churn = dataset(state, "churn")
    spool_job(tmp_path, "one.json", features)
    config = write_config(
        tmp_path,
        url,
        extra=f"""
[[schedules]]
name = "nightly"
cron = "0 3 * * *"
job = {{ dataset_id = "{churn}", destination = "bucket", path = "nightly" }}
""",
    )
    code, lines, err = await run(capsys, "check", "--config", str(config))
    assert code == 0, (lines, err)
    assert problem_lines(lines) == []
    subjects = [line.split(":", 1)[0].split(None, 1)[1] for line in lines[:-1]]
    assert subjects == [
        "credential",
        "sandbox",
        "flow budget",
        "destination bucket",
        "destination gcs",
        "destination lake",
        "datasets",
        "permissions",
    ]
    assert "0 of engine.max_flows = 100 destination flows in use, 100 left" in lines[2]
    assert "the 2 pending job(s) name exportable datasets" in lines[6]
    assert lines[-1] == "healthy: ready to export"
    assert GCS_SECRET not in "\n".join(lines) + err


async def test_a_wrong_secret_is_one_line_naming_the_credential(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    config = write_config(tmp_path, url, secret="not-the-secret")
    code, lines, err = await run(capsys, "check", "--config", str(config))
    assert code == 1
    [line] = problem_lines(lines)
    assert line.startswith(f"problem  credential: IMS refused client {DEFAULT_CLIENT_ID}")
    assert "invalid_client" in line
    assert "OAuth Server-to-Server credential" in line
    assert lines[-1] == "1 problem(s)"
    assert "not-the-secret" not in "\n".join(lines) + err


async def test_an_unknown_sandbox_is_one_line_naming_it(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    config = write_config(tmp_path, url, sandbox="no-such-sandbox")
    code, lines, _ = await run(capsys, "check", "--config", str(config))
    assert code == 1
    [line] = problem_lines(lines)
    assert line.startswith("problem  sandbox: sandbox 'no-such-sandbox' is unknown to org")
    assert "set aep.sandbox" in line
    assert lines[0].startswith("ok       credential:")


async def test_a_dataset_that_is_not_exportable_and_a_refused_destination_get_a_line_each(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = live
    good = dataset(state, "features")
    elsewhere = dataset(state, "dev-only", sandbox="dev")  # exportable, but not from prod
    spool_job(tmp_path, "good.json", good)
    stray = spool_job(tmp_path, "stray.json", elsewhere)
    # Passes the local checks (any non-empty secret), but not AEP's spec for GCS HMAC keys.
    config = write_config(tmp_path, url, gcs_secret="a-json-key-file-pasted-by-mistake")
    code, lines, err = await run(capsys, "check", "--config", str(config))
    assert code == 1, (lines, err)
    found = problem_lines(lines)
    assert found == [
        "problem  destination gcs: AEP's Google Cloud Storage spec (version 1.0) refuses "
        "auth.params.secretAccessKey: does not match the pattern ^[A-Za-z0-9/+]{40}$",
        f"problem  job file {stray}: dataset {elsewhere} is not among the 1 datasets AEP lets "
        "sandbox prod export: check the id with `aep-exporter datasets list`",
    ]
    assert "ok       destination lake:" in "\n".join(lines)
    assert lines[-1] == "2 problem(s)"
    assert "a-json-key-file-pasted-by-mistake" not in "\n".join(lines) + err


async def test_a_job_file_the_daemon_would_reject_is_named(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = live
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {"dataset_id": dataset(state, "f"), "destination": "lake", "path": "ml features"}
        )
    )
    config = write_config(tmp_path, url)
    code, lines, _ = await run(capsys, "check", "--config", str(config), str(job))
    assert code == 1
    [line] = problem_lines(lines)
    assert line == (
        f"problem  job file {job}: path: must be a relative folder of letters, digits and "
        "/ ! - _ . * ' ( ) (the daemon would reject it)"
    )


@pytest.mark.parametrize(
    ("denied", "permission"),
    [("view-datasets", "View Datasets"), ("view-destinations", "View Destinations")],
)
async def test_a_missing_permission_is_one_line_naming_it(
    tmp_path: Path,
    live: tuple[str, EmulatorState],
    capsys: pytest.CaptureFixture[str],
    denied: Permission,
    permission: str,
) -> None:
    url, state = live
    state.knobs.denied_permissions = [denied]  # the credential's roles lack it
    config = write_config(tmp_path, url)
    code, lines, _ = await run(capsys, "check", "--config", str(config))
    assert code == 1
    [line] = problem_lines(lines)
    assert line.startswith(f"problem  permissions: AEP refused a read that needs {permission}")
    assert "FLOW-2120-403" in line
    assert "sandbox 'prod'" in line
    assert "ok       permissions" not in "\n".join(lines)


async def test_unfinished_journal_jobs_are_checked_and_finished_ones_are_not(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    gone = "0123456789abcdef01234567"  # deleted since the job was taken: not exportable now
    journal = await Journal.open(tmp_path / "state")
    try:
        for job_id, job_state in (("waiting", JobState.RECEIVED), ("done", JobState.SUCCEEDED)):
            spec = {"id": job_id, "dataset_id": gone, "destination": "lake", "path": "ml"}
            await journal.add(job_id, source="http", name=job_id, spec=spec, state=job_state)
    finally:
        await journal.close()
    config = write_config(tmp_path, url)
    code, lines, _ = await run(capsys, "check", "--config", str(config))
    assert code == 1
    assert problem_lines(lines) == [
        f"problem  journal job waiting: dataset {gone} is not among the 0 datasets AEP lets "
        "sandbox prod export: check the id with `aep-exporter datasets list`"
    ]


async def test_an_unreachable_ims_is_one_line_naming_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:  # a port nothing listens on: bound, never listening
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        config = write_config(tmp_path, url, extra="")
        text = config.read_text().replace("[daemon]", "base_delay_s = 0.01\n\n[daemon]", 1)
        config.write_text(text)
        code, lines, err = await run(capsys, "check", "--config", str(config))
    assert code == 1, err
    [line] = problem_lines(lines)
    assert line.startswith(f"problem  credential: IMS at {url} cannot be reached")
    assert "check aep.ims_url and the network" in line
    assert lines[-2].startswith("skipped  AEP:")


async def test_a_silent_aep_is_cut_off_at_the_timeout(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = live
    # The flow count is held far longer than the check may take (the command's own deadline
    # is what ends it; the test does not wait for the held answer).
    state.faults.append(ScriptedFault(action="delay", op="flows.list", delay_ms=60_000))
    config = write_config(tmp_path, url)
    code, lines, _ = await run(capsys, "check", "--config", str(config), "--timeout", "0.3")
    assert code == 1
    assert problem_lines(lines) == ["problem  AEP: the checks did not finish within 0.3 s"]
    assert lines[0].startswith("ok       credential:"), "what was found before is kept"


async def test_bad_configuration_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "check", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert "no such config file" in err


async def test_datasets_list_prints_ids_and_names_and_searches(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = live
    # More than a page (100); empty datasets are listed all the same, and cost no file.
    made = {dataset(state, f"features-{i:03}", rows=0): f"features-{i:03}" for i in range(105)}
    churn = dataset(state, "Churn scores")
    dataset(state, "dev only", sandbox="dev")
    config = write_config(tmp_path, url)
    code, lines, err = await run(capsys, "datasets", "list", "--config", str(config), "--json")
    assert code == 0, err
    listed = json.loads("\n".join(lines))
    assert {d["id"]: d["name"] for d in listed} == {**made, churn: "Churn scores"}  # 2 pages
    code, lines, err = await run(
        capsys, "datasets", "list", "--config", str(config), "--search", "CHURN"
    )
    assert code == 0
    assert lines == [f"{churn}  Churn scores"]
    assert "1 of 106 exportable dataset(s) in sandbox prod" in err


async def test_datasets_list_with_a_wrong_secret_exits_1(
    tmp_path: Path, live: tuple[str, EmulatorState], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    config = write_config(tmp_path, url, secret="wrong")
    code, lines, err = await run(capsys, "datasets", "list", "--config", str(config))
    assert code == 1
    assert lines == []
    assert "invalid_client" in err


def test_spec_problems_read_the_keywords_connection_specs_use() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"},
            "kind": {"type": "string", "enum": ["A", "B"]},
            "n": {"type": "integer", "minimum": 1, "maximum": 3},
            "list": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        },
        "required": ["name", "kind"],
        "additionalProperties": False,
    }
    assert problems(schema, {"name": "ab", "kind": "A", "n": 2, "list": ["x"]}, "p") == []
    assert problems(schema, {"name": "ABCDE", "n": True, "list": [1], "other": 1}, "p") == [
        "p.kind: is required",
        "p.name: must be at most 4 characters long",
        "p.name: does not match the pattern ^[a-z]+$",
        "p.n: must be of type integer",
        "p.list[0]: must be of type string",
        "p.other: is not a parameter of this spec",
    ]
    assert problems(schema, {"name": "a", "kind": "C", "n": 9, "list": []}, "p") == [
        "p.name: must be at least 2 character(s) long",
        "p.kind: must be one of A, B",
        "p.n: must be at most 3",
        "p.list: must have at least 1 item(s)",
    ]


def test_auth_problems_pick_the_spec_by_name_and_never_quote_values() -> None:
    spec = {
        "authSpec": [
            {
                "name": "Access Key",
                "spec": {
                    "type": "object",
                    "properties": {"key": {"type": "string", "pattern": "^[A-Z]{4}$"}},
                    "required": ["key"],
                },
            }
        ],
        "targetSpec": {"spec": {"type": "object", "required": ["path"]}},
    }
    assert auth_problems(spec, {"specName": "access key", "params": {"key": "ABCD"}}) == []
    refused = auth_problems(spec, {"specName": "Access Key", "params": {"key": "s3cr3t"}})
    assert refused == ["auth.params.key: does not match the pattern ^[A-Z]{4}$"]
    assert auth_problems(spec, {"specName": "Role", "params": {}}) == [
        "auth.specName: 'Role' is not one of the spec's ('Access Key')"
    ]
    assert auth_problems(spec, None) == ["auth: this spec needs credentials ('Access Key')"]
    assert auth_problems({"authSpec": []}, {"specName": "x"}) == [
        "auth: this spec takes no credentials"
    ]
    assert target_problems(spec, {}) == ["params.path: is required"]


def test_encryption_problems_read_the_encryption_spec() -> None:
    """A destination's PGP key against the spec's encryptionSpecs (issue 12)."""
    spec = {
        "encryptionSpecs": [
            {
                "name": "File PGP/GPG Encryption",
                "spec": {
                    "type": "object",
                    "properties": {
                        "publicKey": {"type": "string"},
                        "encryptionAlgo": {"type": "string", "enum": ["PGPGPG", "NONE"]},
                    },
                    "required": ["encryptionAlgo", "publicKey"],
                },
            }
        ]
    }
    good = {
        "specName": "File PGP/GPG Encryption",
        "params": {"encryptionAlgo": "PGPGPG", "publicKey": "eA=="},
    }
    assert encryption_problems(spec, good) == []
    assert encryption_problems(spec, None) == []
    bad = {"specName": "x", "params": {"encryptionAlgo": "AES", "publicKey": "eA=="}}
    assert encryption_problems(spec, bad) == [
        "encryption.params.encryptionAlgo: must be one of PGPGPG, NONE"
    ]
    assert encryption_problems({"encryptionSpecs": []}, good) == [
        "encryption: this spec takes no file encryption"
    ]


async def test_an_encrypting_destination_fits_the_emulators_spec(
    tmp_path: Path,
    live: tuple[str, EmulatorState],
    capsys: pytest.CaptureFixture[str],
    keypair: Keypair,
) -> None:
    url, _ = live
    (tmp_path / "partner.asc").write_bytes(keypair.armored)
    config = write_config(
        tmp_path,
        url,
        extra=f"""
[destinations.partner]
type = "sftp"
host = "sftp.example.com"
port = 2222
username = "aep"
password_file = "{tmp_path / "secret"}"
pgp_public_key_file = "{tmp_path / "partner.asc"}"
""",
    )
    code, lines, err = await run(capsys, "check", "--config", str(config))
    assert code == 0, (lines, err)
    (partner,) = [line for line in lines if "destination partner" in line]
    assert "fit AEP's SFTP spec" in partner, partner
