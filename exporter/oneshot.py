"""`aep-exporter export`: one export, start to finish, from the command line.

Exit codes: 0 succeeded (or, with --no-wait, triggered), 1 failed in AEP, 2 bad usage,
configuration or job, 3 timed out, 4 delivery mismatch (the destination's `verify` section
found the folder differing from the run), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.status import Status

from exporter.aep.client import HttpAep
from exporter.clock import Clock, SystemClock
from exporter.engine.engine import Engine, Progress
from exporter.errors import ConfigError
from exporter.jobs import Job, JobState, Outcome
from exporter.logs import configure_logging
from exporter.settings import (
    Settings,
    add_config_argument,
    describe_errors,
    load_settings,
)

EXIT = {
    JobState.SUCCEEDED: 0,
    JobState.RUNNING: 0,
    JobState.FAILED: 1,
    JobState.REJECTED: 2,
    JobState.TIMED_OUT: 3,
    JobState.CANCELLED: 130,
    JobState.DELIVERY_MISMATCH: 4,
}
DESCRIBE = {
    JobState.FLOW_READY: "flow ready",
    JobState.TRIGGERING: "triggering the export (waits out AEP's 'not ready' window)",
    JobState.RUNNING: "run in progress",
}


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export one dataset now and wait for the result",
        description="Create or reuse the flow for this export, trigger an ad hoc run and poll it "
        "until it ends. Exit codes: 0 succeeded, 1 failed, 2 bad input or config, 3 timed out, "
        "4 delivery mismatch, 130 interrupted.",
    )
    p.add_argument("--dataset", required=True, help="AEP dataset id")
    p.add_argument("--destination", required=True, help="a destination named in the config")
    p.add_argument("--format", default="parquet", choices=["parquet", "json"])
    p.add_argument("--compression", default="gzip", choices=["gzip", "none"])
    p.add_argument("--path", required=True, help="folder under the destination")
    p.add_argument(
        "--mode",
        default="once",
        choices=["once", "daily", "hourly:3", "hourly:6", "hourly:9", "hourly:12"],
    )
    p.add_argument(
        "--after-run",
        choices=["keep", "disable"],
        help="what to do with the flow afterwards (default: disable for once)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=6 * 3600.0,
        metavar="S",
        help="give up waiting after this many seconds (default %(default)s)",
    )
    p.add_argument("--id", help="job id (default: derived from the arguments)")
    p.add_argument("--no-wait", action="store_true", help="return once the run is triggered")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout")
    add_config_argument(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    err = Console(stderr=True, soft_wrap=True)
    try:
        job = Job(
            id=args.id,
            dataset_id=args.dataset,
            destination=args.destination,
            format=args.format,
            compression=args.compression,
            path=args.path,
            mode=args.mode,
            after_run=args.after_run,
            timeout=args.timeout,
        )
        settings = load_settings(
            args.config, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY")
        )
    except ValidationError as exc:
        err.print(describe_errors(exc, "job"), markup=False, highlight=False)
        return 2
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    configure_logging("warning" if err.is_terminal else "info")
    try:
        outcome = asyncio.run(_export(settings, job, err, wait=not args.no_wait))
    except KeyboardInterrupt:
        err.print("interrupted: the run, if started, goes on in AEP")
        return EXIT[JobState.CANCELLED]
    if args.json:
        print(outcome.model_dump_json())
    else:
        report(outcome, err)
    return EXIT[outcome.state]


async def _export(
    settings: Settings, job: Job, err: Console, *, wait: bool, clock: Clock | None = None
) -> Outcome:
    clock = clock or SystemClock()
    async with HttpAep.from_config(settings.aep, clock=clock) as api:
        engine = engine_for(settings, api, clock)
        async with engine:
            if not err.is_terminal:
                return await engine.run(job, wait=wait)
            with Status("finding or creating the flow", console=err) as status:
                started = clock.monotonic()

                async def on_state(progress: Progress) -> None:
                    ids = " ".join(
                        f"{k} {v}"
                        for k, v in (("flow", progress.flow_id), ("run", progress.run_id))
                        if v
                    )
                    err.log(
                        f"{DESCRIBE.get(progress.state, progress.state)}  {ids}",
                        markup=False,
                        highlight=False,
                    )
                    status.update(
                        f"{DESCRIBE.get(progress.state, progress.state)} "
                        f"({clock.monotonic() - started:.0f} s)"
                    )

                return await engine.run(job, on_state, wait=wait)


def report(outcome: Outcome, console: Console) -> None:
    colour = {JobState.SUCCEEDED: "green", JobState.RUNNING: "cyan"}.get(outcome.state, "red")
    console.print(f"[bold {colour}]{outcome.state}[/] job {outcome.job_id}", highlight=False)
    for label, value in (
        ("flow", outcome.flow_id),
        ("run", outcome.run_id),
        ("records", outcome.records),
        ("files", outcome.files),
        ("bytes", outcome.bytes),
        ("duration", f"{outcome.duration_s} s"),
    ):
        if value not in (None, 0) or outcome.state == JobState.SUCCEEDED:
            console.print(f"  {label:<9}{value}", highlight=False, markup=False)
    if outcome.landing_uri:
        kept = f" (kept {outcome.retention_days} days)" if outcome.retention_days else ""
        console.print(f"  {'landed':<9}{outcome.landing_uri}{kept}", highlight=False, markup=False)
    if outcome.delivery is not None:
        d = outcome.delivery
        rows = "" if d.rows is None else f", {d.rows} rows"
        console.print(
            f"  {'verified' if d.verdict == 'verified' else 'MISMATCH':<9}"
            f"{d.files} files, {d.bytes} bytes{rows} at the destination",
            highlight=False,
            markup=False,
        )
    if outcome.message:
        console.print(f"  {outcome.message}", markup=False, highlight=False)
    for error in outcome.errors:
        console.print(f"  {error.code}: {error.message}", markup=False, highlight=False)
    sys.stderr.flush()


def engine_for(settings: Settings, api: HttpAep, clock: Clock) -> Engine:
    """The engine a one-shot command uses: the same lanes the daemon finds."""
    return Engine(
        api,
        settings.destinations,
        settings.engine,
        org_id=settings.aep.org_id,
        sandbox=settings.aep.sandbox,
        clock=clock,
        identity_key=settings.aep.client_secret.get_secret_value().encode(),
    )


def settings_or_report(args: argparse.Namespace, err: Console) -> Settings | None:
    """The settings `--config` names (secrets from `$CREDENTIALS_DIRECTORY` too), or None
    after saying on `err` why they cannot be loaded."""
    try:
        return load_settings(
            args.config, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY")
        )
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return None
