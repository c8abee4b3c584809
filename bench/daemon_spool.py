"""Benchmark: the daemon (`aep-exporter run`) as a child process, fed through its spool.

`make bench-daemon` runs it. Each scenario starts its own `aep-exporter emulator` child process
on 127.0.0.1 (a fresh data folder, a fixed seed), seeds datasets through the control API, writes
a daemon configuration and starts `python -m exporter run --config …` as a second child process
(JSON logs to a file). Jobs are dropped into `spool/incoming/` the way a producer must: each
written as `*.tmp`, then renamed. The daemon's CPU and memory come from `/proc/<pid>/stat`
(utime + stime, every thread) and `/proc/<pid>/status` (VmHWM, VmRSS); request counts from the
emulator's `/_emulator/stats`: what the server saw.

Scenarios (all by default; choose with --scenario, repeatable):

- `spool`: 1,000 jobs of 1,000 datasets on a busy service: 50 ms latency, 50 requests/s per org
  (the daemon's own limit is 50/s too), a 2 s "not ready" window, runs of 2-10 s. Wall time from
  the drop to the last result file against the rate-limit lower bound (all requests / 50 per s),
  requests per job by operation, the daemon's CPU per job and peak RSS. Every job must succeed
  and the daemon must exit 0 on SIGTERM.
- `spool-unpaced`: the same jobs on a service that answers at once and never throttles (the
  daemon's own limit raised to 1,000/s): its CPU per job when it is busy rather than mostly
  asleep between paced requests (each wake of an idle process has a cost of its own).
- `inflight`: 10,000 jobs whose runs are all in flight at once (runs of 30-40 min, no latency,
  no rate limit on the emulator), set up through the real API at a high client rate; once the
  journal says all 10,000 are `running`, the daemon's CPU per minute, its RSS and the poller's
  requests per minute over a steady window (60 s by default).

Every phase has a hard deadline; the emulator, the daemon and the temporary folder are always
removed (--keep keeps the folder: logs, journal, spool). Exit status: 0 every check held,
1 a check failed, 2 the benchmark could not run. See docs/benchmarks.md, "Daemon".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import watchfiles
from harness import (
    TICKS,
    BenchError,
    Checks,
    Report,
    cpu_of,
    loadavg,
    machine,
    memory_of,
    running_emulator,
    stop_process,
)

from exporter.daemon.journal import FILE_NAME, summary
from exporter.emulator.settings import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_ORG_ID

SCENARIOS = ("spool", "spool-unpaced", "inflight")
STARTUP_DEADLINE = 60.0
STOP_DEADLINE = 60.0
CPU_TARGET_MS = 5.0
RSS_TARGET_MB = 200.0

# spool: the busy service (time scale 1) and a daemon tuned to it.
SPOOL_RPS = 50.0
SPOOL_KNOBS = [
    "--latency-ms",
    "50",
    "--rate-limit",
    f"{SPOOL_RPS:g}",
    "--not-ready-window",
    "2",
    "--run-duration",
    "2-10",
    "--time-scale",
    "1",
    # one flow per dataset until the engine's export lanes land (issue 9)
    "--max-destination-flows",
    "100000",
]
SPOOL_ENGINE: dict[str, Any] = {
    "not_ready_wait_s": 2.0,
    "not_ready_retry_s": 0.5,
    "not_ready_retry_max_s": 2.0,
    "poll_min_s": 0.5,
    "poll_max_s": 5.0,
}

# spool-unpaced: the same jobs on a service that answers at once and never throttles.
UNPACED_KNOBS = [
    "--not-ready-window",
    "2",
    "--run-duration",
    "2-10",
    "--time-scale",
    "1",
    # one flow per dataset until the engine's export lanes land (issue 9)
    "--max-destination-flows",
    "100000",
]
UNPACED_AEP: dict[str, Any] = {"rate_limit_rps": 1000.0, "max_concurrency": 32}

# -- /proc ---------------------------------------------------------------------------------


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
            async with asyncio.timeout(STARTUP_DEADLINE):
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
    (folder / "client_secret").write_text(DEFAULT_CLIENT_SECRET)
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


# -- the emulator's control API ------------------------------------------------------------


class Control:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body) as resp:
            answer = await resp.json(content_type=None)
            if resp.status >= 300:
                raise BenchError(f"{method} {path} -> {resp.status}: {answer}")
            return answer

    async def seed(self, count: int, rows: int) -> list[str]:
        body = {"count": count, "rows": rows, "name": "bench", "seed": 7}
        answer = await self._call("POST", "/_emulator/datasets", body)
        return [str(d["id"]) for d in answer["datasets"]]

    async def stats(self) -> dict[str, dict[str, int]]:
        """Requests served so far, by operation and status."""
        answer = await self._call("GET", "/_emulator/stats")
        return {op: dict(by) for op, by in answer["ops"].items()}


def stats_delta(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for op, by in after.items():
        for status, n in by.items():
            d = n - before.get(op, {}).get(status, 0)
            if d:
                out.setdefault(op, {})[status] = d
    return dict(sorted(out.items()))


def op_rows(ops: Mapping[str, Mapping[str, int]], jobs: int) -> list[Report]:
    rows: list[Report] = []
    for op, by in ops.items():
        total = sum(by.values())
        rows.append(
            {
                "op": op,
                "requests": total,
                "per_job": round(total / jobs, 3),
                "not_2xx": {s: n for s, n in by.items() if not s.startswith("2")},
            }
        )
    total = sum(r["requests"] for r in rows)
    rows.append({"op": "all", "requests": total, "per_job": round(total / jobs, 3)})
    return rows


def count_of(ops: Mapping[str, Mapping[str, int]], op: str | None = None) -> int:
    return sum(n for name, by in ops.items() if op in (None, name) for n in by.values())


# -- the spool ------------------------------------------------------------------------------


def job_body(i: int, dataset_id: str) -> str:
    return json.dumps(
        {"id": f"bench-{i:05d}", "dataset_id": dataset_id, "destination": "lake", "path": "bench"}
    )


def drop_jobs(incoming: Path, datasets: Sequence[str]) -> float:
    """Write every job as a .tmp file, then rename them all; the time.time() of the first
    rename (the drop)."""
    names = []
    for i, dataset_id in enumerate(datasets):
        name = f"job-{i:05d}.json"
        (incoming / f"{name}.tmp").write_text(job_body(i, dataset_id))
        names.append(name)
    dropped = time.time()
    for name in names:
        (incoming / f"{name}.tmp").rename(incoming / name)
    return dropped


RESULT_FOLDERS = ("done", "failed", "rejected")


def result_files(spool: Path) -> list[Path]:
    found = []
    for folder in RESULT_FOLDERS:
        with os.scandir(spool / folder) as entries:
            found += [Path(e.path) for e in entries if e.name.endswith(".result.json")]
    return found


async def until_results(spool: Path, daemon: Daemon, want: int, deadline: float) -> float:
    """Wait on filesystem events until `want` result files exist; when the last one was seen."""
    stop = asyncio.Event()
    exited = asyncio.ensure_future(daemon.proc.wait())
    exited.add_done_callback(lambda _: stop.set())
    try:
        async with asyncio.timeout(deadline):
            if len(result_files(spool)) >= want:
                return time.time()
            async for _ in watchfiles.awatch(
                *(spool / f for f in RESULT_FOLDERS),
                recursive=False,
                debounce=50,
                step=20,
                stop_event=stop,
            ):
                if len(result_files(spool)) >= want:
                    return time.time()
            daemon.alive()
            raise BenchError("the file watcher stopped")
    except TimeoutError:
        got = len(result_files(spool))
        raise BenchError(f"only {got} of {want} results after {deadline:g} s") from None
    finally:
        exited.cancel()


# -- scenario spool --------------------------------------------------------------------------


async def scenario_spool(
    args: argparse.Namespace, work: Path, checks: Checks, *, paced: bool
) -> Report:
    """`paced`: the busy service of the brief (latency, rate limit); else the same jobs on a
    service that answers at once and never throttles, the daemon's own limit raised: the
    daemon's CPU per job when it is busy rather than waiting."""
    name = "spool" if paced else "spool-unpaced"
    jobs = args.jobs
    knobs = SPOOL_KNOBS if paced else UNPACED_KNOBS
    aep = {"rate_limit_rps": SPOOL_RPS, "max_concurrency": 32} if paced else UNPACED_AEP
    load_before = loadavg()
    async with (
        running_emulator(knobs, seed=args.seed, data_dir=work / "emulator") as emu,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
    ):
        control = Control(session, emu.url)
        t = time.perf_counter()
        datasets = await control.seed(jobs, args.rows)
        seed_s = time.perf_counter() - t
        config = write_config(
            work,
            emu.url,
            aep=aep,
            engine=SPOOL_ENGINE,
            daemon={"max_in_flight": max(jobs, 1000), "rescan_s": 5},
        )
        spool = work / "spool"
        async with running_daemon(config, work / "daemon.log") as daemon:
            await daemon.ready()
            cpu_ready = daemon.cpu()
            threads_ready = threads_of(daemon.pid)
            mem_ready = memory_of(daemon.pid)
            emu_cpu0 = sum(cpu_of(emu.proc.pid))
            before = await control.stats()
            dropped = drop_jobs(spool / "incoming", datasets)
            seen = await until_results(spool, daemon, jobs, args.spool_deadline)
            user, system = cpu_of(daemon.pid)  # before stopping it
            threads_end = threads_of(daemon.pid)
            mem_end = memory_of(daemon.pid)
            emu_cpu = sum(cpu_of(emu.proc.pid)) - emu_cpu0
            after = await control.stats()
            code = await stop_process(daemon.proc, STOP_DEADLINE)
            events = daemon.events()
    results = [json.loads(p.read_text()) for p in result_files(spool)]
    states = Counter(str(r["state"]) for r in results)
    last = max(p.stat().st_mtime for p in result_files(spool))
    ops = stats_delta(before, after)
    total = count_of(ops)
    wall = last - dropped
    bound = total / SPOOL_RPS if paced else None
    cpu_total = user + system
    durations = sorted(float(r["duration_s"]) for r in results if r.get("duration_s") is not None)
    checks.check(name, f"all {jobs} jobs succeeded", states == {"succeeded": jobs}, states)
    checks.check(name, "the daemon exited 0 on SIGTERM", code == 0, code)
    cpu_ms = cpu_total / jobs * 1000
    per_job = {
        k: round(
            (threads_end[k] - threads_ready[k]) / jobs * (1 if k == "main_wakeups" else 1000), 2
        )
        for k in ("main_cpu_s", "other_cpu_s", "main_wakeups")
    }
    return {
        "jobs": jobs,
        "rows_per_dataset": args.rows,
        "emulator": " ".join(knobs),
        "daemon_config": {**aep, "engine": SPOOL_ENGINE, "max_in_flight": max(jobs, 1000)},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seed_s": round(seed_s, 1),
        "states": dict(states),
        "wall_s": round(wall, 1),
        "wall_seen_s": round(seen - dropped, 1),
        "requests": total,
        "rate_limit_bound_s": None if bound is None else round(bound, 1),
        "wall_over_bound": round(wall / bound, 3) if bound else None,
        "achieved_rps": round(total / wall, 1) if wall > 0 else None,
        "requests_per_job": round(total / jobs, 2),
        "ops": op_rows(ops, jobs),
        "job_duration_s": {
            "p50": durations[len(durations) // 2] if durations else None,
            "max": durations[-1] if durations else None,
        },
        "daemon_cpu_s": round(cpu_total, 2),
        "daemon_cpu_user_s": round(user, 2),
        "daemon_cpu_system_s": round(system, 2),
        "daemon_cpu_at_ready_s": round(cpu_ready, 2),
        "cpu_ms_per_job": round(cpu_ms, 2),
        "cpu_ms_per_job_after_ready": round((cpu_total - cpu_ready) / jobs * 1000, 2),
        "main_thread_cpu_ms_per_job": per_job["main_cpu_s"],
        "other_threads_cpu_ms_per_job": per_job["other_cpu_s"],
        "main_thread_wakeups_per_job": per_job["main_wakeups"],
        "cpu_target_ms": CPU_TARGET_MS,
        "cpu_target_met": cpu_ms < CPU_TARGET_MS,
        "daemon_rss_at_ready_mb": mem_ready.get("VmRSS"),
        "daemon_peak_rss_mb": mem_end.get("VmHWM"),
        "daemon_rss_end_mb": mem_end.get("VmRSS"),
        "emulator_cpu_s": round(emu_cpu, 1),
        "exit_code": code,
        "log_events": dict(events.most_common(15)),
    }


# -- scenario inflight ---------------------------------------------------------------------


async def journal_counts(state_dir: Path) -> dict[str, int]:
    path = state_dir / FILE_NAME
    if not path.is_file():
        return {}

    def read() -> dict[str, int]:
        counts, _ = summary(path, recent=0)
        return counts

    with contextlib.suppress(Exception):  # a reader may meet the writer mid-checkpoint
        return await asyncio.to_thread(read)
    return {}


async def scenario_inflight(args: argparse.Namespace, work: Path, checks: Checks) -> Report:
    n = args.inflight
    knobs = ["--not-ready-window", "0", "--run-duration", args.run_duration, "--time-scale", "1"]
    # one flow per dataset until the engine's export lanes land (issue 9)
    knobs += ["--max-destination-flows", "100000"]
    engine = {"not_ready_wait_s": 0.0, "poll_max_s": args.poll_max_s}
    aep = {"rate_limit_rps": args.setup_rps, "max_concurrency": 64}
    async with (
        running_emulator(knobs, seed=args.seed, data_dir=work / "emulator") as emu,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session,
    ):
        control = Control(session, emu.url)
        t = time.perf_counter()
        datasets = await control.seed(n, 1)
        seed_s = time.perf_counter() - t
        config = write_config(
            work, emu.url, aep=aep, engine=engine, daemon={"max_in_flight": n, "rescan_s": 5}
        )
        spool, state_dir = work / "spool", work / "state"
        async with running_daemon(config, work / "daemon.log") as daemon:
            await daemon.ready()
            cpu_ready = daemon.cpu()
            mem_ready = memory_of(daemon.pid)
            before = await control.stats()
            dropped = drop_jobs(spool / "incoming", datasets)
            progress: list[tuple[float, int]] = []
            counts: dict[str, int] = {}
            try:
                async with asyncio.timeout(args.setup_deadline):
                    while counts.get("running", 0) < n:
                        daemon.alive()
                        await asyncio.sleep(2)
                        counts = await journal_counts(state_dir)
                        progress.append((time.time() - dropped, counts.get("running", 0)))
                        ended = {s: c for s, c in counts.items() if s not in _LIVE}
                        if ended:
                            raise BenchError(f"jobs ended during setup: {ended}")
            except TimeoutError:
                raise BenchError(
                    f"{counts.get('running', 0)} of {n} running after {args.setup_deadline:g} s"
                ) from None
            setup_s = time.time() - dropped
            cpu_setup = daemon.cpu() - cpu_ready
            setup_stats = await control.stats()
            await asyncio.sleep(args.settle_s)
            load_before = loadavg()
            stats0, cpu0, w0 = await control.stats(), cpu_of(daemon.pid), time.monotonic()
            emu0 = sum(cpu_of(emu.proc.pid))
            rss_samples = []
            while (left := args.window_s - (time.monotonic() - w0)) > 0:
                await asyncio.sleep(min(5.0, left))
                daemon.alive()
                rss_samples.append(memory_of(daemon.pid)["VmRSS"])
            stats1, cpu1, w1 = await control.stats(), cpu_of(daemon.pid), time.monotonic()
            emu_cpu = sum(cpu_of(emu.proc.pid)) - emu0
            mem_end = memory_of(daemon.pid)
            load_after = loadavg()
            counts_end = await journal_counts(state_dir)
            t = time.perf_counter()
            code = await stop_process(daemon.proc, STOP_DEADLINE)
            stop_s = time.perf_counter() - t
            events = daemon.events()
    window = w1 - w0
    per_min = 60 / window
    polls = stats_delta(stats0, stats1)
    setup_ops = stats_delta(before, setup_stats)
    setup_requests = count_of(setup_ops)
    cpu_window = sum(cpu1) - sum(cpu0)
    runs_lists = count_of(polls, "runs.list")
    checks.check(
        "inflight",
        f"{n} jobs running through the window",
        counts_end.get("running", 0) == n,
        counts_end,
    )
    checks.check("inflight", "the daemon exited 0 on SIGTERM", code == 0, code)
    checks.check(
        "inflight", "only runs were read in the window", set(polls) <= {"runs.list"}, polls
    )
    peak = mem_end.get("VmHWM", 0.0)
    return {
        "in_flight": n,
        "emulator": " ".join(knobs),
        "daemon_config": {**aep, "engine": engine, "max_in_flight": n},
        "seed_datasets_s": round(seed_s, 1),
        "setup_s": round(setup_s, 1),
        "setup_progress": [(round(s), r) for s, r in progress[:: max(1, len(progress) // 12)]],
        "setup_requests": setup_requests,
        "setup_requests_per_job": round(setup_requests / n, 2),
        "setup_rps": round(setup_requests / setup_s, 1) if setup_s else None,
        "setup_ops": op_rows(setup_ops, n),
        "setup_daemon_cpu_s": round(cpu_setup, 1),
        "setup_cpu_ms_per_job": round(cpu_setup / n * 1000, 2),
        "daemon_cpu_at_ready_s": round(cpu_ready, 2),
        "daemon_rss_at_ready_mb": mem_ready.get("VmRSS"),
        "loadavg_before_window": load_before,
        "loadavg_after_window": load_after,
        "window_s": round(window, 1),
        "window_cpu_s": round(cpu_window, 2),
        "window_cpu_user_s": round(cpu1[0] - cpu0[0], 2),
        "window_cpu_system_s": round(cpu1[1] - cpu0[1], 2),
        "cpu_s_per_min": round(cpu_window * per_min, 2),
        "cpu_share_of_core": round(cpu_window / window, 4),
        "runs_list_per_min": round(runs_lists * per_min, 1),
        "cpu_ms_per_runs_list": round(cpu_window / runs_lists * 1000, 1) if runs_lists else None,
        "runs_read_per_s_max": round(runs_lists * 100 / window, 1),
        "emulator_cpu_s_per_min": round(emu_cpu * per_min, 2),
        "window_requests": polls,
        "daemon_peak_rss_mb": peak,
        "daemon_rss_mb": mem_end.get("VmRSS"),
        "daemon_rss_window_mb": [min(rss_samples), max(rss_samples)] if rss_samples else None,
        "rss_kb_per_job": round(
            (mem_end.get("VmRSS", 0.0) - mem_ready.get("VmRSS", 0.0)) * 1000 / n, 2
        ),
        "rss_target_mb": RSS_TARGET_MB,
        "rss_target_met": peak < RSS_TARGET_MB,
        "journal_at_end": counts_end,
        "stop_s": round(stop_s, 1),
        "exit_code": code,
        "log_events": dict(events.most_common(15)),
    }


_LIVE = {"received", "flow_ready", "triggering", "running"}


# -- checks and reports --------------------------------------------------------------------


async def bounded(name: str, seconds: float, work: Awaitable[Report]) -> Report:
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        raise BenchError(f"scenario {name} took longer than {seconds:g} s") from None


async def bench(args: argparse.Namespace) -> tuple[Report, Checks]:
    checks = Checks()
    report: Report = {"machine": machine(), "loadavg_at_start": loadavg()}
    for name in args.scenario:
        work = Path(tempfile.mkdtemp(prefix=f"bench-daemon-{name}-"))
        try:
            if name.startswith("spool"):
                deadline = args.spool_deadline + 300
                paced = name == "spool"
                report[name] = await bounded(
                    name, deadline, scenario_spool(args, work, checks, paced=paced)
                )
            else:
                deadline = args.setup_deadline + args.window_s + 600
                report[name] = await bounded(name, deadline, scenario_inflight(args, work, checks))
        finally:
            if args.keep:
                print(f"kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    report["checks"] = checks.results
    return report, checks


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rows_table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def ops_lines(rows: Sequence[Report]) -> list[str]:
    width = max(len(r["op"]) for r in rows)
    out = [f"    {'operation':<{width}}  {'requests':>9}  {'per job':>8}  other answers"]
    for r in rows:
        other = ", ".join(f"{s}: {n}" for s, n in sorted(r.get("not_2xx", {}).items()))
        out.append(f"    {r['op']:<{width}}  {r['requests']:>9,}  {r['per_job']:>8.2f}  {other}")
    return out


def human_spool(name: str, r: Report) -> list[str]:
    target = "met" if r["cpu_target_met"] else "NOT met"
    lines = [f"Daemon ({name}): {r['jobs']:,} jobs through the spool (emulator {r['emulator']})"]
    lines += rows_table(
        [
            ("load average", f"{r['loadavg_before']} before, {r['loadavg_after']} after"),
            ("seeding", f"{r['jobs']:,} datasets of {r['rows_per_dataset']} rows: {r['seed_s']} s"),
            ("states", ", ".join(f"{k}: {v:,}" for k, v in r["states"].items())),
            (
                "wall time",
                f"{fmt(r['wall_s'])} s from the drop to the last result file "
                f"(seen after {fmt(r['wall_seen_s'])} s)",
            ),
            (
                "rate-limit bound",
                f"{fmt(r['rate_limit_bound_s'])} s = {r['requests']:,} requests / "
                f"{SPOOL_RPS:g} per s; wall = {r['wall_over_bound']:.2f} x bound, "
                f"{fmt(r['achieved_rps'])} requests/s"
                if r["rate_limit_bound_s"] is not None
                else f"none (no rate limit): {r['requests']:,} requests at "
                f"{fmt(r['achieved_rps'])} requests/s",
            ),
            ("requests per job", fmt(r["requests_per_job"])),
            (
                "daemon CPU",
                f"{fmt(r['daemon_cpu_s'])} s (user {fmt(r['daemon_cpu_user_s'])}, system "
                f"{fmt(r['daemon_cpu_system_s'])}; {fmt(r['daemon_cpu_at_ready_s'])} s to start)",
            ),
            (
                "CPU per job",
                f"{fmt(r['cpu_ms_per_job'])} ms ({fmt(r['cpu_ms_per_job_after_ready'])} ms "
                f"without start-up); target < {CPU_TARGET_MS:g} ms: {target}",
            ),
            (
                "… by thread",
                f"event loop {fmt(r['main_thread_cpu_ms_per_job'])} ms, other threads "
                f"(journal, spool files, watcher) {fmt(r['other_threads_cpu_ms_per_job'])} ms; "
                f"the event loop slept and woke {fmt(r['main_thread_wakeups_per_job'])} times "
                "per job",
            ),
            (
                "daemon RSS",
                f"peak {fmt(r['daemon_peak_rss_mb'])} MB, {fmt(r['daemon_rss_end_mb'])} MB at "
                f"the end, {fmt(r['daemon_rss_at_ready_mb'])} MB when ready",
            ),
            ("emulator CPU", f"{fmt(r['emulator_cpu_s'])} s"),
            ("exit on SIGTERM", r["exit_code"]),
        ]
    )
    lines.append("  requests by operation:")
    lines += ops_lines(r["ops"])
    return lines


def human_inflight(r: Report) -> list[str]:
    target = "met" if r["rss_target_met"] else "NOT met"
    lines = [f"Daemon: {r['in_flight']:,} runs in flight (emulator {r['emulator']})"]
    lines += rows_table(
        [
            ("seeding", f"{r['in_flight']:,} datasets of 1 row: {r['seed_datasets_s']} s"),
            (
                "setup",
                f"{fmt(r['setup_s'])} s from the drop to {r['in_flight']:,} running; "
                f"{r['setup_requests']:,} requests ({r['setup_requests_per_job']} per job, "
                f"{fmt(r['setup_rps'])}/s); daemon CPU {fmt(r['setup_daemon_cpu_s'])} s = "
                f"{fmt(r['setup_cpu_ms_per_job'])} ms per job",
            ),
            (
                "load average",
                f"{r['loadavg_before_window']} before the window, "
                f"{r['loadavg_after_window']} after",
            ),
            (
                "window",
                f"{fmt(r['window_s'])} s with {r['in_flight']:,} runs in flight "
                f"(journal at the end: {r['journal_at_end']})",
            ),
            (
                "daemon CPU",
                f"{fmt(r['cpu_s_per_min'])} s per minute = {r['cpu_share_of_core'] * 100:.2f} % "
                f"of a core (user {fmt(r['window_cpu_user_s'])} s, system "
                f"{fmt(r['window_cpu_system_s'])} s in the window)",
            ),
            (
                "poller",
                f"{fmt(r['runs_list_per_min'])} runs.list requests per minute "
                f"(≤ {fmt(r['runs_read_per_s_max'])} runs read per s), "
                f"{fmt(r['cpu_ms_per_runs_list'])} ms of daemon CPU per request; emulator "
                f"{fmt(r['emulator_cpu_s_per_min'])} CPU s per minute",
            ),
            (
                "daemon RSS",
                f"peak {fmt(r['daemon_peak_rss_mb'])} MB (VmHWM), now {fmt(r['daemon_rss_mb'])}"
                f" MB, {fmt(r['daemon_rss_at_ready_mb'])} MB when ready: "
                f"{fmt(r['rss_kb_per_job'])} kB per job in flight; target < "
                f"{RSS_TARGET_MB:g} MB: {target}",
            ),
            ("exit on SIGTERM", f"{r['exit_code']} after {fmt(r['stop_s'])} s"),
        ]
    )
    lines.append("  setup requests by operation:")
    lines += ops_lines(r["setup_ops"])
    return lines


def human(report: Report, checks: Checks) -> str:
    m = report["machine"]
    lines = [f"{m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['system']}"]
    lines.append(f"load average at start: {report['loadavg_at_start']}")
    for name in ("spool", "spool-unpaced"):
        if name in report:
            lines += ["", *human_spool(name, report[name])]
    if "inflight" in report:
        lines += ["", *human_inflight(report["inflight"])]
    lines.append("")
    for c in checks.results:
        mark = "ok  " if c["ok"] else "FAIL"
        detail = "" if c["ok"] else f": {c['detail']}"
        lines.append(f"{mark} {c['scenario']}: {c['check']}{detail}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/daemon_spool.py",
        description="The daemon as a child process: jobs through its spool, runs in flight.",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="spool, spool-unpaced, inflight (default: all; repeatable)",
    )
    p.add_argument("--jobs", type=int, default=1_000, help="spool: jobs (default %(default)s)")
    p.add_argument("--rows", type=int, default=10, help="spool: rows per dataset (default 10)")
    p.add_argument(
        "--spool-deadline", type=float, default=900.0, help="spool: seconds for all results"
    )
    p.add_argument(
        "--inflight", type=int, default=10_000, help="inflight: runs (default %(default)s)"
    )
    p.add_argument(
        "--run-duration",
        default="1800-2400",
        help="inflight: emulated run duration A-B in s (default %(default)s; must outlast the "
        "setup and the window)",
    )
    p.add_argument(
        "--setup-rps",
        type=float,
        default=1_000.0,
        help="inflight: the daemon's aep.rate_limit_rps (default %(default)s)",
    )
    p.add_argument(
        "--poll-max-s",
        type=float,
        default=120.0,
        help="inflight: engine.poll_max_s (default %(default)s, the production default)",
    )
    p.add_argument(
        "--setup-deadline", type=float, default=1500.0, help="inflight: seconds for the setup"
    )
    p.add_argument("--settle-s", type=float, default=5.0, help="inflight: pause before the window")
    p.add_argument("--window-s", type=float, default=60.0, help="inflight: measured seconds")
    p.add_argument("--seed", type=int, default=7, help="emulator seed (default 7)")
    p.add_argument("--keep", action="store_true", help="keep the work folders (logs, journal)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    args.scenario = list(dict.fromkeys(args.scenario or SCENARIOS))
    if not 1 <= args.jobs <= 10_000 or not 1 <= args.inflight <= 10_000:
        p.error("--jobs and --inflight must be between 1 and 10,000 (one seeding request)")
    if args.window_s < 1 or args.settle_s < 0:
        p.error("--window-s must be at least 1, --settle-s at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report, checks = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else human(report, checks))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
