"""`aep-exporter demo`: the seed workflow, step by step, against a local emulator.

It starts `aep-exporter emulator` as a child process (ten emulated minutes take three real
seconds), seeds datasets with `aep-exporter emulator seed`, and walks what a notebook does
today, over real HTTP: token, base, source and target connection, flow, ad hoc run (answered
"not ready" first), polling, success, and the files that landed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq

from exporter.aep import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    IMS_TOKEN_PATH,
    NOT_READY_PHRASE,
    STORAGE_SPECS,
    StorageType,
)
from exporter.emulator.settings import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_ORG_ID

TIME_SCALE = 0.005  # the 600 s not-ready window takes 3 s
STARTUP_DEADLINE = 30.0
RUN_DEADLINE = 60.0


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


async def _child(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def _start_emulator(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await _child(
        "emulator",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--time-scale",
        str(TIME_SCALE),
        "--run-duration",
        "200-600",
        "--seed",
        "7",
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(STARTUP_DEADLINE):
            while line := (await proc.stdout.readline()).decode():
                if "listening on " in line:
                    return proc, line.split("listening on ", 1)[1].split()[0]
    except TimeoutError:
        pass
    proc.kill()
    raise RuntimeError("the emulator did not start listening in time")


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.headers: dict[str, str] = {}

    async def call(
        self, method: str, path: str, body: Any = None, extra: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, json=body, headers={**self.headers, **(extra or {})}
        ) as resp:
            return resp.status, await resp.json()

    async def create(self, what: str, body: dict[str, Any]) -> str:
        status, answer = await self.call("POST", f"{FLOW_SERVICE_PATH}/{what}", body)
        if status != 201:
            raise RuntimeError(f"creating {what} failed: {status} {answer}")
        detail(f"POST {FLOW_SERVICE_PATH}/{what} -> {status}, id {answer['id']}")
        return str(answer["id"])


async def walk(url: str, dataset: dict[str, Any]) -> list[Path]:
    """The seed workflow against `url`; returns the exported files."""
    dlz = STORAGE_SPECS[StorageType.DLZ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = Api(session, url)
        step(1, "Get an access token from IMS (OAuth server-to-server)")
        async with session.post(
            url + IMS_TOKEN_PATH,
            data={
                "grant_type": "client_credentials",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET,
                "scope": "openid,AdobeID",
            },
        ) as resp:
            token = await resp.json()
        detail(f"token_type={token['token_type']}, expires_in={token['expires_in']} s")
        api.headers = {
            "Authorization": f"Bearer {token['access_token']}",
            "x-api-key": DEFAULT_CLIENT_ID,
            "x-gw-ims-org-id": DEFAULT_ORG_ID,
            "x-sandbox-name": "prod",
        }

        step(2, "Create the Data Landing Zone base connection")
        spec = {"id": dlz.connection_spec_id, "version": "1.0"}
        base = await api.create("connections", {"name": "demo DLZ", "connectionSpec": spec})
        step(3, f"Create the data-lake source connection for dataset {dataset['id']}")
        source = await api.create(
            "sourceConnections",
            {
                "name": "demo source",
                "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
                "params": {"datasets": [{"dataSetId": dataset["id"], "name": dataset["name"]}]},
            },
        )
        step(4, "Create the target connection: Parquet, gzip, path ml/features")
        target = await api.create(
            "targetConnections",
            {
                "name": "demo target",
                "baseConnectionId": base,
                "connectionSpec": spec,
                "params": {
                    "mode": "Server-to-server",
                    "path": "ml/features",
                    "datasetFileType": "PARQUET",
                    "compression": "GZIP",
                },
            },
        )
        step(5, "Create the dataflow (one-time full export)")
        flow = await api.create(
            "flows",
            {
                "name": "demo flow",
                "flowSpec": {"id": dlz.dataset_flow_spec_id, "version": "1.0"},
                "sourceConnectionIds": [source],
                "targetConnectionIds": [target],
                "transformations": [],
                "scheduleParams": {
                    "exportMode": "DAILY_FULL_EXPORT",
                    "timeUnit": "day",
                    "interval": 0,
                    "startTime": int(time.time()),
                },
            },
        )
        _, flows = await api.call("GET", f"{FLOW_SERVICE_PATH}/flows/{flow}")
        created_ms = flows["items"][0]["createdAt"]

        body = {
            "activationInfo": {
                "destinations": [{"flowId": flow, "datasets": [{"id": dataset["id"]}]}]
            }
        }
        accept = {"Accept": ADHOC_DATASET_ACCEPT}
        step(6, "Trigger an ad hoc export right away")
        status, answer = await api.call("POST", ADHOC_PATH, body, accept)
        detail(f"-> {status} {answer.get('message', answer)}")
        if NOT_READY_PHRASE not in str(answer):
            raise RuntimeError("expected the 'not ready' answer for a new flow")
        ready_at = created_ms / 1000 + 600 * TIME_SCALE
        wait = max(0.0, ready_at - time.time())
        detail(f"waiting {wait:.1f} s from the flow's createdAt (10 emulated minutes)")
        await asyncio.sleep(wait)
        step(7, "Trigger again")
        status, answer = await api.call("POST", ADHOC_PATH, body, accept)
        if status != 200:
            raise RuntimeError(f"trigger failed: {status} {answer}")
        run_id = answer["destinations"][0]["datasets"][0]["statusURL"].rsplit("/", 1)[-1]
        detail(f"-> {status}, run {run_id}")

        step(8, "Poll the run until it ends")
        run = await _poll(api, run_id)
        metrics = run["metrics"]
        detail(
            f"status={metrics['statusSummary']['status']}, "
            f"records={metrics['recordSummary'].get('outputRecordCount')}, "
            f"files={metrics['fileSummary'].get('outputFileCount')}, "
            f"bytes={metrics['sizeSummary'].get('outputBytes')}"
        )
        async with session.get(f"{url}/_emulator/runs/{run_id}") as resp:
            where = await resp.json()
        return [Path(f) for f in where["files"]]


async def _poll(api: Api, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_DEADLINE
    delay = 0.2
    while time.monotonic() < deadline:
        _, answer = await api.call("GET", f"{FLOW_SERVICE_PATH}/runs/{run_id}")
        run: dict[str, Any] = answer["items"][0]
        status = run["metrics"]["statusSummary"]["status"].lower()
        detail(f"GET /runs/{run_id[:8]}… -> {status}")
        if (
            status in ("success", "failed")
            and "completedAtUTC" in run["metrics"]["durationSummary"]
        ):
            return run
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise RuntimeError(f"run {run_id} did not finish within {RUN_DEADLINE} s")


async def demo(workdir: Path) -> int:
    data_dir = workdir / "emulator"
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"Seeding synthetic feature datasets into {data_dir} …", flush=True)
    seed = await _child(
        "emulator",
        "seed",
        "--data-dir",
        str(data_dir),
        "--count",
        "3",
        "--rows",
        "20000",
        "--seed",
        "42",
    )
    out, _ = await seed.communicate()
    if seed.returncode != 0:
        print(out.decode(), file=sys.stderr)
        return 1
    datasets = json.loads(out)
    for ds in datasets:
        print(f"    {ds['id']}  {ds['name']}  {ds['rows']} rows", flush=True)
    proc, url = await _start_emulator(data_dir)
    print(f"Emulator listening on {url}", flush=True)
    try:
        files = await walk(url, datasets[0])
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
    print("\nExported files (the emulator's Data Landing Zone container is a local folder):")
    for path in files:
        rows = pq.ParquetFile(path).metadata.num_rows
        print(f"    {path}  ({path.stat().st_size} bytes, {rows} rows)")
    print(
        "\nOpen them with any Parquet reader, e.g. "
        f"python -c \"import pyarrow.parquet as pq; print(pq.read_table('{files[0]}'))\""
    )
    return 0


def main(workdir: Path) -> int:
    try:
        return asyncio.run(demo(workdir))
    except (RuntimeError, aiohttp.ClientError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
