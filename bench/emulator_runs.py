"""Benchmark: how many batched run-status reads per second the emulator sustains.

`make bench-emulator` runs it. It starts `aep-exporter emulator` as a child process on
127.0.0.1 (no injected latency, runs of zero emulated duration), builds runs through the real
API (datasets seeded through the control API, then token, connections, flows and ad hoc runs
over HTTP), and then sends

    GET /data/foundation/flowservice/runs?property=id==<100 comma-separated run ids>

over keep-alive connections, rotating through id sets drawn from the stored runs: a warm-up,
then a measured span cut into equal windows. The emulator is one process and the load
generator another, so each can have a core of its own.

Load generators: `python` (the default) is a raw-socket asyncio client in this process, which
checks every answer for a fraction of the emulator's cost per request; `wrk` (Debian's
package, one thread, a Lua script rotating the paths and checking every answer) is the
cross-check, and falls back to `python` when wrk is not installed. The report says which ran.

Every answer is checked: status 200 and exactly 100 run items (each run object carries
`providerRefId` once). Before the load, every id set is fetched once and parsed in full to
check its items are exactly the runs asked for. The emulator's own journal (`/_emulator/stats`)
is read before and after the measured span as a server-side count of the answers it sent.

See docs/benchmarks.md, "Emulator: batched run status", for how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from harness import (
    HOST,
    MODULE,
    BenchError,
    children_cpu_seconds,
    cpu_model,
    emulator_headers,
    machine_busy_seconds,
    own_cpu_seconds,
    running_emulator,
)

from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    STORAGE_SPECS,
    StorageType,
)

TARGET_RPS = 2_000
RUNS_PATH = f"{FLOW_SERVICE_PATH}/runs"
ITEM_MARKER = b'"providerRefId":'  # once per run object in a runs answer
SETUP_DEADLINE = 300.0
# Runs the emulator under uvloop, for the --uvloop experiment only (uvloop is no dependency).
UVLOOP_LAUNCHER = (
    "import sys, uvloop; uvloop.install(); from exporter.cli import main; "
    "sys.argv[0] = 'aep-exporter'; raise SystemExit(main(sys.argv[1:]))"
)

WRK_SCRIPT = r"""
-- Written by bench/emulator_runs.py. Rotates the request paths, sends the AEP headers and
-- checks every answer: status 200 and exactly `expected` run items.
-- Counters are globals: done() reads them from each thread with thread:get().
local paths, expected, i = {}, 0, 0
responses, bad_status, bad_items = 0, 0, 0
min_bytes, max_bytes, body_bytes = math.huge, 0, 0
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("offset", #threads * 7919)
end

function init(args)
  expected = tonumber(args[2])
  for line in io.lines(args[1]) do
    local kind, a, b = line:match("^(%a)\t([^\t]*)\t?(.*)$")
    if kind == "H" then
      wrk.headers[a] = b
    elseif kind == "P" then
      paths[#paths + 1] = a
    end
  end
  i = offset or 0
end

function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then bad_status = bad_status + 1 end
  local n, at = 0, body:find('"providerRefId":', 1, true)
  while at do
    n = n + 1
    at = body:find('"providerRefId":', at + 16, true)
  end
  if n ~= expected then bad_items = bad_items + 1 end
  local size = #body
  body_bytes = body_bytes + size
  if size < min_bytes then min_bytes = size end
  if size > max_bytes then max_bytes = size end
end

function done(summary, latency, requests)
  local t = {responses = 0, bad_status = 0, bad_items = 0, body_bytes = 0,
             min_bytes = math.huge, max_bytes = 0}
  for _, thread in ipairs(threads) do
    t.responses = t.responses + thread:get("responses")
    t.bad_status = t.bad_status + thread:get("bad_status")
    t.bad_items = t.bad_items + thread:get("bad_items")
    t.body_bytes = t.body_bytes + thread:get("body_bytes")
    t.min_bytes = math.min(t.min_bytes, thread:get("min_bytes"))
    t.max_bytes = math.max(t.max_bytes, thread:get("max_bytes"))
  end
  if t.responses == 0 then t.min_bytes = 0 end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%d,"duration_us":%d,"responses":%d,"bad_status":%d,' ..
    '"bad_items":%d,"body_bytes":%d,"min_bytes":%d,"max_bytes":%d,"connect":%d,' ..
    '"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, t.responses, t.bad_status, t.bad_items,
    t.body_bytes, t.min_bytes, t.max_bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Usage:
    """CPU use over the measured span: the emulator's, and the whole machine's."""

    wall_s: float
    emulator_s: float | None
    machine_s: float | None


EMULATOR_KNOBS = ("--not-ready-window", "0", "--run-duration", "0", "--latency-ms", "0")


# -- building the runs through the API -----------------------------------------------------


@dataclass
class World:
    """What setup made: the run ids, the headers a platform call needs."""

    run_ids: list[str]
    headers: dict[str, str]
    datasets: int
    flows: int
    rounds: int
    setup_s: float


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.headers: dict[str, str] = {}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int = 200,
        extra: dict[str, str] | None = None,
    ) -> Any:
        async with self.session.request(
            method, self.url + path, json=body, headers={**self.headers, **(extra or {})}
        ) as resp:
            answer = await resp.json(content_type=None)
            if resp.status != expect:
                raise BenchError(f"{method} {path[:80]} -> {resp.status}: {answer}")
            return answer

    async def create(self, what: str, body: dict[str, Any]) -> str:
        answer = await self.call("POST", f"{FLOW_SERVICE_PATH}/{what}", body, expect=201)
        return str(answer["id"])


def runs_path(ids: Sequence[str]) -> str:
    return f"{RUNS_PATH}?property=id=={','.join(ids)}"


async def build_world(
    session: aiohttp.ClientSession, url: str, *, runs: int, datasets: int, flows: int, rows: int
) -> World:
    """Seed `datasets` datasets and `flows` flows over all of them, then trigger ad hoc runs
    round after round (one in-flight run per flow and dataset) until `runs` runs exist."""
    started = time.perf_counter()
    api = Api(session, url)
    seeded = await api.call(
        "POST",
        "/_emulator/datasets",
        {"count": datasets, "rows": rows, "name": "bench", "seed": 1},
        expect=201,
    )
    dataset_refs = [{"dataSetId": d["id"], "name": d["name"]} for d in seeded["datasets"]]
    api.headers = await emulator_headers(session, url)
    dlz = STORAGE_SPECS[StorageType.DLZ]
    spec = {"id": dlz.connection_spec_id, "version": "1.0"}
    base = await api.create("connections", {"name": "bench DLZ", "connectionSpec": spec})
    source = await api.create(
        "sourceConnections",
        {
            "name": "bench source",
            "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
            "params": {"datasets": dataset_refs},
        },
    )
    target = await api.create(
        "targetConnections",
        {
            "name": "bench target",
            "baseConnectionId": base,
            "connectionSpec": spec,
            "params": {
                "mode": "Server-to-server",
                "path": "bench",
                "datasetFileType": "PARQUET",
                "compression": "GZIP",
            },
        },
    )
    flow_ids = [
        await api.create(
            "flows",
            {
                "name": f"bench flow {n}",
                "flowSpec": {"id": dlz.dataset_flow_spec_id, "version": "1.0"},
                "sourceConnectionIds": [source],
                "targetConnectionIds": [target],
                "transformations": [],
                "scheduleParams": {
                    "exportMode": "DAILY_FULL_EXPORT",
                    "timeUnit": "day",
                    "interval": 0,
                    "startTime": int(time.time()),
                },
            },
        )
        for n in range(flows)
    ]
    accept = {"Accept": ADHOC_DATASET_ACCEPT}
    run_ids: list[str] = []
    rounds = 0
    while len(run_ids) < runs:
        rounds += 1
        fresh: list[str] = []
        for flow_id in flow_ids:
            wanted = [{"id": d["dataSetId"]} for d in dataset_refs][: runs - len(run_ids)]
            if not wanted:
                break
            body = {"activationInfo": {"destinations": [{"flowId": flow_id, "datasets": wanted}]}}
            answer = await api.call("POST", ADHOC_PATH, body, extra=accept)
            made = [
                d["statusURL"].rsplit("/", 1)[-1] for d in answer["destinations"][0]["datasets"]
            ]
            fresh += made
            run_ids += made
        # Runs of zero duration complete on their first read (which writes their files): read
        # them all before the next round triggers the same flow and dataset pairs again.
        for start in range(0, len(fresh), 100):
            await check_page(api, fresh[start : start + 100])
    return World(
        run_ids=run_ids,
        headers=api.headers,
        datasets=datasets,
        flows=flows,
        rounds=rounds,
        setup_s=time.perf_counter() - started,
    )


async def check_page(api: Api, ids: Sequence[str]) -> None:
    """One runs query, parsed in full: exactly the runs asked for, all successful."""
    answer = await api.call("GET", runs_path(ids))
    got = [item["id"] for item in answer["items"]]
    if len(got) != len(ids) or set(got) != set(ids) or "_links" in answer:
        raise BenchError(f"a runs query for {len(ids)} ids answered {len(got)} other items")
    for item in answer["items"]:
        status = item["metrics"]["statusSummary"]["status"]
        if status != "success":
            raise BenchError(f"run {item['id']} is {status}, not success")


async def served_by_status(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """How many runs queries the emulator has answered, by status, from its journal."""
    async with session.get(url + "/_emulator/stats") as resp:
        stats = await resp.json()
    counts: dict[str, int] = stats["ops"].get("runs.list", {})
    return counts


# -- load generators -----------------------------------------------------------------------


@dataclass
class Window:
    """One load window as the load generator saw it."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    bad_status: int
    bad_items: int
    socket_errors: int
    body_bytes: int
    min_bytes: int
    max_bytes: int
    cpu_s: float
    latencies_ns: list[int] = field(default_factory=list, repr=False)  # python only

    @property
    def errors(self) -> int:
        return self.bad_status + self.bad_items + self.socket_errors

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def _percentile_ms(sorted_ns: Sequence[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6


class _Tally:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.bad_status = self.bad_items = self.socket_errors = 0
        self.body_bytes = self.max_bytes = 0
        self.min_bytes = sys.maxsize


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection sending its next request as soon as the previous
    answer is complete, until the deadline. Reads `Content-Length` answers only (what aiohttp
    sends for a body it has in hand); anything else counts as a socket error. The socket reads
    straight into one buffer kept for the connection's life: no allocation per answer."""

    def __init__(
        self, requests: Sequence[bytes], offset: int, deadline: float, expected: int, t: _Tally
    ) -> None:
        self.requests, self.next, self.deadline = requests, offset, deadline
        self.expected, self.t = expected, t
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(1 << 18)  # doubles when an answer needs more
        self.n = 0  # bytes of the current answer in buf
        self.body_at = self.end = -1
        self.status = b""
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.deadline:
            self.transport.close()
            return
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.n = 0
        self.body_at = self.end = -1
        self.sent = time.perf_counter_ns()
        self.transport.write(request)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buf) - self.n < 1 << 16:
            self.buf.extend(bytes(len(self.buf)))
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes
        buf, n = self.buf, self.n
        if self.end < 0:
            head_end = buf.find(b"\r\n\r\n", 0, n)
            if head_end < 0:
                return
            status_line, *lines = bytes(buf[:head_end]).split(b"\r\n")
            length = -1
            for line in lines:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length < 0:
                self._fail()
                return
            self.status = status_line.split(b" ", 2)[1]
            self.body_at, self.end = head_end + 4, head_end + 4 + length
        if n < self.end:
            return
        t = self.t
        t.latencies_ns.append(time.perf_counter_ns() - self.sent)
        if n > self.end:  # nothing was asked for beyond this answer
            self._fail()
            return
        if self.status != b"200":
            t.bad_status += 1
        if buf.count(ITEM_MARKER, self.body_at, n) != self.expected:
            t.bad_items += 1
        size = n - self.body_at
        t.body_bytes += size
        t.min_bytes = min(t.min_bytes, size)
        t.max_bytes = max(t.max_bytes, size)
        self._send()

    def _fail(self) -> None:
        self.t.socket_errors += 1
        assert self.transport is not None
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.n and self.n != self.end:
            self.t.socket_errors += 1  # closed in the middle of an answer
        if not self.done.done():
            self.done.set_result(None)


async def _python_connection(
    port: int, requests: Sequence[bytes], offset: int, deadline: float, expected: int, t: _Tally
) -> None:
    try:
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: _Connection(requests, offset, deadline, expected, t), HOST, port
        )
    except OSError:
        t.socket_errors += 1
        return
    await conn.done


