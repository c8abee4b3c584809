"""Packaging: the Dockerfile, the wheel it installs, the systemd unit, the example config.

No Docker engine is needed: the Dockerfile is parsed and its essentials asserted, and the
wheel is built from exactly the files its builder stage copies. The systemd checks run
`systemd-analyze` when it is installed (it works on unit files offline) and skip otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from exporter import __version__
from exporter.aep.config import AepConfig
from exporter.cli import build_parser
from exporter.daemon.config import (
    AdminConfig,
    DaemonConfig,
    LogConfig,
    RedisConfig,
    ScheduleConfig,
)
from exporter.daemon.core import EXIT_CONFIG
from exporter.engine.config import EngineConfig
from exporter.ops.probe import cmd_probe
from exporter.ops.systemd import STATUS_EVERY_S
from exporter.settings import SECRET_NAME, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "config" / "aep-exporter.service"
EXAMPLE = ROOT / "config" / "exporter.toml"
SYSTEM_CONFIG = "/etc/aep-exporter/exporter.toml"
MAX_EXPOSURE = 2.0


# -- the Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT, CMD or HEALTHCHECK CMD."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.args}"
        return [str(v) for v in value]


def parse_dockerfile(path: Path) -> list[list[Instruction]]:
    """Instructions grouped by stage: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[list[Instruction]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(args.split()))
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE)


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def env(stage: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def test_the_image_is_built_in_stages_on_python_3_11_slim(
    stages: list[list[Instruction]],
) -> None:
    assert len(stages) >= 2
    images = [s[0].args.split()[0] for s in stages]
    assert all(
        re.fullmatch(r"python:3\.11-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", i) for i in images
    ), images
    builder, runtime = stages[0], stages[-1]
    assert re.search(r"\bAS builder$", builder[0].args, re.IGNORECASE)
    assert "AS " not in runtime[0].args.upper(), "the runtime stage is the last, unnamed one"
    assert any("pip wheel" in i.args for i in builder if i.keyword == "RUN")
    copies = [i.args for i in runtime if i.keyword == "COPY"]
    assert copies == ["--from=builder /opt/aep-exporter /opt/aep-exporter"], (
        "the runtime stage takes the built environment and nothing from the build context"
    )


def test_the_runtime_stage_installs_no_compiler_and_builds_nothing(
    stages: list[list[Instruction]],
) -> None:
    runs = " ".join(i.args for i in stages[-1] if i.keyword == "RUN")
    for word in ("apt-get install", "gcc", "build-essential", "pip wheel", "pip install"):
        assert word not in runs


def test_pip_never_keeps_a_cache(stages: list[list[Instruction]]) -> None:
    runs = [i.args for stage in stages for i in stage if i.keyword == "RUN"]
    pip_commands = [part for run in runs for part in run.split("&&") if " pip " in part]
    assert pip_commands
    for command in pip_commands:
        assert "--no-cache-dir" in command, command


def test_the_daemon_runs_as_a_fixed_numeric_non_root_user(
    stages: list[list[Instruction]],
) -> None:
    user = [i.args for i in stages[-1] if i.keyword == "USER"]
    assert user, "no USER: the container would run as root"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user[-1])
    assert match, f"USER {user[-1]} is not numeric (runAsNonRoot cannot check a name)"
    assert int(match[1]) != 0
    assert match[2] is None or int(match[2]) != 0


def test_state_lives_on_a_volume_where_the_daemon_keeps_it(
    stages: list[list[Instruction]],
) -> None:
    runtime = stages[-1]
    volume = only(runtime, "VOLUME")
    volumes = json.loads(volume.args) if volume.args.startswith("[") else volume.args.split()
    defaults = DaemonConfig()
    assert volumes == [str(defaults.state_dir)]
    assert defaults.spool_dir.is_relative_to(defaults.state_dir)
    assert only(runtime, "WORKDIR").args == str(defaults.state_dir)
    prepared = " ".join(i.args for i in runtime if i.keyword == "RUN")
    assert f"-o 10001 -g 10001 {defaults.spool_dir}/incoming" in prepared


