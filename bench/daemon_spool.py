"""Benchmark: the daemon (`aep-exporter run`) as a child process, fed through its spool.

`make bench-daemon` runs it. Each scenario starts its own `aep-exporter emulator` child process
on 127.0.0.1 (a fresh data folder, a fixed seed), seeds datasets through the control API, writes
a daemon configuration and starts `python -m exporter run --config …` as a second child process
(JSON logs to a file). Jobs are dropped into `spool/incoming/` the way a producer must: each
written as `*.tmp`, then renamed. The daemon's CPU and memory come from `/proc/<pid>/stat`
(utime + stime, every thread) and `/proc/<pid>/status` (VmHWM, VmRSS); request counts from the
emulator's `/_emulator/stats`: what the server saw.

Scenarios (all by default; choose with --scenario, repeatable). The emulator keeps AEP's limits:
100 destination flows per sandbox, 80 datasets per ad hoc call. Jobs spread their datasets over
a few paths, one export lane (one AEP flow) each.

- `spool`: 1,000 jobs of 1,000 datasets over 4 lanes, dropped at once, on a busy service: 50 ms
  latency, 50 requests/s per org (the daemon's own limit is 50/s too), a 2 s "not ready" window,
  runs of 2-10 s. Then, once all are done, the same 1,000 datasets again (`repeat`: members of
  their lanes by then). For each round: requests per job by operation, wall time from the drop
  to the last result file against the critical path (the window + the longest run + how late
  that run's end reached its result file), the daemon's CPU per job; every job must succeed,
  4 lanes be made, and the daemon exit 0 on SIGTERM.
- `paced`: the same 1,000 jobs dropped one per emulated second on the same service, the
  world running `--time-scale` fast (default 0.25: the emulator's --time-scale, every engine
  timing and the pace, so 1,000 jobs take about 250 s; 1 for real seconds).
- `spool-unpaced`: the `spool` jobs on a service that answers at once and never throttles (the
  daemon's own limit raised to 1,000/s): its CPU per job when it is busy rather than mostly
  asleep between paced requests (each wake of an idle process has a cost of its own).
- `inflight`: 10,000 jobs over 40 lanes of 250 datasets whose runs are all in flight at once
  (runs of 30-40 min, no latency, no rate limit on the emulator), set up through the real API
  at a high client rate; once the journal says all 10,000 are `running`, the daemon's CPU per
  minute, its RSS and the poller's requests per minute over a steady window (60 s by default).

Every phase has a hard deadline; the emulator, the daemon and the temporary folder are always
removed (--keep keeps the folder: logs, journal, spool). Exit status: 0 every check held,
1 a check failed, 2 the benchmark could not run. See docs/benchmarks.md, "Daemon".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import watchfiles
from harness import (
    RESULT_FOLDERS,
    BenchError,
    Checks,
    Control,
    Daemon,
    Report,
    aep_config,
    cpu_of,
    fmt,
    job_body,
    loadavg,
    machine,
    memory_of,
    quantiles,
    running_daemon,
    running_emulator,
    stop_process,
    threads_of,
    write_config,
)

from exporter.aep.api import RunInfo
from exporter.aep.client import HttpAep
from exporter.clock import SystemClock
from exporter.daemon.journal import FILE_NAME, summary

SCENARIOS = ("spool", "paced", "spool-unpaced", "inflight")
STOP_DEADLINE = 60.0
# Aims of issue 9 (export lanes).
REQUESTS_AIM = {"spool": 0.5, "repeat": 1.5, "paced": 2.0}
CRITICAL_AIM = 1.1  # wall time / critical path, jobs arriving at once
CPU_AIM_MS = 3.0  # daemon CPU per job, paced one per second
RSS_AIM_MB = 150.0  # peak RSS with 10,000 runs in flight
LANES = 4  # paths the spool scenarios spread their datasets over: one lane each
INFLIGHT_LANES = 40  # 10,000 datasets, 250 per lane (a sandbox holds 100 flows)

# spool and paced: the busy service, in emulated seconds (x the time scale), and a daemon
# tuned to it: AEP's 600 s "not ready" window shrunk to 2 s, runs of minutes to 2-10 s.
SPOOL_RPS = 50.0
NOT_READY_S = 2.0
RUN_S = "2-10"
LATENCY_MS = 50
# Engine timings in emulated seconds, multiplied by the time scale like the emulator's. The
# lane windows are the engine's defaults (2 s to gather joins, 1 s to gather triggers).
SPOOL_ENGINE: dict[str, float] = {
    "not_ready_wait_s": NOT_READY_S,
    "not_ready_retry_s": 0.5,
    "not_ready_retry_max_s": 2.0,
    "poll_min_s": 0.5,
    "poll_max_s": 5.0,
    "join_coalesce_s": 2.0,
    "trigger_coalesce_s": 1.0,
}


def spool_knobs(scale: float, *, busy: bool = True) -> list[str]:
    """The emulator: a 2 s window and runs of 2-10 s (emulated), 50 ms latency and 50
    requests/s (real) when `busy`; every emulated duration x `scale`."""
    knobs = ["--not-ready-window", f"{NOT_READY_S:g}", "--run-duration", RUN_S]
    knobs += ["--time-scale", f"{scale:g}"]
    if busy:
        knobs += ["--latency-ms", f"{LATENCY_MS}", "--rate-limit", f"{SPOOL_RPS:g}"]
    return knobs


def spool_engine(scale: float, overrides: Mapping[str, float]) -> dict[str, float]:
    """The engine's timings, emulated seconds x `scale`; `overrides` (--engine) first."""
    return {k: round(v * scale, 4) for k, v in {**SPOOL_ENGINE, **overrides}.items()}


