"""What the benchmarks share: the emulator as a child process, stopping processes, and what
/proc says about CPU, memory and the machine.

The benchmarks run as scripts (`python bench/<name>.py`), so this module is imported as
`harness` from the script's own folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
STARTUP_DEADLINE = 30.0
STOP_DEADLINE = 10.0
TICKS = os.sysconf("SC_CLK_TCK")
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


def machine() -> Report:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


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