async def python_load(
    url: str,
    paths: Sequence[str],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    expected: int,
) -> Window:
    """`connections` keep-alive connections, each sending its next request when the previous
    answer is in, for `seconds`. Raw sockets: the client costs a fraction of what the server
    does per request, so one process keeps a single-threaded server busy."""
    split = urlsplit(url)
    if split.hostname != HOST or split.port is None:
        raise BenchError(f"refusing to load {url}: only {HOST} is a target")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [f"GET {p} HTTP/1.1\r\nHost: {split.netloc}\r\n{head}\r\n".encode() for p in paths]
    tally = _Tally()
    cpu0, started = own_cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(
            _python_connection(split.port, requests, n * 7919, deadline, expected, tally)
            for n in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(tally.latencies_ns)
    return Window(
        requests=len(latencies),
        duration_s=elapsed,
        p50_ms=_percentile_ms(latencies, 0.50),
        p99_ms=_percentile_ms(latencies, 0.99),
        max_ms=latencies[-1] / 1e6 if latencies else 0.0,
        bad_status=tally.bad_status,
        bad_items=tally.bad_items,
        socket_errors=tally.socket_errors,
        body_bytes=tally.body_bytes,
        min_bytes=tally.min_bytes if latencies else 0,
        max_bytes=tally.max_bytes,
        cpu_s=own_cpu_seconds() - cpu0,
        latencies_ns=latencies,
    )


def write_wrk_files(workdir: Path, paths: Sequence[str], headers: dict[str, str]) -> None:
    (workdir / "runs.lua").write_text(WRK_SCRIPT)
    lines = [f"H\t{k}\t{v}" for k, v in headers.items()] + [f"P\t{p}" for p in paths]
    (workdir / "requests.tsv").write_text("\n".join(lines) + "\n")


async def wrk_load(
    wrk: str, url: str, workdir: Path, *, connections: int, seconds: int, expected: int
) -> Window:
    """One wrk run (one thread) with the script and paths `write_wrk_files` left in
    `workdir`; its CPU time is read from this process's reaped children."""
    if urlsplit(url).hostname != HOST:
        raise BenchError(f"refusing to load {url}: only {HOST} is a target")
    cpu0 = children_cpu_seconds()
    proc = await asyncio.create_subprocess_exec(
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(workdir / "runs.lua"),
        url,
        "--",
        str(workdir / "requests.tsv"),
        str(expected),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(seconds + 30):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError("wrk did not finish in time") from None
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH-RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}):\n{text}")
    r = json.loads(line.removeprefix("BENCH-RESULT "))
    return Window(
        requests=r["requests"],
        duration_s=r["duration_us"] / 1e6,
        p50_ms=r["p50_us"] / 1e3,
        p99_ms=r["p99_us"] / 1e3,
        max_ms=r["max_us"] / 1e3,
        bad_status=r["bad_status"],
        # A request wrk counted without handing its answer to the script is unchecked.
        bad_items=r["bad_items"] + (r["requests"] - r["responses"]),
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        body_bytes=r["body_bytes"],
        min_bytes=r["min_bytes"],
        max_bytes=r["max_bytes"],
        cpu_s=children_cpu_seconds() - cpu0,
    )


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class Report:
    load_generator: str
    connections: int
    stored_runs: int
    datasets: int
    flows: int
    rounds: int
    ids_per_request: int
    id_sets: int
    setup_s: float
    warmup_s: float
    windows: int
    requests: int
    duration_s: float
    requests_per_s: float
    window_rps: list[float]
    window_p99_ms: list[float]
    p50_ms: float
    p99_ms: float
    max_ms: float
    latency_exact: bool
    response_bytes: int
    response_bytes_min: int
    response_bytes_max: int
    errors: int
    error_detail: dict[str, int]
    server_answers: dict[str, int]
    emulator_cpu_s: float | None
    emulator_cpu_us_per_request: float | None
    emulator_cores: float | None
    load_generator_cpu_s: float
    load_generator_cpu_us_per_request: float | None
    other_load_cores: float | None
    uvloop: bool
    python: str
    cores: int | None
    cpu_model: str
    target_rps: int