# spool-unpaced: the same jobs on a service that answers at once and never throttles.
UNPACED_AEP: dict[str, Any] = {"rate_limit_rps": 1000.0, "max_concurrency": 32}


# -- /proc ---------------------------------------------------------------------------------


# -- child processes -----------------------------------------------------------------------


# -- the emulator's control API ------------------------------------------------------------


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


def make_jobs(prefix: str, datasets: Sequence[str], lanes: int) -> list[tuple[str, str]]:
    """(file name, content) of one job per dataset, the datasets spread over `lanes` paths
    (one lane each: same destination, format, compression and mode)."""
    return [
        (
            f"{prefix}-{i:05d}.json",
            job_body(f"{prefix}-{i:05d}", ds, f"bench/lane-{i % lanes:02d}"),
        )
        for i, ds in enumerate(datasets)
    ]


def drop_jobs(incoming: Path, jobs: Sequence[tuple[str, str]]) -> float:
    """Write every job as a .tmp file, then rename them all; the time.time() of the first
    rename (the drop)."""
    for name, body in jobs:
        (incoming / f"{name}.tmp").write_text(body)
    dropped = time.time()
    for name, _ in jobs:
        (incoming / f"{name}.tmp").rename(incoming / name)
    return dropped


async def drop_paced(
    incoming: Path, jobs: Sequence[tuple[str, str]], interval: float
) -> dict[str, float]:
    """Drop one job every `interval` seconds (on a fixed grid: no drift); when each went."""
    dropped: dict[str, float] = {}
    start = time.monotonic()
    for i, (name, body) in enumerate(jobs):
        await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
        (incoming / f"{name}.tmp").write_text(body)
        dropped[name.removesuffix(".json")] = time.time()
        (incoming / f"{name}.tmp").rename(incoming / name)
    return dropped


def result_files(spool: Path, prefix: str = "") -> list[Path]:
    found = []
    for folder in RESULT_FOLDERS:
        with os.scandir(spool / folder) as entries:
            found += [
                Path(e.path)
                for e in entries
                if e.name.endswith(".result.json") and e.name.startswith(prefix)
            ]
    return found