def test_the_image_suits_a_read_only_root_file_system(stages: list[list[Instruction]]) -> None:
    values = env(stages[-1])
    assert values["PYTHONDONTWRITEBYTECODE"] == "1"
    assert values["HOME"] == "/tmp"  # noqa: S108 - a tmpfs in a read-only container
    assert values["EXPORTER_CONFIG"] == SYSTEM_CONFIG
    assert values["PATH"].startswith("/opt/aep-exporter/bin:")


def test_entrypoint_is_the_console_script_and_cmd_is_one_of_its_commands(
    stages: list[list[Instruction]],
) -> None:
    runtime = stages[-1]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert only(runtime, "ENTRYPOINT").exec_form() == ["aep-exporter"]
    assert scripts["aep-exporter"] == "exporter.cli:main"
    cmd = only(runtime, "CMD").exec_form()
    assert cmd == ["run"]
    listed = commands_in_help()
    assert cmd[0] in listed, f"{cmd[0]!r} is not among `aep-exporter --help` commands {listed}"


def commands_in_help() -> list[str]:
    script = Path(sys.executable).with_name("aep-exporter")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "exporter"]
    out = subprocess.run(  # noqa: S603 - fixed arguments
        [*argv, "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    block = out.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^\s{4}(\w[\w-]*)\s", block, re.MULTILINE)


def test_the_healthcheck_runs_a_command_that_exists(stages: list[list[Instruction]]) -> None:
    check = only(stages[-1], "HEALTHCHECK")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in check.args
    argv = check.exec_form()
    assert argv[0] == "aep-exporter"
    assert argv[1] in commands_in_help()
    assert build_parser().parse_args(argv[1:]).func is cmd_probe


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative, with /) out of the context: the last pattern
    matching it or one of its parent folders decides; `!` patterns take files back."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, c) for c in candidates):
            verdict = not negate
    return verdict


def dockerignore() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def copied_sources(stages: list[list[Instruction]]) -> list[str]:
    """What the builder stage copies from the build context."""
    sources: list[str] = []
    for instruction in stages[0]:
        if instruction.keyword == "COPY" and not instruction.args.startswith("--from"):
            sources += instruction.args.split()[:-1]
    return sources


def test_dockerignore_keeps_the_context_to_what_the_build_copies(
    stages: list[list[Instruction]],
) -> None:
    patterns = dockerignore()
    sources = copied_sources(stages)
    # The runtime only, and the license its wheel carries (`license-files`).
    assert sources == ["pyproject.toml", "README.md", "LICENSE", "exporter"]
    for source in [*sources, "exporter/cli.py", "exporter/py.typed", "exporter/sources/spool.py"]:
        assert not ignored(source, patterns), source
    for junk in (
        "aep_emulator/app.py",
        ".venv/bin/python",
        ".git/HEAD",
        ".demo/x",
        ".aep-emulator/datalake/x",
        ".coverage",
        ".mypy_cache/x",
        ".hypothesis/x",
        "tests/aep_schemas.json",
        "bench/results/x.json",
        "exporter/__pycache__/cli.cpython-311.pyc",
        "config/exporter.toml",
        "aep_exporter.egg-info/PKG-INFO",
        "Dockerfile",
    ):
        assert ignored(junk, patterns), junk


# -- the wheel --------------------------------------------------------------------------------


def context_files(stages: list[list[Instruction]]) -> Iterator[Path]:
    """The repository files the builder stage receives (copied sources, less .dockerignore)."""
    patterns = dockerignore()
    for source in copied_sources(stages):
        path = ROOT / source
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and not ignored(relative, patterns):
                yield file


