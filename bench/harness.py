"""What the benchmarks share: the emulator and the daemon as child processes (and the
emulator's control API, the daemon's configuration and spool), stopping processes, what
/proc says about CPU, memory and the machine, and the figures' rounding.

The benchmarks run as scripts (`python bench/<name>.py`), so this module is imported as
`harness` from the script's own folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from aep_emulator.settings import DEFAULT_CLIENT_ID, DEFAULT_ORG_ID, SECRET_FILE, new_secret
from exporter.aep.config import AepConfig
from exporter.aep.facts import IMS_TOKEN_PATH

HOST = "127.0.0.1"
STARTUP_DEADLINE = 30.0
STOP_DEADLINE = 10.0
DAEMON_STARTUP_DEADLINE = 60.0
RESULT_FOLDERS = ("done", "failed", "rejected")  # of the daemon's spool
TICKS = os.sysconf("SC_CLK_TCK")
CLIENT_SECRET = new_secret()
"""The client secret of every emulator a benchmark starts (written to its data folder, where
the emulator reads it), made at random for this run."""
MODULE = ("-m", "exporter")  # how the emulator is launched: `python -m exporter emulator …`

Report = dict[str, Any]


class BenchError(RuntimeError):
    """The benchmark could not run."""


# -- /proc ---------------------------------------------------------------------------------


def cpu_of(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5); the split starts at field 3.
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None when it is gone)."""
    try:
        return sum(cpu_of(pid))
    except OSError:
        return None


def memory_of(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of a process in MB (10^6 bytes), from /proc/<pid>/status."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = round(int(value.split()[0]) * 1024 / 1e6, 1)
    return found


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine have spent busy (or stolen by the host) since
    boot, from /proc/stat: less what the benchmark's own processes took, it is what anything
    else running on the machine took."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / TICKS


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have ended and been
    waited for (an emulator, a load generator)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> Report:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


def threads_of(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread (the event loop) and of all other threads, and the
    main thread's voluntary context switches: how often the event loop slept and woke."""
    main = other = 0.0
    wakeups = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we look
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / TICKS
            if task.name == str(pid):
                main = used
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        wakeups = int(line.split()[1])
            else:
                other += used
    return {"main_cpu_s": main, "other_cpu_s": other, "main_wakeups": float(wakeups)}


# -- child processes -----------------------------------------------------------------------


async def stop_process(proc: asyncio.subprocess.Process, deadline: float = STOP_DEADLINE) -> int:
    """SIGTERM, then SIGKILL after `deadline` seconds; the exit code (negative: a signal)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(deadline):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        return await proc.wait()


@dataclass
class Emulator:
    proc: asyncio.subprocess.Process
    url: str = ""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    async def drain(self) -> None:
        """Keep reading the emulator's output so that a full pipe never blocks it."""
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def running_emulator(
    knobs: Sequence[str],
    *,
    seed: int | None = None,
    data_dir: Path | None = None,
    launcher: Sequence[str] = MODULE,
) -> AsyncIterator[Emulator]:
    """`python -m exporter emulator --host 127.0.0.1 --port 0 <knobs>` as a child process,
    ready once it says "listening on"; stopped (SIGTERM, then SIGKILL after 10 s) when the
    block ends, however it ends. Without `data_dir`, a temporary folder is made for its data
    and removed afterwards. `launcher` replaces `-m exporter` (e.g. `-c <code>`)."""
    own = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="bench-emulator-")) if data_dir is None else data_dir
    seeded = ["--seed", str(seed)] if seed is not None else []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SECRET_FILE).write_text(CLIENT_SECRET + "\n")
    proc: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *launcher,
            "emulator",
            "--host",
            HOST,
            "--port",
            "0",
            "--data-dir",
            str(folder),
            *seeded,
            *knobs,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        emulator = Emulator(proc)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(STARTUP_DEADLINE):
                while line := (await proc.stdout.readline()).decode(errors="replace"):
                    emulator.output.append(line.rstrip())
                    if "listening on " in line:
                        emulator.url = line.split("listening on ", 1)[1].split()[0]
                        break
        except TimeoutError:
            raise BenchError("the emulator did not start listening in time") from None
        if not emulator.url:
            raise BenchError("the emulator exited before listening:\n" + "\n".join(emulator.output))
        if urlsplit(emulator.url).hostname != HOST:
            raise BenchError(f"the emulator listens on {emulator.url}, not on {HOST}")
        drain = asyncio.create_task(emulator.drain())
        yield emulator
    finally:
        if proc is not None:
            await stop_process(proc)
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        if own:
            shutil.rmtree(folder, ignore_errors=True)


# -- the emulator's control API and the exporter's settings for it -------------------------