async def until_results(
    spool: Path, daemon: Daemon, want: int, deadline: float, prefix: str = ""
) -> float:
    """Wait on filesystem events until `want` result files exist; when the last one was seen."""
    stop = asyncio.Event()
    exited = asyncio.ensure_future(daemon.proc.wait())
    exited.add_done_callback(lambda _: stop.set())
    try:
        async with asyncio.timeout(deadline):
            if len(result_files(spool, prefix)) >= want:
                return time.time()
            async for _ in watchfiles.awatch(
                *(spool / f for f in RESULT_FOLDERS),
                recursive=False,
                debounce=50,
                step=20,
                stop_event=stop,
            ):
                if len(result_files(spool, prefix)) >= want:
                    return time.time()
            daemon.alive()
            raise BenchError("the file watcher stopped")
    except TimeoutError:
        got = len(result_files(spool, prefix))
        raise BenchError(f"only {got} of {want} results after {deadline:g} s") from None
    finally:
        exited.cancel()


@dataclass
class Meter:
    """Readings at the start of a measured span."""

    cpu: tuple[float, float]
    threads: dict[str, float]
    stats: dict[str, dict[str, int]]
    emulator_cpu: float

    @classmethod
    async def read(cls, daemon: Daemon, emulator_pid: int, control: Control) -> Meter:
        return cls(
            cpu_of(daemon.pid),
            threads_of(daemon.pid),
            await control.stats(),
            sum(cpu_of(emulator_pid)),
        )


def measured(
    start: Meter, end: Meter, jobs: int, results: Sequence[Report], times: Report
) -> Report:
    """Requests, CPU and outcomes of one round of `jobs` jobs."""
    ops = stats_delta(start.stats, end.stats)
    total = count_of(ops)
    cpu = sum(end.cpu) - sum(start.cpu)
    per_job = {
        k: round(
            (end.threads[k] - start.threads[k]) / jobs * (1 if k == "main_wakeups" else 1000), 2
        )
        for k in ("main_cpu_s", "other_cpu_s", "main_wakeups")
    }
    return {
        "jobs": jobs,
        "states": dict(Counter(str(r["state"]) for r in results)),
        **times,
        "requests": total,
        "requests_per_job": round(total / jobs, 3),
        "ops": op_rows(ops, jobs),
        "lanes_created": count_of({k: v for k, v in ops.items() if k == "flows.create"}),
        "daemon_cpu_s": round(cpu, 2),
        "daemon_cpu_user_s": round(end.cpu[0] - start.cpu[0], 2),
        "daemon_cpu_system_s": round(end.cpu[1] - start.cpu[1], 2),
        "cpu_ms_per_job": round(cpu / jobs * 1000, 2),
        "main_thread_cpu_ms_per_job": per_job["main_cpu_s"],
        "other_threads_cpu_ms_per_job": per_job["other_cpu_s"],
        "main_thread_wakeups_per_job": per_job["main_wakeups"],
        "emulator_cpu_s": round(end.emulator_cpu - start.emulator_cpu, 1),
    }


async def read_runs(url: str, run_ids: Sequence[str]) -> dict[str, RunInfo]:
    """The runs as AEP (the emulator) has them, read after the measurement."""
    config = aep_config(url, rate_limit_rps=1000)
    async with HttpAep.from_config(config, clock=SystemClock()) as api:
        return await api.get_runs(list(run_ids))