def choose_load_generator(wanted: str) -> str | None:
    """The wrk executable when wrk is wanted and installed, else None (the Python client)."""
    if wanted != "wrk":
        return None
    found = shutil.which("wrk")
    if found is None:
        print(
            "wrk is not installed (apt-get install wrk): using the Python client", file=sys.stderr
        )
    return found


def summarise(
    args: argparse.Namespace,
    wrk: str | None,
    world: World,
    id_sets: int,
    warm: Window | None,
    windows: list[Window],
    served: dict[str, int],
    usage: Usage,
) -> Report:
    n = sum(w.requests for w in windows)
    duration = sum(w.duration_s for w in windows)
    latencies = sorted(ns for w in windows for ns in w.latencies_ns)
    exact = len(latencies) == n and n > 0
    warm_errors = warm.errors if warm is not None else 0
    server_other = sum(v for k, v in served.items() if k != "200")
    loadgen_cpu = sum(w.cpu_s for w in windows)
    emulator_cpu, wall_s = usage.emulator_s, usage.wall_s
    other = None
    if usage.machine_s is not None and emulator_cpu is not None:
        other = max(0.0, (usage.machine_s - emulator_cpu - loadgen_cpu) / wall_s)
    return Report(
        load_generator=f"wrk ({wrk}, 1 thread)" if wrk else "python (raw asyncio sockets)",
        connections=args.connections,
        stored_runs=len(world.run_ids),
        datasets=world.datasets,
        flows=world.flows,
        rounds=world.rounds,
        ids_per_request=args.ids,
        id_sets=id_sets,
        setup_s=round(world.setup_s, 2),
        warmup_s=args.warmup,
        windows=len(windows),
        requests=n,
        duration_s=round(duration, 3),
        requests_per_s=round(n / duration, 1) if duration else 0.0,
        window_rps=[round(w.rps, 1) for w in windows],
        window_p99_ms=[round(w.p99_ms, 3) for w in windows],
        # wrk reports percentiles per run: then the median of the windows' p50 and the
        # highest of their p99 stand in for the exact figures over all requests.
        p50_ms=round(
            _percentile_ms(latencies, 0.50)
            if exact
            else statistics.median(w.p50_ms for w in windows),
            3,
        ),
        p99_ms=round(
            _percentile_ms(latencies, 0.99) if exact else max(w.p99_ms for w in windows), 3
        ),
        max_ms=round(max(w.max_ms for w in windows), 3),
        latency_exact=exact,
        response_bytes=sum(w.body_bytes for w in windows) // n if n else 0,
        response_bytes_min=min(w.min_bytes for w in windows),
        response_bytes_max=max(w.max_bytes for w in windows),
        errors=sum(w.errors for w in windows) + warm_errors + server_other,
        error_detail={
            "bad_status": sum(w.bad_status for w in windows),
            "bad_items": sum(w.bad_items for w in windows),
            "socket": sum(w.socket_errors for w in windows),
            "warmup": warm_errors,
            "server_non_200": server_other,
        },
        server_answers=served,
        emulator_cpu_s=None if emulator_cpu is None else round(emulator_cpu, 2),
        emulator_cpu_us_per_request=(
            None if emulator_cpu is None or not n else round(emulator_cpu / n * 1e6, 1)
        ),
        emulator_cores=None if emulator_cpu is None else round(emulator_cpu / wall_s, 2),
        load_generator_cpu_s=round(loadgen_cpu, 2),
        load_generator_cpu_us_per_request=round(loadgen_cpu / n * 1e6, 1) if n else None,
        other_load_cores=None if other is None else round(other, 2),
        uvloop=args.uvloop,
        python=sys.version.split()[0],
        cores=os.cpu_count(),
        cpu_model=cpu_model(),
        target_rps=TARGET_RPS,
    )


