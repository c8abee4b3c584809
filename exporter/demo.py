"""`aep-exporter demo`: the daemon at work, against a local emulator, in about half a minute.

It seeds three synthetic feature datasets, starts `aep-exporter emulator` (ten emulated
minutes take three real seconds), drops the sample jobs of `config/jobs/` into a spool,
runs `aep-exporter run` until every job has its result, stops it with SIGTERM, and shows
what was exported and where the files are.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import watchfiles
from rich.console import Console
from rich.table import Table

from aep_emulator.settings import DEFAULT_CLIENT_ID, DEFAULT_ORG_ID, SECRET_FILE

TIME_SCALE = 0.005  # AEP's 600 s not-ready window takes 3 s
DEADLINE_S = 180.0
JOB_SUFFIXES = (".json", ".yaml", ".yml", ".toml")
CONFIG = """\
# Written by `aep-exporter demo`: the daemon pointed at the local emulator.
[aep]
platform_url = "{url}"
ims_url = "{url}"
client_id = "{client_id}"
client_secret_file = "client_secret"
org_id = "{org_id}"

[engine]
not_ready_wait_s = {not_ready}
poll_min_s = 0.5
poll_max_s = 2

[daemon]
state_dir = "state"
spool_dir = "spool"
rescan_s = 1

[admin]
port = 0  # any free port: its address is in the log (admin_listening)

[log]
format = "json"

[destinations.landing-zone]
type = "dlz"

[destinations.ml-bucket]
type = "s3"
bucket = "ml-features"
role_arn = "arn:aws:iam::123456789012:role/aep-exporter"
"""
VERIFY = """
# Delivery verification: the emulator's destinations are local folders, read back as such.
[destinations.landing-zone.verify]
store = "local"
root = "{destinations}/dlz/prod/dlz-destination"
grace_s = 10
poll_s = 1