class Control:
    """The emulator's control API (`/_emulator`): datasets, its journal, requests served."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body) as resp:
            answer = await resp.json(content_type=None)
            if resp.status >= 300:
                raise BenchError(f"{method} {path} -> {resp.status}: {answer}")
            return answer

    async def seed(self, count: int, rows: int, name: str = "bench") -> list[str]:
        """`count` datasets of `rows` rows each; their ids."""
        body = {"count": count, "rows": rows, "name": name, "seed": 7}
        answer = await self._call("POST", "/_emulator/datasets", body)
        return [str(d["id"]) for d in answer["datasets"]]

    async def last_seq(self) -> int:
        answer = await self._call("GET", "/_emulator/journal?since=999999999999")
        return int(answer["last_seq"])

    async def journal(self, since: int = 0, op: str | None = None) -> list[dict[str, Any]]:
        query = f"?since={since}" + (f"&op={op}" if op else "")
        answer = await self._call("GET", "/_emulator/journal" + query)
        return list(answer["entries"])

    async def stats(self) -> dict[str, dict[str, int]]:
        """Requests served so far, by operation and status."""
        answer = await self._call("GET", "/_emulator/stats")
        return {op: dict(by) for op, by in answer["ops"].items()}


@contextlib.asynccontextmanager
async def emulator_with_datasets(
    knobs: Sequence[str], seed: int, count: int, rows: int, name: str
) -> AsyncIterator[tuple[Emulator, Control, list[str]]]:
    """`running_emulator` seeded with `count` datasets: it, its control API, their ids."""
    async with running_emulator(knobs, seed=seed) as emulator, aiohttp.ClientSession() as session:
        control = Control(session, emulator.url)
        yield emulator, control, await control.seed(count, rows, name)


def aep_config(url: str, **settings: Any) -> AepConfig:
    """The exporter's AEP settings for the emulator at `url` (its default credentials)."""
    return AepConfig(
        platform_url=url,
        ims_url=url,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=SecretStr(CLIENT_SECRET),
        org_id=DEFAULT_ORG_ID,
        **settings,
    )


async def emulator_headers(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """What a raw request to the emulator at `url` carries: a token for its default
    credentials and the org and sandbox headers (for benchmarks that speak HTTP themselves)."""
    form = {
        "grant_type": "client_credentials",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "openid,AdobeID",
    }
    async with session.post(url + IMS_TOKEN_PATH, data=form) as resp:
        if resp.status != 200:
            raise BenchError(f"token request -> {resp.status}: {await resp.text()}")
        token = (await resp.json())["access_token"]
    return {
        "Authorization": f"Bearer {token}",
        "x-api-key": DEFAULT_CLIENT_ID,
        "x-gw-ims-org-id": DEFAULT_ORG_ID,
        "x-sandbox-name": "prod",
    }


# -- the daemon as a child process ---------------------------------------------------------


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        user, system = cpu_of(self.pid)
        return user + system

    def events(self) -> Counter[str]:
        """Log lines by `level:event`."""
        counts: Counter[str] = Counter()
        with self.log.open("rb") as lines:
            for line in lines:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        e = json.loads(line)
                        counts[f"{e.get('level', '?')}:{e.get('event', '?')}"] += 1
        return counts

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    async def ready(self) -> None:
        """Wait for the `daemon_ready` log line."""
        try:
            async with asyncio.timeout(DAEMON_STARTUP_DEADLINE):
                while b'"daemon_ready"' not in self.log.read_bytes():
                    if self.proc.returncode is not None:
                        raise BenchError(f"the daemon exited at start:\n{self.tail()}")
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise BenchError(f"the daemon was not ready in time:\n{self.tail()}") from None

    def alive(self) -> None:
        if self.proc.returncode is not None:
            raise BenchError(f"the daemon exited ({self.proc.returncode}):\n{self.tail()}")


@contextlib.asynccontextmanager
async def running_daemon(config: Path, log: Path) -> AsyncIterator[Daemon]:
    """`python -m exporter run --config <config>`, JSON logs to `log`; killed if still running
    when the block ends (a clean stop is the scenario's to make and check)."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exporter",
            "run",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield Daemon(proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def write_config(folder: Path, url: str, **sections: Mapping[str, Any]) -> Path:
    """A daemon configuration for the emulator at `url`, one DLZ destination named `lake`."""
    (folder / "client_secret").write_text(CLIENT_SECRET)
    base: dict[str, dict[str, Any]] = {
        "aep": {
            "platform_url": url,
            "ims_url": url,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret_file": "client_secret",
            "org_id": DEFAULT_ORG_ID,
        },
        "engine": {},
        "daemon": {"state_dir": "state", "spool_dir": "spool", "shutdown_grace_s": 5},
        "log": {"format": "json", "level": "info"},
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


def job_body(job_id: str, dataset_id: str, path: str) -> str:
    """A spool job file's content: `dataset_id` to the `lake` destination at `path`."""
    return json.dumps({"id": job_id, "dataset_id": dataset_id, "destination": "lake", "path": path})


# -- figures -------------------------------------------------------------------------------


def quantiles(values: Sequence[float], digits: int = 2) -> Report:
    """How many, the median, the 95th percentile and the maximum, rounded to `digits`."""
    if not values:
        return {"n": 0, "median": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), digits),
        "p95": round(p95, digits),
        "max": round(ordered[-1], digits),
    }


def fmt(value: Any) -> str:
    """A figure for the tables: `-` for none, thousands separated, 1 or 2 decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- checks --------------------------------------------------------------------------------


class Checks:
    """Assertions on what a scenario did, reported rather than raised."""

    def __init__(self) -> None:
        self.results: list[Report] = []

    def check(self, scenario: str, what: str, ok: bool, detail: Any = None) -> None:
        self.results.append({"scenario": scenario, "check": what, "ok": ok, "detail": detail})

    @property
    def failed(self) -> list[Report]:
        return [r for r in self.results if not r["ok"]]