async def bench(args: argparse.Namespace) -> Report:
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        raise BenchError("--uvloop: uvloop is not installed (it is no project dependency)")
    wrk = choose_load_generator(args.loadgen)
    window_s = args.duration / args.windows
    with tempfile.TemporaryDirectory(prefix="aep-bench-") as tmp:
        workdir = Path(tmp)
        async with (
            running_emulator(
                EMULATOR_KNOBS,
                seed=args.seed,
                data_dir=workdir / "emulator",
                launcher=["-c", UVLOOP_LAUNCHER] if args.uvloop else MODULE,
            ) as emu,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        ):
            try:
                async with asyncio.timeout(SETUP_DEADLINE):
                    world = await build_world(
                        session,
                        emu.url,
                        runs=args.runs,
                        datasets=args.datasets,
                        flows=args.flows,
                        rows=args.rows,
                    )
                    rng = random.Random(args.seed)
                    id_sets = [rng.sample(world.run_ids, args.ids) for _ in range(args.id_sets)]
                    api = Api(session, emu.url)
                    api.headers = world.headers
                    for ids in id_sets:  # every query the load sends, parsed in full once
                        await check_page(api, ids)
            except TimeoutError:
                raise BenchError(f"setup took longer than {SETUP_DEADLINE:g} s") from None
            paths = [runs_path(ids) for ids in id_sets]
            if wrk is not None:
                write_wrk_files(workdir, paths, world.headers)

            async def load(seconds: float) -> Window:
                if wrk is not None:
                    return await wrk_load(
                        wrk,
                        emu.url,
                        workdir,
                        connections=args.connections,
                        seconds=max(1, round(seconds)),
                        expected=args.ids,
                    )
                return await python_load(
                    emu.url,
                    paths,
                    world.headers,
                    connections=args.connections,
                    seconds=seconds,
                    expected=args.ids,
                )

            warm = await load(args.warmup) if args.warmup > 0 else None
            before = await served_by_status(session, emu.url)
            cpu0, busy0, wall0 = emu.cpu_seconds(), machine_busy_seconds(), time.perf_counter()
            windows = [await load(window_s) for _ in range(args.windows)]
            cpu1, busy1, wall1 = emu.cpu_seconds(), machine_busy_seconds(), time.perf_counter()
            after = await served_by_status(session, emu.url)
            if emu.proc.returncode is not None:
                raise BenchError("the emulator died:\n" + "\n".join(emu.output))
    served = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    usage = Usage(
        wall_s=wall1 - wall0,
        emulator_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        machine_s=None if busy0 is None or busy1 is None else busy1 - busy0,
    )
    return summarise(args, wrk, world, len(id_sets), warm, windows, served, usage)