[destinations.ml-bucket.verify]
store = "local"
root = "{destinations}/s3/ml-features"
grace_s = 10
poll_s = 1
"""


async def _child(*args: str, stdout: Any = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", *args, stdout=stdout, stderr=asyncio.subprocess.STDOUT
    )


async def _listening(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while line := (await proc.stdout.readline()).decode():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].split()[0]
    raise RuntimeError("the emulator exited before it listened")


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        return await proc.wait()


def _results(spool: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for folder in ("done", "failed", "rejected"):
        for path in (spool / folder).glob("*.result.json"):
            found[path.name.removesuffix(".result.json")] = {
                **json.loads(path.read_text()),
                "folder": folder,
            }
    return found


async def _until_filed(spool: Path, names: set[str]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        if names <= set(_results(spool)):
            return
        async for _ in watchfiles.awatch(*(spool / f for f in ("done", "failed", "rejected"))):
            if names <= set(_results(spool)):
                return


async def _metrics(log: Path, config: Path) -> list[str]:
    """A few figures from the daemon's own /metrics, as Prometheus would scrape them (with
    the admin token the daemon made, found through the same configuration)."""
    from prometheus_client.parser import text_string_to_metric_families

    from exporter.ops.admin_token import client_token
    from exporter.settings import load_settings

    port = None
    for line in (await asyncio.to_thread(log.read_text)).splitlines():
        if '"admin_listening"' in line:
            port = json.loads(line)["port"]
    if port is None:
        return ["(the admin server did not start: no metrics)"]
    url = f"http://127.0.0.1:{port}/metrics"
    token = await asyncio.to_thread(lambda: client_token(load_settings(config)))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=auth) as resp:
        text = await resp.text()
        if resp.status != 200:
            return [f"(the admin server answered {resp.status}: no metrics)"]
    finished: dict[str, float] = {}
    requests: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aep_exporter_jobs_finished_total" and sample.value:
                state = sample.labels["state"]
                finished[state] = finished.get(state, 0) + sample.value
            if sample.name == "aep_exporter_api_requests_total":
                op = sample.labels["operation"]
                requests[op] = requests.get(op, 0) + sample.value
    jobs = ", ".join(f"{n:g} {state}" for state, n in sorted(finished.items()))
    top = ", ".join(f"{op} {n:g}" for op, n in sorted(requests.items(), key=lambda i: -i[1])[:4])
    return [
        f"metrics from {url}: jobs {jobs}",
        f"AEP requests: {sum(requests.values()):g} in all ({top}, ...)",
    ]


def _prepare(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    for folder in ("incoming", "done", "failed", "rejected"):
        (workdir / "spool" / folder).mkdir(parents=True)


def _drop(jobs_dir: Path, incoming: Path) -> list[Path]:
    jobs = sorted(p for p in jobs_dir.iterdir() if p.suffix in JOB_SUFFIXES)
    for job in jobs:
        (incoming / f".{job.name}.tmp").write_bytes(job.read_bytes())
        (incoming / f".{job.name}.tmp").rename(incoming / job.name)
    return jobs


async def demo(workdir: Path, jobs_dir: Path, console: Console) -> int:
    await asyncio.to_thread(_prepare, workdir)
    data_dir = workdir / "emulator"
    console.rule("aep-exporter demo")
    console.print("1. Seeding three synthetic feature datasets into the emulator's data lake")
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
        "--name",
        "customer_features",
    )
    out, _ = await seed.communicate()
    if seed.returncode != 0:
        console.print(out.decode(), markup=False)
        return 1
    for ds in json.loads(out):
        console.print(f"   {ds['id']}  {ds['name']}  {ds['rows']} rows", highlight=False)

    emulator = await _child(
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
    try:
        url = await _listening(emulator)
        console.print(
            f"2. Emulator listening on {url} (AEP's ten-minute 'not ready' window takes 3 s here)",
            highlight=False,
        )
        # The secret the emulator made at random in its data folder on its first start.
        (workdir / "client_secret").write_text((data_dir / SECRET_FILE).read_text())
        config = workdir / "exporter.toml"
        config.write_text(
            CONFIG.format(
                url=url,
                client_id=DEFAULT_CLIENT_ID,
                org_id=DEFAULT_ORG_ID,
                not_ready=600 * TIME_SCALE,
            )
            + VERIFY.format(destinations=(data_dir / "destinations").resolve())
        )
        spool = workdir / "spool"
        incoming = spool / "incoming"
        jobs = await asyncio.to_thread(_drop, jobs_dir, incoming)
        console.print(
            f"3. Dropped {len(jobs)} job files from {jobs_dir} into {incoming}", highlight=False
        )

        log = (workdir / "daemon.log").open("wb")
        daemon = await _child("run", "--config", str(config), stdout=log)
        console.print(
            f"4. Daemon started: aep-exporter run --config {config} "
            f"(log: {workdir / 'daemon.log'})",
            highlight=False,
        )
        with console.status("   exporting: flows, 'not ready' window, runs, polling …"):
            try:
                await _until_filed(spool, {j.name for j in jobs})
                metrics = await _metrics(workdir / "daemon.log", config)
            finally:
                code = await _stop(daemon)
                log.close()
        console.print(f"5. Every job has its result; SIGTERM stopped the daemon (exit {code})")
        for line in metrics:
            console.print(f"   {line}", highlight=False)
        await _show(console, spool, url)
    finally:
        await _stop(emulator)
    return 0


async def _show(console: Console, spool: Path, url: str) -> None:
    table = Table(title="results", title_justify="left")
    for column in ("job file", "state", "records", "files", "verified"):
        table.add_column(column, no_wrap=True)
    table.add_column("landing URI / why", overflow="fold")
    landed: list[Path] = []
    async with aiohttp.ClientSession() as session:
        for name, result in sorted(_results(spool).items()):
            where = result.get("message", "")
            if result.get("run_id"):
                async with session.get(f"{url}/_emulator/runs/{result['run_id']}") as resp:
                    run = await resp.json()
                landed += [Path(f) for f in run["files"]]
                where = run["folder"].split("/destinations/", 1)[-1]
            colour = {"succeeded": "green", "rejected": "yellow"}.get(result["state"], "red")
            delivery = result.get("delivery") or {}
            verdict = delivery.get("verdict", "-")
            if verdict == "verified":
                rows = delivery.get("rows")
                counted = "files, bytes" if rows is None else f"{rows} rows"
                verdict = f"[green]yes[/] ({counted})"
            elif verdict == "mismatch":
                verdict = "[red]mismatch[/]"
            if result.get("landing_uri"):
                where = result["landing_uri"]
                if result.get("retention_days"):
                    where += f" (kept {result['retention_days']} days)"
            table.add_row(
                f"{result['folder']}/{name}",
                f"[{colour}]{result['state']}[/]",
                str(result["records"]),
                str(result["files"]),
                verdict,
                where,
            )
    console.print(table)
    console.print("Exported files (each destination is a local folder of the emulator):")
    for path in landed:
        console.print(f"   {path}  ({path.stat().st_size} bytes)", highlight=False)
    console.print(
        f"Results sit beside each job in {spool}/done, failed and rejected as <name>.result.json.",
        highlight=False,
    )
    if landed:
        parquet = next((p for p in landed if p.suffix == ".parquet"), landed[0])
        console.print(
            'Open one: .venv/bin/python -c "import pyarrow.parquet as pq; '
            f"print(pq.read_table('{parquet}').slice(0, 5))\"",
            highlight=False,
            markup=False,
        )


def main(workdir: Path, jobs_dir: Path) -> int:
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    if not jobs_dir.is_dir():
        console.print(
            f"no sample jobs at {jobs_dir}: run the demo from the repository root or pass --jobs",
            markup=False,
        )
        return 2
    try:
        return asyncio.run(demo(workdir, jobs_dir, console))
    except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
        console.print(f"demo failed: {exc!r}", markup=False)
        return 1
