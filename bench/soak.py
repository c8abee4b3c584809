"""Soak: the daemon for an hour with about 1,000 runs in flight, jobs arriving and finishing all
the time, faults on. `make bench-soak` runs it (not CI: it takes the hour).

An `aep-exporter emulator` child process (real time, throttling, 5xx answers, failed runs, a
little latency) and `python -m exporter run` as a second child process, fed through its spool
as a producer must (`*.tmp`, then a rename). Jobs arrive at a steady rate, `--in-flight` / the
mean run duration, so about that many runs are in flight once the first have ended. Each job
exports a dataset from a pool (spread over a few export lanes) that is not being exported at the
moment; a consumer reads every result file and removes it with its job file, as a pipeline
would. Every `--sample-s` seconds it samples the daemon's RSS and open file descriptors (from
/proc), the journal's size with its WAL, and the event loop's lag (the mean of the daemon's own
`aep_exporter_event_loop_lag_seconds` histogram between two samples, from `/metrics`).

After `--duration` it stops feeding, waits for every job's result, stops the daemon (SIGTERM)
and checks: every job finished exactly once (nothing lost, nothing doubled), the daemon exited
0, and each series is flat after `--warmup-s`: its least-squares drift over the steady span is
within 5% of its mean. The figures go to stdout (and `--json`); the series are drawn into a PNG
(`--plot`, matplotlib from the `bench` extra). Exit status: 0 every check held, 1 a check
failed, 2 the soak could not run. See docs/benchmarks.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from daemon_spool import SPOOL_ENGINE
from harness import (
    RESULT_FOLDERS,
    BenchError,
    Checks,
    Control,
    Daemon,
    Report,
    cpu_of,
    job_body,
    loadavg,
    machine,
    memory_of,
    running_daemon,
    running_emulator,
    stop_process,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.daemon.journal import FILE_NAME

TOKEN = secrets.token_urlsafe(24)  # the admin token /metrics needs
FLAT = 0.05  # largest drift over the steady span, as a share of the series' mean
LAG_METRIC = "aep_exporter_event_loop_lag_seconds"
SERIES = {  # name: (label, unit)
    "rss_mb": ("daemon RSS", "MB"),
    "fds": ("open file descriptors", "count"),
    "journal_mb": ("journal + WAL", "MB"),
    "loop_lag_ms": ("event loop lag (mean)", "ms"),
}


@dataclass
class Pool:
    """Datasets not being exported now; a job takes one, its result gives it back. Each
    dataset has its home lane (its path), as a pipeline exports a dataset to one place."""

    free: deque[str]
    home: dict[str, int]  # dataset: its lane
    busy: dict[str, str] = field(default_factory=dict)  # job id: dataset

    def take(self) -> str | None:
        return self.free.popleft() if self.free else None

    def give_back(self, job_id: str) -> bool:
        dataset = self.busy.pop(job_id, None)
        if dataset is None:
            return False
        self.free.append(dataset)
        return True


@dataclass
class Tally:
    dropped: int = 0
    finished: Counter[str] = field(default_factory=Counter)  # by state
    seen: Counter[str] = field(default_factory=Counter)  # results per job id
    starved: int = 0  # arrivals skipped: every dataset was busy

    @property
    def done(self) -> int:
        return sum(self.finished.values())


async def feed(incoming: Path, pool: Pool, tally: Tally, rate: float, until: float) -> None:
    """Drop jobs at `rate` per second until the monotonic time `until`."""
    began = time.monotonic()
    while (now := time.monotonic()) < until:
        due = int((now - began) * rate) - tally.dropped - tally.starved
        for _ in range(due):
            dataset = pool.take()
            if dataset is None:
                tally.starved += 1
                continue
            n = tally.dropped
            job_id = f"soak-{n:07d}"
            tmp = incoming / f"{job_id}.json.tmp"
            tmp.write_text(job_body(job_id, dataset, f"soak/lane-{pool.home[dataset]:02d}"))
            tmp.rename(incoming / f"{job_id}.json")
            pool.busy[job_id] = dataset
            tally.dropped += 1
        await asyncio.sleep(0.1)


def consume(spool: Path, pool: Pool, tally: Tally) -> None:
    """Read and remove every result file and its job file, as a pipeline would."""
    for folder in RESULT_FOLDERS:
        with os.scandir(spool / folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".result.json")]
        for name in names:
            path = spool / folder / name
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # written by a rename, so only a vanished file lands here
            job_id = str(result["job_id"])
            tally.seen[job_id] += 1
            tally.finished[str(result["state"])] += 1
            pool.give_back(job_id)
            path.unlink(missing_ok=True)
            (spool / folder / name.removesuffix(".result.json")).unlink(missing_ok=True)


def open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def journal_mb(state_dir: Path) -> float:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += (state_dir / f"{FILE_NAME}{suffix}").stat().st_size
    return total / 1e6


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The loop-lag histogram's sum and count and the jobs in flight, from /metrics."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(f"{url}/metrics", headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise BenchError(f"/metrics answered {resp.status}: {text[:200]}")
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (f"{LAG_METRIC}_sum", f"{LAG_METRIC}_count"):
                found[s.name.rsplit("_", 1)[1]] = s.value
            elif s.name == "aep_exporter_jobs_in_flight":
                found["in_flight"] = s.value
    return found


def admin_url(daemon: Daemon) -> str:
    for line in daemon.log.read_text(errors="replace").splitlines():
        if '"admin_listening"' in line:
            event = json.loads(line)
            return f"http://127.0.0.1:{event['port']}"
    raise BenchError("the daemon logged no admin_listening line")


def drift(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope x the span, over the mean: how far the series moved, as a share."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0 or mv == 0:
        return None
    slope = sum((t - mt) * (v - mv) for t, v in points) / var
    return slope * (points[-1][0] - points[0][0]) / mv


def plot(samples: Sequence[Report], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SERIES), 1, figsize=(9, 9), sharex=True)
    minutes = [s["t"] / 60 for s in samples]
    for ax, (key, (label, unit)) in zip(axes, SERIES.items(), strict=True):
        ax.plot(minutes, [s[key] for s in samples], linewidth=1)
        ax.axvline(warmup_s / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"{label}\n({unit})", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    in_flight = axes[0].twinx()
    in_flight.plot(minutes, [s["in_flight"] for s in samples], color="tab:orange", linewidth=0.8)
    in_flight.set_ylabel("jobs in flight", fontsize=8, color="tab:orange")
    in_flight.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes (dashed: end of warm-up)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def soak(args: argparse.Namespace, work: Path, checks: Checks) -> Report:
    low, high = (float(x) for x in args.run_duration.split("-"))
    rate = args.in_flight / ((low + high) / 2)
    knobs = ["--not-ready-window", "2", "--run-duration", args.run_duration]
    knobs += ["--time-scale", "1", "--latency-ms", "5-20", "--rate-limit", str(args.aep_rps)]
    knobs += ["--error-429-rate", "0.01", "--error-5xx-rate", "0.01"]
    knobs += ["--run-failure-rate", "0.02"]
    engine = dict(SPOOL_ENGINE)
    daemon_cfg: dict[str, float] = {"max_in_flight": args.in_flight * 2, "rescan_s": 5}
    daemon_cfg["journal_retention_days"] = args.retention_days
    admin = {"port": 0, "token": TOKEN}
    aep = {"rate_limit_rps": args.aep_rps, "max_concurrency": 32}
    samples: list[Report] = []
    tally = Tally()
    async with (
        running_emulator(knobs, seed=args.seed, data_dir=work / "emulator") as emu,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        datasets = await Control(session, emu.url).seed(args.datasets, 1)
        random.Random(args.seed).shuffle(datasets)
        pool = Pool(deque(datasets), {d: i % args.lanes for i, d in enumerate(datasets)})
        config = write_config(work, emu.url, aep=aep, engine=engine, daemon=daemon_cfg, admin=admin)
        spool, state_dir = work / "spool", work / "state"
        async with running_daemon(config, work / "daemon.log") as daemon:
            await daemon.ready()
            url = admin_url(daemon)
            began = time.monotonic()
            feeding = asyncio.create_task(
                feed(spool / "incoming", pool, tally, rate, began + args.duration)
            )
            last = await scrape(session, url)
            cpu0 = sum(cpu_of(daemon.pid))
            try:
                while not feeding.done() or tally.done < tally.dropped:
                    await asyncio.sleep(args.sample_s)
                    daemon.alive()
                    consume(spool, pool, tally)
                    now = await scrape(session, url)
                    count = now.get("count", 0) - last.get("count", 0)
                    lag = (now.get("sum", 0) - last.get("sum", 0)) / count if count else 0.0
                    last = now
                    samples.append(
                        {
                            "t": round(time.monotonic() - began, 1),
                            "rss_mb": memory_of(daemon.pid).get("VmRSS", 0.0),
                            "fds": open_fds(daemon.pid),
                            "journal_mb": round(journal_mb(state_dir), 3),
                            "loop_lag_ms": round(lag * 1000, 3),
                            "in_flight": now.get("in_flight", 0),
                            "done": tally.done,
                        }
                    )
                    if feeding.done():
                        feeding.result()  # raises what stopped it
                        if time.monotonic() - began > args.duration + args.drain_deadline_s:
                            raise BenchError(
                                f"{tally.dropped - tally.done} jobs without a result "
                                f"{args.drain_deadline_s:g} s after the last arrival"
                            )
            finally:
                feeding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeding
            cpu = sum(cpu_of(daemon.pid)) - cpu0
            code = await stop_process(daemon.proc, 60)
            events = daemon.events()
    steady = [s for s in samples if args.warmup_s <= s["t"] <= args.duration]
    flatness: Report = {}
    for key in SERIES:
        values = [s[key] for s in steady]
        d = drift([(s["t"], s[key]) for s in steady])
        flatness[key] = {
            "mean": round(sum(values) / len(values), 3) if values else None,
            "min": min(values, default=None),
            "max": max(values, default=None),
            "drift": None if d is None else round(d, 4),
        }
        checks.check(
            "soak", f"{SERIES[key][0]} flat within {FLAT:.0%}", d is not None and abs(d) <= FLAT, d
        )
    doubled = {j: n for j, n in tally.seen.items() if n > 1}
    checks.check("soak", "every job finished", tally.done == tally.dropped, tally.finished)
    checks.check("soak", "no job finished twice", not doubled, doubled)
    checks.check("soak", "the daemon exited 0 on SIGTERM", code == 0, code)
    in_flight = [s["in_flight"] for s in steady]
    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup_s,
        "emulator": " ".join(knobs),
        "arrival_rate_per_s": round(rate, 2),
        "jobs": tally.dropped,
        "outcomes": dict(tally.finished),
        "arrivals_skipped_pool_busy": tally.starved,
        "in_flight_steady": [min(in_flight, default=0), max(in_flight, default=0)],
        "daemon_cpu_ms_per_job": round(cpu / max(1, tally.dropped) * 1000, 2),
        "flatness": flatness,
        "exit_code": code,
        "warnings_and_errors": {
            k: n for k, n in events.most_common() if k.split(":")[0] in ("warning", "error")
        },
        "loadavg_end": loadavg(),
        "samples": samples,
    }


def human(report: Report, checks: Checks) -> str:
    r = report["soak"]
    lines = [
        f"soak: {r['duration_s']} s, {r['jobs']} jobs at {r['arrival_rate_per_s']}/s, "
        f"in flight after warm-up {r['in_flight_steady'][0]:g}-{r['in_flight_steady'][1]:g}",
        f"  outcomes {r['outcomes']}, daemon CPU {r['daemon_cpu_ms_per_job']} ms/job",
    ]
    for key, f in r["flatness"].items():
        lines.append(
            f"  {SERIES[key][0]:>24}: mean {f['mean']} {SERIES[key][1]}, "
            f"min {f['min']}, max {f['max']}, drift {f['drift']}"
        )
    lines += [f"  {'ok ' if c['ok'] else 'FAIL'} {c['check']}" for c in checks.results]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3600, help="seconds of arrivals")
    p.add_argument("--warmup-s", type=float, default=600, help="left out of the flatness check")
    p.add_argument("--in-flight", type=int, default=1000, help="runs in flight to aim at")
    p.add_argument("--run-duration", default="100-140", help="seconds, uniform in A-B")
    p.add_argument("--datasets", type=int, default=1500, help="the pool jobs export from")
    p.add_argument("--lanes", type=int, default=15, help="export lanes (paths)")
    p.add_argument("--aep-rps", type=float, default=50.0, help="AEP's and the daemon's rate")
    p.add_argument(
        "--retention-days",
        type=float,
        default=0.005,
        help="daemon.journal_retention_days: 0.005 (7.2 min), so an hour's soak prunes",
    )
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--drain-deadline-s", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plot", type=Path, default=Path("docs/soak.png"))
    p.add_argument("--json", type=Path, help="write the full report (samples too) here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    checks = Checks()
    try:
        report: Report = {"machine": machine(), "soak": asyncio.run(soak(args, work, checks))}
    except BenchError as exc:
        print(f"soak could not run: {exc}", file=sys.stderr)
        print(f"work folder kept: {work}", file=sys.stderr)
        return 2
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    r = report["soak"]
    title = (
        f"aep-exporter soak: {r['jobs']} jobs in {args.duration / 60:g} min, "
        f"~{args.in_flight} runs in flight, faults on"
    )
    plot(r["samples"], args.warmup_s, args.plot, title)
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "checks": checks.results}, indent=1))
    print(human(report, checks))
    print(f"plot: {args.plot}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