def table(r: Report) -> str:
    cpu = (
        "n/a (no /proc)"
        if r.emulator_cpu_s is None
        else f"{r.emulator_cpu_s:.2f} s = {r.emulator_cores:.2f} cores, "
        f"{r.emulator_cpu_us_per_request:.0f} µs/request"
    )
    spread = (
        f" (windows of {r.duration_s / r.windows:.1f} s: min {min(r.window_rps):,.0f}, "
        f"median {statistics.median(r.window_rps):,.0f}, max {max(r.window_rps):,.0f})"
        if r.windows > 1
        else ""
    )
    served = ", ".join(f"{status}: {n:,}" for status, n in sorted(r.server_answers.items()))
    rows = [
        ("endpoint", f"GET {RUNS_PATH}?property=id==<{r.ids_per_request} ids>"),
        ("machine", f"{r.cores} cores, {r.cpu_model}, Python {r.python}"),
        ("emulator", "under uvloop (experiment)" if r.uvloop else "asyncio event loop"),
        ("load generator", f"{r.load_generator}, {r.connections} keep-alive connections"),
        (
            "stored runs",
            f"{r.stored_runs:,} ({r.flows} flows, {r.datasets} datasets, {r.rounds} rounds; "
            f"setup {r.setup_s:.1f} s); {r.id_sets} id sets rotated",
        ),
        ("measured", f"{r.duration_s:.1f} s after a {r.warmup_s:g} s warm-up"),
        ("requests", f"{r.requests:,}; the emulator's journal: {served or 'none'}"),
        ("throughput", f"{r.requests_per_s:,.0f} requests/s{spread}"),
        (
            "latency",
            f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, max {r.max_ms:.1f} ms"
            + ("" if r.latency_exact else " (per-window wrk figures)"),
        ),
        (
            "response size",
            f"{r.response_bytes:,} bytes (min {r.response_bytes_min:,}, "
            f"max {r.response_bytes_max:,}), {r.ids_per_request} items each",
        ),
        ("errors", f"{r.errors}" + (f" {r.error_detail}" if r.errors else "")),
        ("emulator CPU", cpu),
        (
            "load generator CPU",
            f"{r.load_generator_cpu_s:.2f} s, {r.load_generator_cpu_us_per_request or 0:.0f} "
            "µs/request",
        ),
        (
            "other load",
            "n/a (no /proc)"
            if r.other_load_cores is None
            else f"{r.other_load_cores:.2f} cores busy with other processes"
            + (
                " (figures disturbed: rerun on a quiet machine)" if r.other_load_cores > 0.2 else ""
            ),
        ),
        (
            "target",
            f"≥ {r.target_rps:,} requests/s: "
            + ("met" if r.requests_per_s >= r.target_rps else "NOT met"),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/emulator_runs.py",
        description="Requests per second of the emulator's batched run-status query.",
    )
    p.add_argument("--runs", type=int, default=2_000, help="runs to store (default %(default)s)")
    p.add_argument("--datasets", type=int, default=20, help="datasets (default %(default)s)")
    p.add_argument("--flows", type=int, default=10, help="flows (default %(default)s)")
    p.add_argument("--rows", type=int, default=10, help="rows per dataset (default %(default)s)")
    p.add_argument("--ids", type=int, default=100, help="run ids per request (at most 100)")
    p.add_argument("--id-sets", type=int, default=200, help="distinct id sets, rotated")
    p.add_argument("--connections", type=int, default=16, help="(default %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--windows", type=int, default=5, help="equal windows the duration is cut in")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (default 2)")
    p.add_argument(
        "--loadgen",
        choices=["python", "wrk"],
        default="python",
        help="python (default), or wrk when installed (else python)",
    )
    p.add_argument(
        "--uvloop", action="store_true", help="experiment: run the emulator under uvloop"
    )
    p.add_argument("--seed", type=int, default=7, help="emulator and id-set seed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--require-rps", type=float, metavar="RPS", help="exit 3 when throughput is below RPS"
    )
    args = p.parse_args(argv)
    if not 1 <= args.ids <= 100:
        p.error("--ids must be between 1 and 100 (the runs API pages at 100)")
    if args.ids > args.runs or min(args.datasets, args.flows, args.connections, args.id_sets) < 1:
        p.error("--runs must be at least --ids; --datasets, --flows, --connections, --id-sets >= 1")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 60 or not 1 <= args.windows <= 60:
        p.error("--duration must be in (0, 600], --warmup in [0, 60], --windows in [1, 60]")
    if args.loadgen == "wrk" and args.duration / args.windows < 1:
        p.error("wrk measures whole seconds: --duration / --windows must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print("Emulator: batched run status")
        print(table(report))
    if report.errors or not report.requests:
        return 1
    if args.require_rps is not None and report.requests_per_s < args.require_rps:
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
