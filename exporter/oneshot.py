"""`aep-exporter export`: one export, start to finish, from the command line.

Exit codes: exporter/exitcodes.py (0 succeeded or, with --no-wait, triggered; 1 failed in AEP;
2 bad usage, configuration or job; 3 timed out; 4 credentials refused; 5 AEP unreachable;
6 delivery mismatch; 130 interrupted; 143 terminated).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError
from rich.console import Console
from rich.status import Status

from exporter.aep.client import HttpAep
from exporter.clock import Clock, SystemClock
from exporter.engine.assemble import engine_for
from exporter.engine.engine import Engine, Progress
from exporter.errors import ConfigError, ExporterError
from exporter.exitcodes import STATES, Exit, for_outcome
from exporter.jobs import TERMINAL, Job, JobState, Outcome
from exporter.logs import CurrentStderr, configure_logging
from exporter.oneshot_state import ExportNote, default_folder
from exporter.settings import (
    Settings,
    add_config_argument,
    describe_errors,
    load_settings,
)

EXIT = {state: for_outcome(state) for state in JobState if state in STATES}
SHOWN_ON_TERMINAL = ("aep_token_retry", "aep_request_retry", "trigger_not_ready")
"""Info events a person at a terminal should see: why nothing seems to happen."""
HINTS = {
    "auth": "the credentials were refused: check aep.client_id, the client secret and the "
    "credential's product profile (exit 4)",
    "unreachable": "AEP or IMS could not be reached: check aep.platform_url, aep.ims_url and "
    "the network; trying again later may help (exit 5)",
}
DESCRIBE = {
    JobState.FLOW_READY: "flow ready",
    JobState.TRIGGERING: "triggering the export",
    JobState.RUNNING: "run in progress",
}


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export one dataset now and wait for the result",
        description="Create or reuse the flow for this export, trigger an ad hoc run and poll it "
        "until it ends. Exit codes: 0 succeeded, 1 failed in AEP, 2 bad input or config, "
        "3 timed out, 4 credentials refused, 5 AEP unreachable, 6 delivery mismatch, "
        "130 interrupted (Ctrl-C), "
        "143 terminated (SIGTERM). A stopped command leaves its run to AEP; the same "
        "command again follows that run instead of starting another.",
    )
    p.add_argument("--dataset", required=True, help="AEP dataset id")
    p.add_argument("--destination", required=True, help="a destination named in the config")
    p.add_argument(
        "--format",
        default="parquet",
        choices=["parquet", "json"],
        help="file format (default %(default)s; json is JSON lines)",
    )
    p.add_argument(
        "--compression",
        default="gzip",
        choices=["gzip", "none"],
        help="file compression (default %(default)s; json needs gzip)",
    )
    p.add_argument("--path", required=True, help="folder under the destination")
    p.add_argument(
        "--mode",
        default="once",
        choices=["once", "daily", "hourly:3", "hourly:6", "hourly:9", "hourly:12"],
        help="once: a one-off export now; daily or hourly:N: a flow on that schedule, "
        "waiting for its first run (default %(default)s)",
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
    err = Console(stderr=True, soft_wrap=True, log_path=False)  # (rich's own line, not ours)
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
        return Exit.BAD_INPUT
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return Exit.BAD_INPUT
    if err.is_terminal:  # the spinner says what goes on; the log, what goes wrong
        configure_logging("warning", stream=CurrentStderr(), also=SHOWN_ON_TERMINAL)
    else:
        configure_logging("info")
    notes = default_folder(os.environ)
    try:
        outcome = asyncio.run(
            _export(settings, job, err, wait=not args.no_wait, notes=notes, signals=True)
        )
    except Stopped as stopped:
        err.print(stopped.describe(), markup=False, highlight=False)
        return stopped.code
    except KeyboardInterrupt:  # before the loop took over SIGINT: nothing was sent
        err.print("interrupted: nothing was sent to AEP")
        return Exit.INTERRUPTED
    if args.json:
        print(outcome.model_dump_json())
    else:
        report(outcome, err)
    return for_outcome(outcome.state, outcome.cause)


class Stopped(ExporterError):
    """SIGINT or SIGTERM stopped the command; `progress` is how far the job had got."""

    def __init__(self, signum: int, progress: Progress | None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.progress = progress

    @property
    def code(self) -> Exit:
        return Exit.TERMINATED if self.signum == signal.SIGTERM else Exit.INTERRUPTED

    def describe(self) -> str:
        name, p = signal.Signals(self.signum).name, self.progress
        if p is not None and p.state == JobState.RUNNING:
            return (
                f"stopped by {name}: run {p.run_id} of flow {p.flow_id} goes on in AEP; the "
                "same command again follows it instead of starting another"
            )
        if p is not None and p.state == JobState.TRIGGERING:
            return (
                f"stopped by {name} while triggering flow {p.flow_id}: a run may have started "
                "in AEP; the same command again adopts it instead of starting another"
            )
        where = f" (flow {p.flow_id} is left as it is)" if p is not None and p.flow_id else ""
        return f"stopped by {name}: no run was started in AEP{where}"


async def _export(
    settings: Settings,
    job: Job,
    err: Console,
    *,
    wait: bool,
    clock: Clock | None = None,
    notes: Path | None = None,
    signals: bool = False,
) -> Outcome:
    """Run the job to its outcome (or, without `wait`, its run's start). With `notes`, a
    folder: resume from the note an earlier, stopped run of the same job left there
    (exporter/oneshot_state.py). With `signals` (the command line), SIGINT and SIGTERM stop
    it: `Stopped` is raised once all is closed."""
    clock = clock or SystemClock()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    caught: list[int] = []
    last: list[Progress] = []

    def on_signal(signum: int) -> None:
        if not caught and task is not None:
            caught.append(signum)
            task.cancel()

    for sig in SIGNALS if signals else ():
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _follow(settings, job, err, wait=wait, clock=clock, notes=notes, last=last)
    except asyncio.CancelledError:
        if caught:
            raise Stopped(caught[0], last[-1] if last else None) from None
        raise
    finally:
        for sig in SIGNALS if signals else ():
            loop.remove_signal_handler(sig)


SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _follow(
    settings: Settings,
    job: Job,
    err: Console,
    *,
    wait: bool,
    clock: Clock,
    notes: Path | None,
    last: list[Progress],
) -> Outcome:
    note = (
        None
        if notes is None
        else ExportNote(
            notes,
            job_id=job.job_id,
            org_id=settings.aep.org_id,
            sandbox=settings.aep.sandbox,
            clock=clock,
        )
    )
    resume = note.load(max_age_s=job.timeout) if note is not None else None
    if resume is not None:
        last.append(resume)
        err.print(
            f"resuming: an earlier run of this command left job {job.job_id} at "
            f"{resume.state} (flow {resume.flow_id}"
            + (f", run {resume.run_id})" if resume.run_id else ")"),
            markup=False,
            highlight=False,
        )

    async def remember(progress: Progress) -> None:
        last.append(progress)
        if note is not None:
            try:
                note.save(progress)
            except OSError as exc:  # a read-only home: the export itself goes on
                err.print(f"warning: cannot save {note.path}: {exc}", markup=False)

    async with HttpAep.from_config(settings.aep, clock=clock) as api:
        engine = engine_for(settings, api, clock)
        async with engine:
            if not err.is_terminal:
                outcome = await engine.run(job, remember, resume=resume, wait=wait)
            else:
                outcome = await _on_terminal(engine, job, err, clock, remember, resume, wait)
    if note is not None and outcome.state in TERMINAL:
        note.clear()
    return outcome


async def _on_terminal(
    engine: Engine,
    job: Job,
    err: Console,
    clock: Clock,
    remember: Callable[[Progress], Awaitable[None]],
    resume: Progress | None,
    wait: bool,
) -> Outcome:
    countdown = Countdown(clock, clock.monotonic())
    with Status(countdown.text(), console=err) as status:

        async def on_state(progress: Progress) -> None:
            await remember(progress)
            ids = " ".join(
                f"{k} {v}" for k, v in (("flow", progress.flow_id), ("run", progress.run_id)) if v
            )
            err.log(
                f"{DESCRIBE.get(progress.state, progress.state)}  {ids}",
                markup=False,
                highlight=False,
            )
            countdown.see(progress)
            status.update(countdown.text())

        ticker = asyncio.create_task(tick(countdown, status, clock), name="countdown")
        try:
            return await engine.run(job, on_state, resume=resume, wait=wait)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)


def clock_text(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour: how a countdown reads."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Countdown:
    """What the spinner says, from the job's progress and the clock: the step; the time left
    in AEP's "not ready" window while the trigger waits it out; the run's age while it runs;
    and the time since the command started."""

    clock: Clock
    started: float  # monotonic
    state: JobState | None = None
    ready_at: float | None = None  # epoch seconds
    run_started: float | None = None  # monotonic

    def see(self, progress: Progress) -> None:
        if progress.ready_at is not None:
            self.ready_at = progress.ready_at
        if progress.state == JobState.RUNNING and self.state != JobState.RUNNING:
            self.run_started = self.clock.monotonic()
        self.state = progress.state

    def text(self) -> str:
        now = self.clock.monotonic()
        total = f"{clock_text(now - self.started)} in all"
        if self.state is None:
            return f"finding or creating the flow  ({total})"
        if self.state == JobState.RUNNING and self.run_started is not None:
            return f"run in progress for {clock_text(now - self.run_started)}  ({total})"
        left = None if self.ready_at is None else self.ready_at - self.clock.time()
        if self.state in WAITING and left is not None and left > 0:
            # Rounded up: "0:01 left" until the window is really over.
            return (
                f"waiting out AEP's 'not ready' window: {clock_text(math.ceil(left))} left  "
                f"({total})"
            )
        return f"{DESCRIBE.get(self.state, self.state)}  ({total})"


WAITING = (JobState.FLOW_READY, JobState.TRIGGERING)
TICK_S = 1.0


class Updatable(Protocol):
    def update(self, status: str) -> None: ...


async def tick(countdown: Countdown, status: Updatable, clock: Clock) -> None:
    """Redraw the spinner's text every second (until cancelled), so the countdown moves
    while nothing else does."""
    while True:
        await clock.sleep(TICK_S)
        status.update(countdown.text())


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
        if error.message and error.message in outcome.message:
            continue  # the message already said it (an error that ended the job early)
        console.print(f"  {error.code}: {error.message}", markup=False, highlight=False)
    if outcome.cause in HINTS:
        console.print(f"  {HINTS[outcome.cause]}", markup=False, highlight=False)
    sys.stderr.flush()


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
