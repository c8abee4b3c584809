"""`aep-exporter run`, `status` and `validate`: the daemon's commands.

SIGHUP makes `run` re-read destinations and schedules from its config file.
Exit codes of `run`: 0 stopped cleanly (SIGTERM or SIGINT), 2 configuration error,
65 the journal is corrupt (the log says how to recover), 70 a supervised task died,
128+N a second signal N forced an immediate exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

from exporter.clock import SystemClock
from exporter.daemon.core import EXIT_CONFIG
from exporter.daemon.journal import FILE_NAME, JobRecord, jobs_matching, schedule_slots
from exporter.errors import ConfigError
from exporter.jobs import JobState, Rejected
from exporter.logs import configure_logging
from exporter.oneshot import settings_or_report
from exporter.settings import (
    NO_FILE,
    Settings,
    add_config_argument,
    load_local_settings,
    load_settings,
)
from exporter.sources.spool import Spool

log = structlog.get_logger("exporter.daemon")


def add_parsers(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="run the daemon: export jobs from the spool until stopped",
        description="Claim job files from the spool, export them, write results beside them. "
        "SIGTERM or SIGINT stops it gracefully (a second one at once); SIGHUP reloads "
        "destinations and schedules. Exit codes: 0 stopped, "
        "2 configuration error, 65 corrupt journal (the log says how to recover), "
        "70 internal failure, 128+N forced by a second signal N.",
    )
    add_config_argument(run)
    run.set_defaults(func=cmd_run)

    status = subparsers.add_parser(
        "status",
        help="jobs by state and the latest outcomes, from the journal",
        description="Read the daemon's journal (SQLite, in daemon.state_dir) and list jobs by "
        "state, the latest outcomes and the schedules' slots. Reads only local files: needs "
        "no AEP credentials and contacts nothing. Exit codes: 0 listed, 1 no journal yet, "
        "2 configuration error.",
    )
    add_config_argument(status)
    status.add_argument("--recent", type=int, default=10, help="outcomes to list (default 10)")
    status.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only jobs in this state (repeat for more)",
    )
    status.add_argument(
        "--source",
        action="append",
        choices=["spool", "redis", "http", "schedule"],
        help="only jobs from this source (repeat for more)",
    )
    status.add_argument(
        "--json", action="store_true", help="print counts and jobs as JSON (full ids and outcomes)"
    )
    status.set_defaults(func=cmd_status)

    validate = subparsers.add_parser(
        "validate",
        help="check the configuration and job files without contacting AEP",
        description="Load the configuration as `run` would (every problem listed, with a "
        "'did you mean' for a misspelt key), show each schedule's next slot, and read each "
        "job file given as the spool would. Contacts nothing. Exit codes: 0 all good, 1 a "
        "job file is bad, 2 configuration error.",
    )
    add_config_argument(validate)
    validate.add_argument("jobs", nargs="*", type=Path, help="job files to check")
    validate.set_defaults(func=cmd_validate)


def cmd_run(args: argparse.Namespace) -> int:
    err = Console(stderr=True, soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    fmt = settings.log.format
    configure_logging(settings.log.level, json=None if fmt == "auto" else fmt == "json")
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    try:
        return asyncio.run(
            _run(
                settings,
                reread=lambda: load_settings(args.config, credentials_directory=credentials),
            )
        )
    except ConfigError as exc:  # found on start, e.g. an admin token file others could read
        log.error("daemon_config_error", error=str(exc))
        return EXIT_CONFIG


async def _run(settings: Settings, reread: Callable[[], Settings] | None = None) -> int:
    """Run the daemon: SIGTERM and SIGINT stop it, SIGHUP reloads with `reread`."""
    from exporter.daemon.assemble import build_daemon  # (the services: only `run` needs them)

    daemon = build_daemon(settings, clock=SystemClock())
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    reloads: set[asyncio.Task[bool | None]] = set()

    signalled = False

    def on_signal(signum: int) -> None:
        nonlocal signalled
        name = signal.Signals(signum).name
        if signalled:
            log.warning("signal_received", signal=name, then="exit now")
            os._exit(128 + signum)  # the second signal: no more waiting
        # (A stop the daemon began itself, a task having died, is not a first signal.)
        signalled = True
        log.info("signal_received", signal=name, then="graceful stop")
        daemon.stop()

    def on_hangup() -> None:
        if reread is not None:
            task = asyncio.create_task(daemon.reload(reread), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        return await daemon.run()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for sig in signals:
            loop.remove_signal_handler(sig)
        for task in reloads:
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)


def cmd_status(args: argparse.Namespace) -> int:
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:  # only the local sections: no AEP credentials needed to read a local file
        settings = load_local_settings(args.config)
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_CONFIG
    path = settings.daemon.state_dir / FILE_NAME
    if not path.is_file():
        err.print(f"no journal at {path}: the daemon has not run with this configuration")
        if args.config is None:
            err.print(NO_FILE, markup=False, highlight=False)
        return 1
    counts, recent = jobs_matching(
        path, states=args.state or (), sources=args.source or (), recent=args.recent
    )
    if args.json:
        print(json.dumps(status_document(path, counts, recent), indent=2))
        return 0
    narrowed = ", ".join(
        f"{name} {' or '.join(values)}"
        for name, values in (("state", args.state), ("source", args.source))
        if values
    )
    states = Table(title=f"jobs in {path}" + (f" ({narrowed})" if narrowed else ""))
    states.add_column("state")
    states.add_column("jobs", justify="right")
    for state, n in sorted(counts.items()):
        states.add_row(state, str(n))
    out.print(states)
    latest = Table(title="most recent")
    # Ids in full, whatever the terminal's width: they are what one copies to look a job up.
    widest = max((len(r.job_id) for r in recent), default=3)
    for column in ("updated", "source", "job", "state", "records", "files", "detail"):
        latest.add_column(
            column,
            no_wrap=column in ("updated", "job"),
            min_width=widest if column == "job" else None,
            overflow="fold",
        )
    for record in recent:
        outcome = record.outcome or {}
        latest.add_row(
            datetime.fromtimestamp(record.updated, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            record.source,
            record.job_id,
            record.state.value,
            str(outcome.get("records", "")),
            str(outcome.get("files", "")),
            outcome.get("message", "") or (record.run_id or ""),
        )
    out.print(latest)
    if settings.schedules and not narrowed:
        from exporter.sources.schedules import status_table

        out.print(status_table(settings.schedules, schedule_slots(path), now=time.time()))
    return 0


def status_document(path: Path, counts: dict[str, int], recent: list[JobRecord]) -> dict[str, Any]:
    """What `status --json` prints: the counts, then each job as the journal has it."""
    return {
        "journal": str(path),
        "counts": dict(sorted(counts.items())),
        "jobs": [
            {
                "job_id": r.job_id,
                "source": r.source,
                "name": r.name,
                "state": r.state.value,
                "flow_id": r.flow_id,
                "run_id": r.run_id,
                "created": datetime.fromtimestamp(r.created, UTC).isoformat(),
                "updated": datetime.fromtimestamp(r.updated, UTC).isoformat(),
                "outcome": r.outcome,
            }
            for r in recent
        ],
    }


def cmd_validate(args: argparse.Namespace) -> int:
    from exporter.sources.schedules import iso, upcoming  # (loads APScheduler)

    err = Console(stderr=True, soft_wrap=True)
    out = Console(soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    where = args.config or "environment"
    out.print(
        f"ok  {where}: {len(settings.destinations)} destination(s): "
        f"{', '.join(sorted(settings.destinations)) or 'none'}",
        highlight=False,
    )
    for schedule in settings.schedules:
        slots = upcoming(schedule, None, time.time(), 1) if schedule.enabled else []
        out.print(
            f"ok  schedule {schedule.name}: {schedule.describe()}, exports "
            f"{schedule.job.dataset_id} to {schedule.job.destination}; "
            + (
                f"next slot {iso(slots[0])}"
                if slots
                else "disabled"
                if not schedule.enabled
                else "no next slot"
            ),
            markup=False,
            highlight=False,
        )
    spool = Spool(settings.daemon.spool_dir, max_bytes=settings.daemon.max_job_file_bytes)
    bad = 0
    for path in args.jobs:
        try:
            job = spool.read(path, settings.destinations).job
        except Rejected as exc:
            bad += 1
            err.print(f"bad {path}: {exc}", markup=False, highlight=False)
        else:
            out.print(
                f"ok  {path}: job {job.job_id} exports {job.dataset_id} to "
                f"{job.destination}:{job.path} as {job.format}/{job.compression}",
                markup=False,
                highlight=False,
            )
    sys.stdout.flush()
    return 1 if bad else 0
