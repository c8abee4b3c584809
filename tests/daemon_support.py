"""Running `aep-exporter run` as a child process against an in-process emulator."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles

from aep_emulator.settings import DEFAULT_CLIENT_ID, DEFAULT_ORG_ID
from aep_emulator.state import EmulatorState
from exporter.clock import Clock
from exporter.daemon.core import Daemon
from exporter.ops.systemd import VARIABLES as NOTIFY_VARIABLES
from exporter.settings import Settings
from exporter.sources.spool import Spool, SpoolIntake
from tests.conftest import EMULATOR_SECRET


def write_config(folder: Path, url: str, **sections: dict[str, Any]) -> Path:
    """A daemon config for the emulator at `url`; `sections` override keys per section."""
    (folder / "client_secret").write_text(EMULATOR_SECRET)
    base: dict[str, dict[str, Any]] = {
        "aep": {
            "platform_url": url,
            "ims_url": url,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret_file": "client_secret",
            "org_id": DEFAULT_ORG_ID,
            "rate_limit_rps": 200,
            "max_concurrency": 32,
        },
        "engine": {
            "not_ready_wait_s": 0.3,
            "not_ready_retry_s": 0.2,
            "not_ready_retry_max_s": 1,
            "poll_min_s": 0.2,
            "poll_max_s": 1,
            "status_unreadable_s": 120,
        },
        "daemon": {
            "state_dir": "state",
            "spool_dir": "spool",
            "rescan_s": 0.5,
            "max_in_flight": 100,
            "shutdown_grace_s": 2,
        },
        "log": {"format": "json", "level": "info"},
        "admin": {"port": 0},  # several daemons run at once: each takes a free port
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines += ["[destinations.lake]", 'type = "dlz"']
    path = folder / "exporter.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Running:
    """A daemon child process whose JSON log lines are read as they come."""

    proc: asyncio.subprocess.Process
    log: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    async def events(self) -> list[dict[str, Any]]:
        return list(self.lines)

    async def until(self, event: str, *, count: int = 1, deadline_s: float = 60) -> None:
        """Wait until the daemon has logged `event` `count` times."""
        async with asyncio.timeout(deadline_s):
            while sum(1 for e in self.lines if e.get("event") == event) < count:
                if (
                    self.proc.returncode is not None
                    and self._reader is not None
                    and (self._reader.done())
                ):
                    raise AssertionError(f"the daemon exited before logging {event}")
                self._changed.clear()
                await self._changed.wait()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            while line := await self.proc.stdout.readline():
                out.write(line)
                if line.startswith(b"{"):
                    self.lines.append(json.loads(line))
                self._changed.set()
        self._changed.set()


async def start_daemon(
    config: Path, log: Path, env: dict[str, str] | None = None, *, max_files: int | None = None
) -> Running:
    """`env` adds to this process's environment; systemd's notify variables are not passed
    on unless given there (pytest itself may run under systemd). `max_files`: the child's
    RLIMIT_NOFILE (`ulimit -n`)."""

    def limit() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    inherited = {k: v for k, v in os.environ.items() if k not in NOTIFY_VARIABLES}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**inherited, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=limit if max_files is not None else None,  # only setrlimit, before exec
    )
    running = Running(proc, log)
    running._reader = asyncio.create_task(running._read())
    return running


async def kill(running: Running, sig: int = signal.SIGKILL) -> int:
    if running.proc.returncode is None:
        running.proc.send_signal(sig)
    async with asyncio.timeout(30):
        code = await running.proc.wait()
        if running._reader is not None:
            await running._reader
        return code


def drop_job(spool: Path, name: str, job: dict[str, Any]) -> str:
    """Put a job file into incoming/ the way producers should: write aside, then rename."""
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / f".{name}.tmp").write_text(json.dumps(job))
    (incoming / f".{name}.tmp").rename(incoming / name)
    return name


def results(spool: Path) -> dict[str, dict[str, Any]]:
    """Result files by job file name, from done/, failed/ and rejected/."""
    found = {}
    for folder in ("done", "failed", "rejected"):
        for path in (spool / folder).glob("*.result.json"):
            found[path.name.removesuffix(".result.json")] = json.loads(path.read_text())
    return found


async def until_results(spool: Path, names: Iterable[str], *, deadline_s: float) -> None:
    """Wait (on filesystem events, not a timer) until every job in `names` has a result."""
    wanted = set(names)
    for folder in ("done", "failed", "rejected"):
        (spool / folder).mkdir(parents=True, exist_ok=True)
    async with asyncio.timeout(deadline_s):
        if wanted <= set(results(spool)):
            return
        async for _ in watchfiles.awatch(
            *(spool / f for f in ("done", "failed", "rejected")),
            debounce=100,
            step=50,
            recursive=False,
        ):
            if wanted <= set(results(spool)):
                return


def runs_by_dataset(state: EmulatorState) -> Counter[str]:
    """Runs the emulator started, by dataset (a batched trigger starts several at once)."""
    return Counter(run.dataset_id for run in state.all_runs())


def triggers_by_job(state: EmulatorState) -> Counter[str]:
    """Runs the emulator started, by the job id in the x-request-id of the trigger that
    started each (whether or not its answer reached the client)."""
    return Counter(run.request_id.rsplit(".", 1)[0] for run in state.all_runs())


@asynccontextmanager
async def daemon_process(config: Path, log: Path) -> AsyncIterator[Running]:
    running = await start_daemon(config, log)
    try:
        yield running
    finally:
        if running.proc.returncode is None:
            await kill(running)


def spool_daemon(settings: Settings, *, clock: Clock, **options: Any) -> Daemon:
    """An in-process daemon with its spool intake (as `build_daemon` makes it) and no other
    service: tests add the ones they need."""
    daemon = Daemon(settings, clock=clock, **options)
    daemon.add_service(SpoolIntake(daemon.admissions))
    return daemon


def intake_of(daemon: Daemon) -> SpoolIntake:
    """A daemon's spool intake."""
    (intake,) = (s for s in daemon.services if isinstance(s, SpoolIntake))
    return intake


def spool_of(daemon: Daemon) -> Spool:
    """The spool folders of a daemon's spool intake."""
    return intake_of(daemon).spool
