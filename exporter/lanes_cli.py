"""`aep-exporter lanes list` and `aep-exporter lanes prune`: the export lanes in AEP.

A lane is one AEP dataflow that exports many datasets (`exporter.engine.lanes`). `list` shows
every lane flow of the configured sandbox as AEP has it; `prune` retires the idle one-off
lanes (disabled, then deleted with their connections, as the flow budget would) and deletes
source connections no flow uses. Both talk to AEP directly, not to a running daemon (the
admin server has `/v1/lanes` for that): a lane a running daemon holds a job on is not idle
there, but this process cannot see that job, so prune while no one-off job is in flight, or
through the daemon's admin API.

Exit codes: 0 done, 1 AEP refused or could not be reached, 2 configuration error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from exporter.aep.client import HttpAep
from exporter.clock import Clock, SystemClock
from exporter.engine.assemble import engine_for
from exporter.engine.lanes import LaneView
from exporter.errors import ConfigError, ExporterError
from exporter.logs import configure_logging
from exporter.oneshot import settings_or_report
from exporter.settings import Settings, add_config_argument

EXIT_OK = 0
EXIT_AEP = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def add_parser(subparsers: Any) -> None:
    lanes = subparsers.add_parser(
        "lanes",
        help="list or prune the export lanes (AEP dataflows shared by many datasets)",
        description="Export lanes are the AEP dataflows this exporter makes: one per "
        "destination, path, format, compression and schedule mode, exporting many datasets. "
        "Exit codes: 0 done, 1 AEP error, 2 configuration error, 130 interrupted.",
    )
    sub = lanes.add_subparsers(dest="lanes_command", required=True, metavar="ACTION")
    listing = sub.add_parser(
        "list",
        help="every lane flow of the sandbox: destination, path, datasets, state, last run",
    )
    add_config_argument(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    listing.set_defaults(func=cmd_list)
    prune = sub.add_parser(
        "prune",
        help="retire idle one-off lanes and delete orphaned source connections",
        description="Retire (disable, then delete with their connections) every one-off lane "
        "with no run in progress and none for engine.lane_idle_s, and delete source "
        "connections no lane flow uses. Scheduled (daily, hourly) lanes are never retired.",
    )
    add_config_argument(prune)
    prune.add_argument(
        "--dry-run", action="store_true", help="only list the lanes that would be retired"
    )
    prune.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    prune.set_defaults(func=cmd_prune)


async def list_lanes(settings: Settings, clock: Clock | None = None) -> list[LaneView]:
    clock = clock or SystemClock()
    async with (
        HttpAep.from_config(settings.aep, clock=clock) as api,
        engine_for(settings, api, clock) as engine,
    ):
        return await engine.lanes.views()


async def prune_lanes(
    settings: Settings, *, dry_run: bool, clock: Clock | None = None
) -> list[LaneView]:
    clock = clock or SystemClock()
    async with (
        HttpAep.from_config(settings.aep, clock=clock) as api,
        engine_for(settings, api, clock) as engine,
    ):
        return await engine.lanes.prune(dry_run=dry_run)


def iso_ms(value: object) -> str:
    """An AEP time (epoch seconds, or milliseconds when that large) in UTC ISO 8601."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return ""
    seconds = value / 1000 if value > 10**11 else value
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(value)


def last_run(details: Mapping[str, Any] | None) -> str:
    """`state at time` of a flow's last run, or empty."""
    if not details:
        return ""
    state = str(details.get("state") or details.get("status") or "")
    when = iso_ms(details.get("completedAtUTC") or details.get("startedAtUTC"))
    return f"{state} {when}".strip()


def table(views: Sequence[LaneView], title: str) -> Table:
    out = Table(title=title)
    for column in (
        "lane",
        "flow id",
        "destination",
        "path",
        "format",
        "mode",
        "datasets",
        "state",
        "end time (UTC)",
        "last run",
    ):
        out.add_column(column, justify="right" if column == "datasets" else "left")
    for view in views:
        out.add_row(
            view.lane or "?",
            view.flow_id,
            view.destination,
            view.path,
            f"{view.format}/{view.compression}",
            view.mode,
            str(view.datasets),
            view.state,
            iso_ms(view.end_time),
            last_run(view.last_run),
        )
    return out


def _run(coro: Any, err: Console) -> tuple[int, list[LaneView]]:
    try:
        views: list[LaneView] = asyncio.run(coro)
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED, []
    except ConfigError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_CONFIG, []
    except ExporterError as exc:  # AepError and its kinds; the client closed under us
        err.print(f"error: AEP: {exc}", markup=False, highlight=False)
        return EXIT_AEP, []
    return EXIT_OK, views


def cmd_list(args: argparse.Namespace) -> int:
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    configure_logging("warning")
    code, views = _run(list_lanes(settings), err)
    if code != EXIT_OK:
        return code
    if args.json:
        print(json.dumps([v.as_dict() for v in views]))
        return EXIT_OK
    if not views:
        out.print(f"no export lanes in sandbox {settings.aep.sandbox}", highlight=False)
        return EXIT_OK
    out.print(table(views, f"export lanes in sandbox {settings.aep.sandbox}"))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    configure_logging("warning")
    code, views = _run(prune_lanes(settings, dry_run=args.dry_run), err)
    if code != EXIT_OK:
        return code
    if args.json:
        print(json.dumps({"retired": [v.as_dict() for v in views], "dry_run": args.dry_run}))
        return EXIT_OK
    verb = "would retire" if args.dry_run else "retired"
    if not views:
        out.print(
            f"no idle one-off lane to retire in sandbox {settings.aep.sandbox} "
            f"(idle: no run for engine.lane_idle_s={settings.engine.lane_idle_s:g} s)",
            highlight=False,
        )
        return EXIT_OK
    out.print(table(views, f"{verb} {len(views)} lane flow(s) in sandbox {settings.aep.sandbox}"))
    if args.dry_run:
        out.print("dry run: nothing was changed", highlight=False)
    return EXIT_OK