async def timing(
    url: str, spool: Path, prefix: str, dropped: Mapping[str, float], scale: float
) -> tuple[list[Report], Report]:
    """Each job's result, and the round's timing: wall time from the first drop to the last
    result file, each job's drop → result, and the critical path: the "not ready" window +
    the longest run + how late that run's end reached its result file (detection)."""
    paths = result_files(spool, prefix)
    results = [json.loads(p.read_text()) for p in paths]
    filed = {str(r["job_id"]): p.stat().st_mtime for r, p in zip(results, paths, strict=True)}
    runs = await read_runs(url, [str(r["run_id"]) for r in results if r.get("run_id")])
    window = NOT_READY_S * scale
    latency = [filed[j] - dropped[j] for j in filed if j in dropped]
    first = min(dropped.values())
    last = max(filed.values(), default=first)
    longest: tuple[float, float] | None = None  # (duration, detection)
    detections = []
    for r in results:
        run = runs.get(str(r.get("run_id")))
        if run is None or run.completed_at_ms is None:
            continue
        detection = filed[str(r["job_id"])] - run.completed_at_ms / 1000
        detections.append(detection)
        duration = (run.completed_at_ms - run.created_at_ms) / 1000
        if longest is None or duration > longest[0]:
            longest = (duration, detection)
    out: Report = {
        "wall_s": round(last - first, 2),
        "last_drop_to_last_result_s": round(last - max(dropped.values()), 2),
        "job_latency_s": quantiles(latency),
        "detection_s": quantiles(detections),
        "distinct_runs": len({r.get("run_id") for r in results}),
        "distinct_flows": len({r.get("flow_id") for r in results}),
    }
    if longest is not None:
        critical = window + longest[0] + longest[1]
        out["critical_path_s"] = {
            "not_ready": round(window, 2),
            "longest_run": round(longest[0], 2),
            "detection": round(longest[1], 2),
            "total": round(critical, 2),
        }
        out["wall_over_critical"] = round((last - first) / critical, 3)
        out["tail_over_critical"] = round((last - max(dropped.values())) / critical, 3)
    return results, out


# -- scenarios spool, paced, spool-unpaced ----------------------------------------------------


