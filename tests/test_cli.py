"""The top-level command: it lists every command without importing them, imports only the one
asked for, and says in one line which extra to install when that one needs a missing extra."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import COMMANDS, EMULATOR_NEEDS, build_parser, main

# Modules a bare `aep-exporter --help` has no use for (each costs tens of milliseconds or more).
HEAVY = (
    *("aiohttp", "pydantic", "structlog", "rich", "yaml", "watchfiles", "apscheduler"),
    *("redis", "prometheus_client", "pyarrow", "jsonschema", "duckdb", "aep_emulator"),
)
EXTRA_ONLY = ("pyarrow", "jsonschema", "duckdb")


def test_the_lazy_listing_is_the_one_the_commands_modules_give() -> None:
    """Names, order and one-line help in the table match what the modules register."""
    assert build_parser([]).format_help() == build_parser().format_help()


def test_a_chosen_command_gets_its_full_parser_and_the_others_stay_unloaded() -> None:
    args = build_parser(["probe"]).parse_args(["probe", "--ready"])
    assert args.ready is True
    with pytest.raises(SystemExit):
        build_parser(["probe"]).parse_args(["status", "--config", "x.toml"])  # a stub only


def python(
    script: str, tmp_path: Path, blocked: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter where the `blocked` modules cannot be imported: a
    sitecustomize on PYTHONPATH sets them to None in sys.modules before anything runs, as if
    the extra that brings them were not installed."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), *sys.path]))}
    return subprocess.run(  # noqa: S603 - a fixed script
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


@pytest.mark.slow
def test_help_imports_no_command_module_nor_heavy_library(tmp_path: Path) -> None:
    result = python(
        "import sys\n"
        "from exporter.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))\n"
        "print(sorted(n for n in sys.modules if n.startswith('exporter.')))\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    heavy, ours = result.stdout.splitlines()[-2:]
    assert heavy == "[]"
    assert ours == "['exporter.cli']"


@pytest.mark.slow
def test_the_health_probe_loads_no_http_client_nor_engine(tmp_path: Path) -> None:
    """The container's health check runs `probe` every 30 s: it asks over urllib, so loading
    aiohttp and the export engine would only slow every check down."""
    result = python(
        "import sys\n"
        "import exporter.ops.probe\n"
        "print(sorted(n for n in ('aiohttp', 'exporter.engine.engine', 'exporter.aep.client',"
        " 'exporter.oneshot') if n in sys.modules))\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def command_script(*args: str) -> str:
    """A script running the console script's entry point as `aep-exporter *args`."""
    return (
        f"import sys\nfrom exporter.cli import main\nsys.argv[1:] = {list(args)!r}\n"
        "sys.exit(main())\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "blocked"),
    [
        (("emulator", "--port", "0"), EXTRA_ONLY),  # pip install aep-exporter, no extra
        (("emulator", "seed", "--count", "1"), ("pyarrow",)),
        (("demo",), ("jsonschema",)),
        (("emulator", "--help"), ("aep_emulator", *EXTRA_ONLY)),  # the image: no emulator code
    ],
)
def test_the_emulator_without_its_extra_says_which_to_install_in_one_line(
    tmp_path: Path, args: tuple[str, ...], blocked: tuple[str, ...]
) -> None:
    probe = python("import " + ", ".join(blocked), tmp_path, blocked)
    assert probe.returncode != 0, "the blocked modules must really be unimportable"
    result = python(command_script(*args), tmp_path, blocked)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: `aep-exporter {args[0]}` needs the [emulator] extra")
    assert line.endswith("pip install 'aep-exporter[emulator]'")
    for name in blocked:
        assert name in line
    assert set(blocked) <= set(EMULATOR_NEEDS)


@pytest.mark.slow
def test_the_runtime_commands_need_nothing_from_the_emulator_extra(tmp_path: Path) -> None:
    """Without pyarrow, jsonschema and the emulator's code, every other command loads."""
    runtime = [c.name for c in COMMANDS if not c.extra]
    assert {"export", "run", "status", "validate", "probe", "lanes"} <= set(runtime)
    script = (
        "import contextlib, io, sys\n"
        "from exporter.cli import main\n"
        f"for name in {runtime!r}:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            main([name, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (name, exc.code)\n"
        "    assert out.getvalue().startswith(f'usage: aep-exporter {name} '), out.getvalue()\n"
        "print('ok')\n"
    )
    result = python(script, tmp_path, ("aep_emulator", *EXTRA_ONLY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_bare_command_prints_help_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: aep-exporter")
    assert all(command.name in out for command in COMMANDS)


def test_every_command_describes_itself_in_its_help() -> None:
    for command in COMMANDS:
        parser = subparsers(build_parser([command.name]))[command.name]
        assert parser.description, f"`aep-exporter {command.name} --help` has no description"


def test_export_help_shows_the_defaults() -> None:
    text = " ".join(subparsers(build_parser(["export"]))["export"].format_help().split())
    for default in ("default parquet", "default gzip", "default once", "4 credentials refused"):
        assert default in text, default