def test_the_image_installs_the_runtime_and_the_redis_extra_not_the_emulator(
    stages: list[list[Instruction]],
) -> None:
    runs = [i.args for i in stages[0] if i.keyword == "RUN"]
    (install,) = [
        part for run in runs for part in run.split("&&") if " pip " in part and "install" in part
    ]
    # The wheel is named through a variable, `"${wheel}[${EXTRAS}]"`: the brackets are no glob.
    assert any('wheel="$(echo /dist/aep_exporter-*.whl)"' in run for run in runs)
    assert re.findall(r"\$\{wheel\}\[([^\]]+)\]", install) == ["${EXTRAS}"], install
    (default,) = [i.args for i in stages[0] if i.keyword == "ARG" and i.args.startswith("EXTRAS=")]
    assert default == "EXTRAS=redis"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = declared["optional-dependencies"]
    assert "redis" in extras
    # What the Dockerfile offers as a build argument exists and is runtime, not a test tool.
    offered = re.search(r"--build-arg EXTRAS=([a-z,]+)", DOCKERFILE.read_text())
    assert offered is not None
    for extra in offered.group(1).split(","):
        assert extra in extras
        assert extra not in {"emulator", "test", "dev", "bench"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_runtime_dependencies_leave_the_emulator_and_redis_to_their_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    # obstore and asyncssh: the emulator's writes to storage servers (--storage-endpoint);
    # duckdb: its Query Service.
    assert requirement_names(extras["emulator"]) == {
        "pyarrow",
        "jsonschema",
        "obstore",
        "asyncssh",
        "duckdb",
    }
    assert requirement_names(extras["redis"]) == {"redis"}
    assert not runtime & {"pyarrow", "jsonschema", "duckdb", "redis"}, runtime
    (self_reference,) = [r for r in extras["dev"] if r.startswith("aep-exporter[")]
    assert {"test", "emulator", "redis"} <= set(self_reference[13:-1].split(","))


def test_delivery_verification_is_an_extra_that_dev_pulls_in() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert requirement_names(extras["delivery"]) == {"obstore", "asyncssh"}
    assert not requirement_names(project["dependencies"]) & {"obstore", "asyncssh"}
    (self_reference,) = [r for r in extras["dev"] if r.startswith("aep-exporter[")]
    assert "delivery" in self_reference[13:-1].split(",")


def build_wheel(context: Path, dist: Path) -> Path:
    """The wheel pip builds from `context`; the build must print no deprecation warning
    (setuptools' banner for the old `project.license` table came three times per install)."""
    built = subprocess.run(  # noqa: S603 - fixed arguments
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(dist),
            ".",
        ],
        cwd=context,
        check=False,
        timeout=50,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    warnings = [line for line in built.stderr.splitlines() if "Warning" in line]
    assert warnings == [], built.stderr
    (wheel,) = dist.glob("aep_exporter-*-py3-none-any.whl")
    return wheel


def copy_files(files: Iterator[Path], context: Path) -> None:
    for file in files:
        target = context / file.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)


