"""`aep-exporter emulator` as users script it: a child process, its output, its signals."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from aep_emulator.settings import DEFAULT_CLIENT_ID, SECRET_FILE

pytestmark = pytest.mark.slow
STARTUP = 20.0


async def exporter(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@asynccontextmanager
async def running(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await exporter("emulator", "--port", "0", *args)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(STARTUP):
            line = (await proc.stdout.readline()).decode()
            while "listening on" not in line:
                assert line, "the emulator exited before listening"
                line = (await proc.stdout.readline()).decode()
        yield proc, line.split("listening on ", 1)[1].split()[0]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_seed_prints_the_created_datasets_as_json(tmp_path: Path) -> None:
    proc = await exporter(
        "emulator",
        "seed",
        "--data-dir",
        str(tmp_path),
        "--count",
        "2",
        "--rows",
        "25",
        "--seed",
        "3",
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    made = json.loads(out)
    assert [d["rows"] for d in made] == [25, 25]
    assert len({d["id"] for d in made}) == 2
    for ds in made:
        assert (tmp_path / "datalake" / "prod" / ds["id"] / "dataset.json").is_file()


async def test_serves_seeded_datasets_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    seed = await exporter(
        "emulator", "seed", "--data-dir", str(tmp_path), "--count", "1", "--rows", "5"
    )
    out, _ = await seed.communicate()
    (dataset,) = json.loads(out)
    async with running(
        "--data-dir",
        str(tmp_path),
        "--not-ready-window",
        "0",
        "--client-id",
        "my-client",
        "--max-destination-flows",
        "7",
        "--adhoc-max-datasets-per-call",
        "3",
    ) as (proc, url):
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/_emulator/config") as resp:
                config = await resp.json()
            assert config["client_id"] == "my-client"
            assert config["not_ready_window_s"] == 0
            assert config["max_destination_flows"] == 7
            assert config["adhoc_max_datasets_per_call"] == 3
            assert "client_secret" not in config
            async with session.post(
                f"{url}/ims/token/v3",
                data={
                    "grant_type": "client_credentials",
                    "client_id": "my-client",
                    "client_secret": (tmp_path / SECRET_FILE).read_text().strip(),
                    "scope": "openid",
                },
            ) as resp:
                token = (await resp.json())["access_token"]
            headers = {
                "Authorization": f"Bearer {token}",
                "x-api-key": "my-client",
                "x-gw-ims-org-id": config["org_id"],
            }
            async with session.get(
                f"{url}/data/foundation/flowservice/connectionSpecs/"
                "23598e46-f560-407b-88d5-ea6207e49db0/configs",
                params={"outputType": "activationDatasets"},
                headers=headers,
            ) as resp:
                listed = await resp.json()
            assert [d["id"] for d in listed["items"]] == [dataset["id"]]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0


async def token_status(url: str, secret: str) -> int:
    form = {
        "grant_type": "client_credentials",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": secret,
        "scope": "openid",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/ims/token/v3", data=form) as resp,
    ):
        return resp.status


async def test_client_secret_comes_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    async with running("--data-dir", str(tmp_path), "--client-secret-file", str(secret)) as (
        _,
        url,
    ):
        assert await token_status(url, "from-a-file") == 200
        assert await token_status(url, "emulator-secret") == 401  # the old published default
    assert not (tmp_path / SECRET_FILE).exists()  # a given secret is not copied anywhere


async def test_without_a_secret_file_one_is_made_at_random_kept_and_reused(
    tmp_path: Path,
) -> None:
    kept = tmp_path / SECRET_FILE
    async with running("--data-dir", str(tmp_path)) as (_, url):
        secret = kept.read_text().strip()
        assert len(secret) >= 32
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert await token_status(url, secret) == 200
        assert await token_status(url, "emulator-secret") == 401
    async with running("--data-dir", str(tmp_path)) as (_, url):  # a restart keeps it
        assert kept.read_text().strip() == secret
        assert await token_status(url, secret) == 200
    other = tmp_path / "other"
    async with running("--data-dir", str(other)) as (_, url):  # another data folder: another
        assert (other / SECRET_FILE).read_text().strip() != secret
        assert await token_status(url, secret) == 401


async def test_an_empty_secret_file_is_refused_not_served(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("\n")
    proc = await exporter("emulator", "--port", "0", "--data-dir", str(tmp_path))
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "is empty: delete it" in err.decode()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--time-scale", "0"], "time_scale"),
        (["--run-failure-rate", "2"], "run_failure_rate"),
        (["--run-duration", "10-2"], "below min"),
        (["--max-destination-flows", "-1"], "max_destination_flows"),
        (["--adhoc-max-datasets-per-call", "0"], "adhoc_max_datasets_per_call"),
        (["--storage-endpoint", "adls_gen2=http://127.0.0.1:1"], "no local server serves"),
    ],
)
async def test_bad_knobs_are_refused_with_a_reason(
    tmp_path: Path, args: list[str], words: str
) -> None:
    proc = await exporter("emulator", "--port", "0", "--data-dir", str(tmp_path), *args)
    async with asyncio.timeout(STARTUP):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert words in err.decode()


async def test_a_taken_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await exporter("emulator", "--port", str(port), "--data-dir", str(tmp_path))
        async with asyncio.timeout(STARTUP):
            _, err = await proc.communicate()
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()


async def test_help_documents_every_knob() -> None:
    proc = await exporter("emulator", "--help")
    out, _ = await proc.communicate()
    text = out.decode()
    for option in (
        "--not-ready-window",
        "--time-scale",
        "--rate-limit",
        "--retry-after",
        "--error-5xx-rate",
        "--drop-rate",
        "--slow-rate",
        "--latency-ms",
        "--token-lifetime",
        "--run-duration",
        "--run-failure-rate",
        "--storage-endpoint",
        "--max-destination-flows",
        "--adhoc-max-datasets-per-call",
        "--data-dir",
        "--host",
        "--port",
        "--client-id",
        "--org-id",
    ):
        assert option in text


def test_the_quick_preset_fills_what_the_command_line_left_at_its_default() -> None:
    from aep_emulator.cli import apply_preset
    from aep_emulator.settings import Span
    from exporter.cli import build_parser

    parser = build_parser(["emulator"])
    args = parser.parse_args(["emulator", "--preset", "quick", "--not-ready-window", "7"])
    apply_preset(args, args.option_defaults)
    assert args.not_ready_window_s == 7  # given: it wins
    assert args.run_duration_s == Span(min=1, max=3)
    assert (args.seed, args.seed_datasets, args.rows) == (1, 1, 1000)
    plain = parser.parse_args(["emulator"])
    apply_preset(plain, plain.option_defaults)
    assert (plain.not_ready_window_s, plain.seed, plain.seed_datasets) == (600, None, 0)


def test_a_second_quick_start_serves_the_dataset_the_first_seeded(tmp_path: Path) -> None:
    from aep_emulator.cli import seed_lake, seeded_before

    assert seeded_before(tmp_path, "prod", 1) == []
    (made,) = seed_lake(tmp_path, sandbox="prod", name="q", count=1, rows=3, seed=1)
    assert seeded_before(tmp_path, "prod", 1) == [made]  # not a second dataset beside it
    assert seeded_before(tmp_path, "prod", 2) == []
    assert seeded_before(tmp_path, "prod", None) == []