async def scenario_spool(args: argparse.Namespace, work: Path, checks: Checks, name: str) -> Report:
    """`spool`: 1,000 jobs at once on the busy service, then the same datasets again (members
    of their lanes by then); `paced`: the same jobs one per (emulated) second, the world
    running `--time-scale` fast; `spool-unpaced`: at once on a service that answers at once
    and never throttles (the daemon's CPU per job when it is busy, not asleep)."""
    jobs = args.jobs
    scale = args.time_scale if name == "paced" else 1.0
    knobs = spool_knobs(scale, busy=name != "spool-unpaced")
    engine = spool_engine(scale, args.engine)
    aep = UNPACED_AEP if name == "spool-unpaced" else {"rate_limit_rps": SPOOL_RPS}
    aep = {**aep, "max_concurrency": 32}
    daemon_cfg = {"max_in_flight": max(jobs, 1000), "rescan_s": 5}
    load_before = loadavg()
    rounds: Report = {}
    async with (
        running_emulator(knobs, seed=args.seed, data_dir=work / "emulator") as emu,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
    ):
        control = Control(session, emu.url)
        t = time.perf_counter()
        datasets = await control.seed(jobs, args.rows)
        seed_s = time.perf_counter() - t
        config = write_config(work, emu.url, aep=aep, engine=engine, daemon=daemon_cfg)
        spool = work / "spool"
        async with running_daemon(config, work / "daemon.log") as daemon:
            await daemon.ready()
            cpu_ready = daemon.cpu()
            mem_ready = memory_of(daemon.pid)
            plan = [("jobs", "bench")] + ([("repeat", "again")] if name == "spool" else [])
            for label, prefix in plan:
                batch = make_jobs(prefix, datasets, LANES)
                start = await Meter.read(daemon, emu.pid, control)
                if name == "paced":
                    deadline = args.spool_deadline + len(batch) * scale  # from the first drop
                    waiting = asyncio.ensure_future(
                        until_results(spool, daemon, jobs, deadline, prefix)
                    )
                    try:
                        dropped = await drop_paced(spool / "incoming", batch, scale)
                        await waiting
                    finally:
                        waiting.cancel()
                else:
                    at = drop_jobs(spool / "incoming", batch)
                    dropped = {n.removesuffix(".json"): at for n, _ in batch}
                    await until_results(spool, daemon, jobs, args.spool_deadline, prefix)
                end = await Meter.read(daemon, emu.pid, control)
                results, times = await timing(emu.url, spool, prefix, dropped, scale)
                rounds[label] = measured(start, end, jobs, results, times)
                checks.check(
                    name,
                    f"{label}: all {jobs} jobs succeeded",
                    rounds[label]["states"] == {"succeeded": jobs},
                    rounds[label]["states"],
                )
            mem_end = memory_of(daemon.pid)
            cpu_end = daemon.cpu()
            code = await stop_process(daemon.proc, STOP_DEADLINE)
            events = daemon.events()
    checks.check(name, "the daemon exited 0 on SIGTERM", code == 0, code)
    checks.check(
        name,
        f"{LANES} lanes made",
        sum(r["lanes_created"] for r in rounds.values()) == LANES,
        [r["lanes_created"] for r in rounds.values()],
    )
    aims: Report = {}
    for label, r in rounds.items():
        key = name if label == "jobs" else label
        if key in REQUESTS_AIM:
            aims[f"{label}: requests per job ≤ {REQUESTS_AIM[key]:g}"] = (
                r["requests_per_job"] <= REQUESTS_AIM[key]
            )
    if name == "spool" and "wall_over_critical" in rounds["jobs"]:
        aims[f"jobs: wall ≤ {CRITICAL_AIM:g} x critical path"] = (
            rounds["jobs"]["wall_over_critical"] <= CRITICAL_AIM
        )
    if name == "paced":
        aims[f"jobs: daemon CPU per job ≤ {CPU_AIM_MS:g} ms"] = (
            rounds["jobs"]["cpu_ms_per_job"] <= CPU_AIM_MS
        )
    return {
        "jobs": jobs,
        "lanes": LANES,
        "rows_per_dataset": args.rows,
        "time_scale": scale,
        "arrival": f"one every {scale:g} s" if name == "paced" else "at once",
        "emulator": " ".join(knobs),
        "daemon_config": {**aep, "engine": engine, **daemon_cfg},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seed_s": round(seed_s, 1),
        "rounds": rounds,
        "aims": aims,
        "daemon_cpu_at_ready_s": round(cpu_ready, 2),
        "daemon_cpu_total_s": round(cpu_end, 2),
        "daemon_rss_at_ready_mb": mem_ready.get("VmRSS"),
        "daemon_peak_rss_mb": mem_end.get("VmHWM"),
        "daemon_rss_end_mb": mem_end.get("VmRSS"),
        "exit_code": code,
        "log_events": dict(events.most_common(20)),
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
            dropped = drop_jobs(spool / "incoming", make_jobs("bench", datasets, args.lanes))
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
    lanes_made = count_of(setup_ops, "flows.create")
    checks.check("inflight", f"{args.lanes} lanes made", lanes_made == args.lanes, lanes_made)
    checks.check(
        "inflight", "only runs were read in the window", set(polls) <= {"runs.list"}, polls
    )
    peak = mem_end.get("VmHWM", 0.0)
    return {
        "in_flight": n,
        "lanes": args.lanes,
        "lanes_created": lanes_made,
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
        "rss_aim_mb": RSS_AIM_MB,
        "rss_aim_met": peak <= RSS_AIM_MB,
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
    # The client that reads the runs back logs each request: not in the report.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    checks = Checks()
    report: Report = {"machine": machine(), "loadavg_at_start": loadavg()}
    for name in args.scenario:
        work = Path(tempfile.mkdtemp(prefix=f"bench-daemon-{name}-"))
        try:
            if name != "inflight":
                rounds = 2 if name == "spool" else 1
                deadline = (args.spool_deadline + 120) * rounds
                if name == "paced":
                    deadline += args.jobs * args.time_scale
                report[name] = await bounded(
                    name, deadline, scenario_spool(args, work, checks, name)
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
    lines = [
        f"Daemon ({name}): {r['jobs']:,} jobs over {r['lanes']} lanes, {r['arrival']} "
        f"(emulator {r['emulator']})"
    ]
    lines += rows_table(
        [
            ("load average", f"{r['loadavg_before']} before, {r['loadavg_after']} after"),
            ("seeding", f"{r['jobs']:,} datasets of {r['rows_per_dataset']} rows: {r['seed_s']} s"),
            (
                "daemon RSS",
                f"peak {fmt(r['daemon_peak_rss_mb'])} MB, {fmt(r['daemon_rss_end_mb'])} MB at "
                f"the end, {fmt(r['daemon_rss_at_ready_mb'])} MB when ready; "
                f"{fmt(r['daemon_cpu_at_ready_s'])} s of CPU to start",
            ),
            ("exit on SIGTERM", r["exit_code"]),
        ]
    )
    for label, x in r["rounds"].items():
        cp = x.get("critical_path_s", {})
        lines.append(f"  -- {label} ({x['jobs']:,} jobs) --")
        lines += rows_table(
            [
                ("states", ", ".join(f"{k}: {v:,}" for k, v in x["states"].items())),
                (
                    "requests per job",
                    f"{x['requests_per_job']:.3f} ({x['requests']:,} requests; lanes created "
                    f"{x['lanes_created']}; distinct flows {x['distinct_flows']}, runs "
                    f"{x['distinct_runs']:,})",
                ),
                (
                    "wall time",
                    f"{fmt(x['wall_s'])} s from the first drop to the last result file; "
                    f"{fmt(x['last_drop_to_last_result_s'])} s after the last drop",
                ),
                (
                    "critical path",
                    f"{fmt(cp.get('total'))} s = {fmt(cp.get('not_ready'))} not ready + "
                    f"{fmt(cp.get('longest_run'))} longest run + {fmt(cp.get('detection'))} "
                    f"detection; wall / critical = {fmt(x.get('wall_over_critical'))}, "
                    f"after the last drop / critical = {fmt(x.get('tail_over_critical'))}",
                ),
                (
                    "job drop → result",
                    "median {median} / p95 {p95} / max {max} s".format(**x["job_latency_s"]),
                ),
                (
                    "run end → result",
                    "median {median} / p95 {p95} / max {max} s".format(**x["detection_s"]),
                ),
                (
                    "daemon CPU",
                    f"{fmt(x['daemon_cpu_s'])} s = {fmt(x['cpu_ms_per_job'])} ms per job "
                    f"(event loop {fmt(x['main_thread_cpu_ms_per_job'])}, other threads "
                    f"{fmt(x['other_threads_cpu_ms_per_job'])}; "
                    f"{fmt(x['main_thread_wakeups_per_job'])} wake-ups per job); emulator "
                    f"{fmt(x['emulator_cpu_s'])} s",
                ),
            ]
        )
        lines.append("  requests by operation:")
        lines += ops_lines(x["ops"])
    for aim, met in r["aims"].items():
        lines.append(f"  aim {aim}: {'met' if met else 'NOT met'}")
    return lines


def human_inflight(r: Report) -> list[str]:
    aim = "met" if r["rss_aim_met"] else "NOT met"
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
                f"{fmt(r['rss_kb_per_job'])} kB per job in flight; aim ≤ "
                f"{RSS_AIM_MB:g} MB: {aim}",
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
    for name in ("spool", "paced", "spool-unpaced"):
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
        help="spool, paced, spool-unpaced, inflight (default: all; repeatable)",
    )
    p.add_argument(
        "--jobs", type=int, default=1_000, help="spool, paced: jobs (default %(default)s)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=0.25,
        help="paced: real seconds per emulated second: the emulator's --time-scale, the "
        "engine's timings and the pace of one job per emulated second (default %(default)s: "
        "1,000 jobs in about 250 s; 1 for one job per real second)",
    )
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="spool, paced, spool-unpaced: an [engine] timing in emulated seconds, e.g. "
        "join_coalesce_s=20 (repeatable; scaled like the others)",
    )
    p.add_argument(
        "--lanes",
        type=int,
        default=INFLIGHT_LANES,
        help="inflight: paths (lanes) the jobs are spread over (default %(default)s)",
    )
    p.add_argument("--rows", type=int, default=10, help="spool: rows per dataset (default 10)")
    p.add_argument(
        "--spool-deadline",
        type=float,
        default=300.0,
        help="spool: seconds for all results of a round (paced: after the last drop)",
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
    try:
        args.engine = {k.strip(): float(v) for k, v in (e.split("=", 1) for e in args.engine)}
    except ValueError:
        p.error("--engine takes NAME=SECONDS")
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
