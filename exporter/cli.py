"""The `aep-exporter` command.

Each command's module is imported only when that command is asked for: `aep-exporter --help`
(and the container's health probe) need not load aiohttp, pydantic or pyarrow first. The table
below names each command with the one-line help `--help` lists; its module's `add_parser`
defines the rest. Commands that need an extra say so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter import __version__

EXIT_MISSING_EXTRA = 2


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    module: str  # its `register(subparsers)` adds this command (and its siblings, if any)
    register: str = "add_parser"
    extra: str = ""  # the pip extra its dependencies come with
    needs: tuple[str, ...] = ()  # top-level modules of that extra, found before any import


EMULATOR_NEEDS = ("aep_emulator", "pyarrow", "jsonschema", "obstore", "asyncssh", "duckdb")

COMMANDS = (
    Command(
        "emulator",
        "run a local emulator of the AEP APIs (no Adobe account needed)",
        "aep_emulator.cli",
        extra="emulator",
        needs=EMULATOR_NEEDS,
    ),
    Command("export", "export one dataset now and wait for the result", "exporter.oneshot"),
    Command(
        "run",
        "run the daemon: export jobs from the spool until stopped",
        "exporter.daemon.cli",
        register="add_parsers",
    ),
    Command(
        "status",
        "jobs by state and the latest outcomes, from the journal",
        "exporter.daemon.cli",
        register="add_parsers",
    ),
    Command(
        "validate",
        "check the configuration and job files without contacting AEP",
        "exporter.daemon.cli",
        register="add_parsers",
    ),
    Command(
        "probe",
        "ask the running daemon's admin server /healthz (or /readyz); exit 0 if healthy",
        "exporter.ops.probe",
    ),
    Command(
        "lanes",
        "list or prune the export lanes (AEP dataflows shared by many datasets)",
        "exporter.lanes_cli",
    ),
    Command(
        "check",
        "check credentials, sandbox, permissions, destinations and pending jobs against AEP",
        "exporter.check",
    ),
    Command(
        "datasets",
        "list the datasets AEP lets this sandbox export (`datasets list`)",
        "exporter.datasets_cli",
    ),
    Command(
        "demo",
        "run the daemon on the sample jobs against a local emulator",
        "exporter.cli",
        register="add_demo_parser",
        extra="emulator",
        needs=EMULATOR_NEEDS,
    ),
)
BY_NAME = {c.name: c for c in COMMANDS}


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line; with `commands`, only their modules are imported and every other
    command is listed by name and help alone (enough for `--help` and for its errors)."""
    parser = argparse.ArgumentParser(
        prog="aep-exporter",
        description="Export Adobe Experience Platform datasets to cloud storage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = {c.module for c in COMMANDS if commands is None or c.name in commands}
    loaded: set[str] = set()
    for command in COMMANDS:
        if command.module not in wanted:
            sub.add_parser(command.name, help=command.help)
        elif command.module not in loaded:
            register: Callable[[Any], None] = getattr(
                importlib.import_module(command.module), command.register
            )
            register(sub)
            loaded.add(command.module)
    return parser


def add_demo_parser(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help=BY_NAME["demo"].help,
        description="Seed synthetic datasets, start the emulator with AEP's windows shortened, "
        "drop the sample jobs into a spool, run the daemon until each has its result, stop it "
        "with SIGTERM and print what landed where. Takes about ten seconds; needs no Adobe "
        "account.",
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        help="where the demo keeps its data (default %(default)s; wiped first)",
    )
    demo.add_argument(
        "--jobs",
        type=Path,
        default=Path("config/jobs"),
        help="folder of sample job files (default %(default)s)",
    )
    demo.set_defaults(func=lambda args: run_demo(args.workdir, args.jobs))


def run_demo(workdir: Path, jobs: Path) -> int:
    from exporter.demo import main as demo_main

    return demo_main(workdir, jobs)


def chosen(argv: Sequence[str]) -> str | None:
    """The command named on the line: the first word that is not an option (the top level's
    own options, --help and --version, take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def missing_extra(command: Command) -> str | None:
    """One line saying which extra to install, if a module the command needs is absent."""
    missing = [name for name in command.needs if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"error: `aep-exporter {command.name}` needs the [{command.extra}] extra "
        f"(missing: {', '.join(missing)}): pip install 'aep-exporter[{command.extra}]'"
    )


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words:  # a first try: help, not an error
        build_parser([]).print_help()
        return 0
    command = BY_NAME.get(chosen(words) or "")
    if command is not None and (problem := missing_extra(command)):
        print(problem, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    args = build_parser([command.name] if command else []).parse_args(words)
    # Until a command sets up its own: warnings and errors to stderr, never a log line on
    # stdout, where `--json` and listings print what scripts read.
    from exporter.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    code: int = args.func(args)
    return code