@pytest.mark.slow
def test_the_wheel_builds_from_the_docker_context_with_the_runtime_and_the_script(
    stages: list[list[Instruction]], tmp_path: Path
) -> None:
    context = tmp_path / "src"
    copy_files(context_files(stages), context)
    wheel = build_wheel(context, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = archive.read(metadata).decode()
    modules = {n for n in names if n.endswith(".py")}
    expected = {p.relative_to(context).as_posix() for p in (context / "exporter").rglob("*.py")}
    assert modules == expected, "every module of the runtime, and nothing else"
    for module in ("exporter/cli.py", "exporter/daemon/cli.py", "exporter/settings.py"):
        assert module in names
    lua = {p.relative_to(context).as_posix() for p in (context / "exporter").rglob("*.lua")}
    assert lua, "the Redis store's scripts are in the context"
    assert lua <= names, "the Redis store's Lua scripts ship as package data"
    templates = {p.relative_to(context).as_posix() for p in (context / "exporter").rglob("*.html")}
    assert "exporter/ops/templates/status.html" in templates
    assert templates <= names, "the status page's templates ship as package data"
    assert not any(n.startswith("aep_emulator/") for n in names), "the image has no emulator"
    assert "exporter/py.typed" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    assert re.search(
        r"^\[console_scripts\]\naep-exporter = exporter\.cli:main$", scripts, re.MULTILINE
    ), scripts
    assert "Name: aep-exporter" in meta
    assert f"Version: {__version__}" in meta.splitlines(), "read from exporter/__init__.py"
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the license ships"
    assert "Requires-Python: >=3.11" in meta
    requires = re.findall(r"^Requires-Dist: (.+)$", meta, re.MULTILINE)
    unconditional = requirement_names([r for r in requires if "extra ==" not in r])
    assert "aiohttp" in unconditional
    assert not unconditional & {"pyarrow", "jsonschema", "duckdb", "redis"}, unconditional
    for name, extra in (
        ("pyarrow", "emulator"),
        ("jsonschema", "emulator"),
        ("duckdb", "emulator"),
        ("redis", "redis"),
    ):
        assert any(r.startswith(name) and re.search(rf"extra == .{extra}.", r) for r in requires), (
            name,
            requires,
        )


@pytest.mark.slow
def test_the_wheel_from_the_repository_carries_the_emulator_for_its_extra(
    tmp_path: Path,
) -> None:
    """`pip install 'aep-exporter[emulator]'` must find the emulator's code in the wheel."""
    context = tmp_path / "src"
    sources = [ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "LICENSE"]
    for package in ("exporter", "aep_emulator"):
        sources += [p for p in (ROOT / package).rglob("*") if "__pycache__" not in p.parts]
    copy_files((p for p in sources if p.is_file()), context)
    wheel = build_wheel(context, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    emulator = {p.relative_to(context).as_posix() for p in (context / "aep_emulator").rglob("*.py")}
    assert emulator <= names
    assert "aep_emulator/cli.py" in emulator


# -- the systemd unit -------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; a key given more than once keeps every value, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT)["Service"]


def test_the_unit_starts_the_daemon_with_the_system_config(service: dict[str, list[str]]) -> None:
    (exec_start,) = service["ExecStart"]
    program, *args = exec_start.split()
    assert program.endswith("/bin/aep-exporter")
    assert args == ["run", "--config", SYSTEM_CONFIG]
    # The daemon itself (the main process) notifies: tests/test_systemd.py checks what it says.
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]


def test_the_unit_reloads_with_sighup_and_has_the_daemon_watched(
    service: dict[str, list[str]],
) -> None:
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (watchdog,) = service["WatchdogSec"]
    # A ping goes every STATUS_EVERY_S (or half the timeout, if shorter): a few may be late
    # (a long collection, a slow moment) before systemd calls the daemon hung.
    assert watchdog.endswith("s")
    assert float(watchdog.removesuffix("s")) >= 4 * STATUS_EVERY_S


@pytest.mark.usefixtures("clean_environment")
def test_the_unit_gives_the_daemon_its_state_and_secret_where_settings_look(
    service: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service["StateDirectory"] == ["aep-exporter"]
    assert service["LoadCredential"] == [f"{SECRET_NAME}:/etc/aep-exporter/client_secret"]
    environment = dict(v.split("=", 1) for v in service["Environment"])
    assert environment["EXPORTER_DAEMON__STATE_DIR"] == "%S/aep-exporter"
    assert environment["EXPORTER_DAEMON__SPOOL_DIR"] == "%S/aep-exporter/spool"
    # Those variables are settings the daemon reads, over the file: %S is /var/lib.
    state = tmp_path / "var-lib"
    for name, value in environment.items():
        if name.startswith("EXPORTER_"):
            monkeypatch.setenv(name, value.replace("%S", str(state)))
    settings = load_settings(example_copy(tmp_path), credentials_directory=str(tmp_path / "creds"))
    assert settings.daemon.state_dir == state / "aep-exporter"
    assert settings.daemon.spool_dir == state / "aep-exporter" / "spool"
    # For a system service %S is /var/lib: the same folders as the defaults (and the image's).
    assert Path("/var/lib", service["StateDirectory"][0]) == DaemonConfig().state_dir


def test_the_unit_stops_after_the_grace_period_and_does_not_restart_on_bad_config(
    service: dict[str, list[str]],
) -> None:
    assert service["KillSignal"] == ["SIGTERM"]
    (timeout,) = service["TimeoutStopSec"]
    assert float(timeout) > DaemonConfig().shutdown_grace_s
    assert service["Restart"] == ["on-failure"]
    assert str(EXIT_CONFIG) in service["RestartPreventExitStatus"][0].split()


def test_the_unit_is_hardened(service: dict[str, list[str]]) -> None:
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert service[key] == [value], key
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "IPAddressDeny" not in service, "the daemon must reach Adobe's hosts"


def systemd_analyze() -> str:
    """The path of systemd-analyze, if it can judge unit files offline (systemd 250+)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    version = subprocess.run(  # noqa: S603 - fixed arguments
        [path, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    found = re.match(r"systemd (\d+)", version)
    if found is None or int(found[1]) < 250:
        pytest.skip(f"systemd-analyze {found[1] if found else '?'} has no --offline (needs 250+)")
    return path


def test_the_units_exposure_is_at_most_2() -> None:
    analyze = systemd_analyze()
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [
            analyze,
            "security",
            "--offline=true",
            f"--threshold={MAX_EXPOSURE * 10:.0f}",
            "--no-pager",
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = re.search(
        r"Overall exposure level for aep-exporter\.service: (\d+\.\d+)", result.stdout
    )
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stderr


def test_the_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` in a scratch root holding the host's targets and stand-ins
    for the programs at ExecStart= and ExecReload= (verify insists that they exist). Any
    warning fails."""
    analyze = systemd_analyze()
    units = next(
        (
            d
            for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
            if (d / "sysinit.target").is_file()
        ),
        None,
    )
    if units is None:
        pytest.skip("no systemd unit folder with sysinit.target on this machine")
    root = tmp_path / "root"
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    for target in units.glob("*.target"):
        shutil.copy(target, root / "usr/lib/systemd/system" / target.name)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    for command in ("ExecStart", "ExecReload"):
        program = root / parse_unit(UNIT)["Service"][command][0].split()[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [analyze, "verify", f"--root={root}", "--man=no", "--generators=no", UNIT.name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


# -- the example configuration ----------------------------------------------------------------

SECTIONS: dict[str, type[BaseModel]] = {
    "aep": AepConfig,
    "engine": EngineConfig,
    "daemon": DaemonConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "redis": RedisConfig,  # optional: shown commented out, header included
    "schedules": ScheduleConfig,  # `# [[schedules]]`: an example block
}
# A secret never goes in the file: the file holding it does (section: field, its file key).
SECRET_FILES = {
    "aep": ("client_secret", "client_secret_file"),
    "admin": ("token", "token_file"),
    "redis": ("password", "password_file"),
}
# Values a schedule must be given (its name, its trigger, its job): the example's own.
EXAMPLE_VALUES = {"schedules": {"name", "cron", "job"}, "engine": {"queries_dir"}}
# The example shows one trigger, cron; the other, which excludes it, is named in its prose.
ALTERNATIVES = {"schedules": {"interval_s"}}
HEADER = re.compile(r"(?:#\s*)?\[\[?([A-Za-z0-9_.-]+)\]\]?")
FAKE_SECRETS = {
    "s3-secret-access-key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "azure-blob-connection-string": "DefaultEndpointsProtocol=https;AccountName=acme;"
    "AccountKey=ZmFrZQ==;EndpointSuffix=core.windows.net",
    "adls-service-principal-key": "fake-service-principal-key",
    "gcs-hmac-secret": "fake-hmac-secret",
    # A fake OpenSSH private key file, Base64-encoded as AEP (and the daemon) take it.
    "sftp-ssh-key": "LS0tLS1CRUdJTiBPUEVOU1NIIFBSSVZBVEUgS0VZLS0tLS0KWm1GclpTQnJaWGs9Ci0tLS"
    "0tRU5EIE9QRU5TU0ggUFJJVkFURSBLRVktLS0tLQo=",
}


def example_copy(folder: Path) -> Path:
    """The example beside fake versions of the secret files it names, and a credentials
    folder with the AEP client secret (what systemd's LoadCredential= provides)."""
    config = folder / "exporter.toml"
    shutil.copy(EXAMPLE, config)
    (folder / "secrets").mkdir()
    for name, value in FAKE_SECRETS.items():
        (folder / "secrets" / name).write_text(value + "\n")
    (folder / "creds").mkdir()
    (folder / "creds" / SECRET_NAME).write_text("fake-client-secret\n")
    return config


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXPORTER_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
def test_the_example_config_loads_with_every_kind_of_destination(tmp_path: Path) -> None:
    settings = load_settings(example_copy(tmp_path), credentials_directory=str(tmp_path / "creds"))
    assert settings.aep.platform_url == "https://platform.adobe.io"
    assert settings.aep.ims_url == "https://ims-na1.adobelogin.com"
    assert settings.aep.client_secret.get_secret_value() == "fake-client-secret"
    kinds = sorted(d.type for d in settings.destinations.values())
    assert kinds == ["adls_gen2", "azure_blob", "dlz", "gcs", "s3", "sftp"]
    secrets = [
        value.get_secret_value()
        for destination in settings.destinations.values()
        for value in destination.__dict__.values()
        if hasattr(value, "get_secret_value")
    ]
    assert sorted(secrets) == sorted(FAKE_SECRETS.values()), "each secret from its file"
    assert settings.daemon == DaemonConfig()
    assert settings.log == LogConfig()


@pytest.mark.usefixtures("clean_environment")
def test_the_example_redis_section_uncommented_loads_with_its_defaults(tmp_path: Path) -> None:
    config = example_copy(tmp_path)
    text = config.read_text()
    block = text[text.index("# [redis]") :]
    block = block[: block.index("\n[")]  # up to the next live section
    lines = [
        line.removeprefix("# ")
        for line in block.splitlines()
        if line == "# [redis]" or re.fullmatch(r"# [a-z_]+ = .+", line)
    ]
    assert lines[0] == "[redis]"
    lines.remove('consumer = "<the host name>"')  # a placeholder for the default
    (tmp_path / "secrets" / "redis-password").write_text("fake-redis-password\n")
    config.write_text(text + "\n" + "\n".join(lines) + "\n")
    settings = load_settings(config, credentials_directory=str(tmp_path / "creds"))
    assert settings.redis == RedisConfig(password=SecretStr("fake-redis-password"))
    assert settings.redis.consumer == socket.gethostname()


def documented(text: str) -> dict[str, dict[str, Any]]:
    """Per section, the keys the example sets and the `# key = value` lines it shows. A
    commented header (`# [redis]`, `# [[schedules]]`) opens its section like a live one."""
    found: dict[str, dict[str, Any]] = {}
    section: dict[str, Any] = {}
    for raw in text.splitlines():
        line = raw.strip()
        header = HEADER.fullmatch(line)
        if header:
            section = found.setdefault(header[1], {})
            continue
        match = re.fullmatch(r"#?\s*([a-z_]+) = (.+)", line)
        if match:
            section.update(tomllib.loads(f"{match[1]} = {match[2]}"))
    return found


def test_commented_headers_open_their_section() -> None:
    shown = documented(
        "[a]\n# x = 1\n# [b]\n# y = 2\n# [[c]]\n# z = 3\n#  [not a header\n# w = 4\n"
    )
    assert shown == {"a": {"x": 1}, "b": {"y": 2}, "c": {"z": 3, "w": 4}}


def test_the_example_documents_every_setting_with_its_true_default() -> None:
    text = EXAMPLE.read_text()
    shown = documented(text)
    active = tomllib.loads(text)
    assert "redis" not in active, "optional: commented out"
    assert "schedules" not in active, "optional: commented out"
    for name, model in SECTIONS.items():
        expected = set(model.model_fields) - ALTERNATIVES.get(name, set())
        secret, secret_file = SECRET_FILES.get(name, ("", ""))
        if secret:
            expected = expected - {secret} | {secret_file}
        assert set(shown[name]) == expected, f"[{name}]"
        for key in ALTERNATIVES.get(name, ()):
            assert f"`{key}`" in text, f"[{name}] {key} is not mentioned"
        for key, value in shown[name].items():
            if key == secret_file or key in active.get(name, {}):
                continue
            if key in EXAMPLE_VALUES.get(name, ()):
                continue
            field = model.model_fields[key]
            if field.default_factory is not None:  # e.g. the host name: said, not shown
                assert re.fullmatch(r"<[^<>]+>", value), f"[{name}] {key}: {value!r}"
                continue
            default = field.default
            if isinstance(default, Path):
                default = str(default)
            elif isinstance(default, tuple):
                default = list(default)
            assert value == default, (
                f"[{name}] {key}: the example says {value!r}, the code {default!r}"
            )
