"""The `aep-exporter` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from aep_emulator import cli as emulator_cli
from exporter import __version__, lanes_cli, oneshot
from exporter.daemon import cli as daemon_cli
from exporter.ops import probe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aep-exporter",
        description="Export Adobe Experience Platform datasets to cloud storage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    emulator_cli.add_parser(sub)
    oneshot.add_parser(sub)
    daemon_cli.add_parsers(sub)
    probe.add_parser(sub)
    lanes_cli.add_parser(sub)
    demo = sub.add_parser("demo", help="run the daemon on the sample jobs against a local emulator")
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
    return parser


def run_demo(workdir: Path, jobs: Path) -> int:
    from exporter.demo import main as demo_main

    return demo_main(workdir, jobs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
