"""`aep-exporter emulator`: serve the emulator, or seed its data lake."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aep_emulator.settings import Knobs, Span

DEFAULT_DATA_DIR = Path(".aep-emulator")
SEEDED_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "emulator",
        help="run a local emulator of the AEP APIs (no Adobe account needed)",
        description="Serve Adobe Experience Platform's IMS, Flow Service, ad hoc run and Data "
        "Landing Zone APIs on this machine. Runs really export datasets from the data folder "
        "into local folders standing for the destinations. Durations are emulated seconds, "
        "multiplied by --time-scale. The control API lives under /_emulator.",
    )
    parser.set_defaults(func=run_serve)
    _common(parser)
    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    net.add_argument(
        "--port", type=int, default=8765, help="port; 0 picks a free one (default %(default)s)"
    )
    who = parser.add_argument_group("identity")
    who.add_argument(
        "--client-id",
        default=Knobs().client_id,
        help="the accepted client id, also the API key (default %(default)s)",
    )
    who.add_argument(
        "--client-secret-file",
        type=Path,
        help="file holding the accepted client secret (default: the documented 'emulator-secret')",
    )
    who.add_argument(
        "--org-id",
        default=Knobs().org_id,
        help="the IMS org of the tokens it issues (default %(default)s)",
    )
    who.add_argument(
        "--sandbox",
        action="append",
        dest="sandboxes",
        help="a sandbox name to serve; repeat for more (default: prod and dev)",
    )
    who.add_argument(
        "--token-lifetime",
        type=float,
        default=Knobs().token_lifetime_s,
        metavar="S",
        help="access token lifetime in seconds (default %(default)s)",
    )
    t = parser.add_argument_group("emulated time")
    t.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="real seconds per emulated second (0.01: ten minutes take six seconds)",
    )
    t.add_argument(
        "--not-ready-window",
        type=float,
        default=600,
        metavar="S",
        help="emulated seconds after a dataset joins a flow (its creation, or a PATCH of "
        "sourceConnectionIds) during which ad hoc runs answer 'not ready' (default %(default)s)",
    )
    t.add_argument(
        "--run-duration",
        type=span,
        default=Span(min=20, max=60),
        metavar="A-B",
        help="emulated run duration, uniform in [A, B] (default 20-60)",
    )
    t.add_argument(
        "--run-failure-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of runs that end failed, shaped like AEP's failed runs",
    )
    t.add_argument(
        "--run-partial-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of successful runs that report warnings in errors[]",
    )
    t.add_argument(
        "--adhoc-disabled-flow-spec",
        action="append",
        default=[],
        metavar="ID",
        help="flow spec id whose ad hoc runs 'can not be executed'",
    )
    g = parser.add_argument_group("guardrails")
    g.add_argument(
        "--max-destination-flows",
        type=int,
        default=Knobs().max_destination_flows,
        metavar="N",
        help="destination dataflows a sandbox may hold before creating one more is refused "
        "(Adobe's guardrail; default %(default)s)",
    )
    g.add_argument(
        "--adhoc-max-datasets-per-call",
        type=int,
        default=Knobs().adhoc_max_datasets_per_call,
        metavar="N",
        help="datasets one ad hoc call may name, over all its flows (default %(default)s)",
    )
    f = parser.add_argument_group("faults on platform calls")
    f.add_argument(
        "--latency-ms",
        type=span,
        default=Span(min=0, max=0),
        metavar="A-B",
        help="added latency per call in ms, uniform in [A, B] (default 0)",
    )
    f.add_argument(
        "--rate-limit",
        type=float,
        metavar="RPS",
        help="requests per second per org before 429 (default: unlimited)",
    )
    f.add_argument(
        "--rate-limit-burst",
        type=float,
        metavar="N",
        help="calls allowed at once before the limit applies (default: RPS)",
    )
    f.add_argument(
        "--retry-after",
        choices=["always", "never", "random"],
        default="always",
        help="whether 429 answers carry Retry-After (default %(default)s)",
    )
    f.add_argument(
        "--error-429-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of calls answered 429 regardless of the rate limit",
    )
    f.add_argument(
        "--error-5xx-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of calls answered 500, 502, 503 or 504, without effect",
    )
    f.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of connections closed with no answer (half before, half after "
        "the request took effect)",
    )
    f.add_argument(
        "--slow-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of calls delayed by a further --slow-ms",
    )
    f.add_argument("--slow-ms", type=float, default=5000.0, help="(default %(default)s)")
    f.add_argument(
        "--allow-json-uncompressed",
        action="store_true",
        help="accept JSON without GZIP, as Adobe's examples (not its rules) do",
    )
    f.add_argument("--seed", type=int, help="random seed for faults and durations")
    s = parser.add_argument_group("datasets")
    s.add_argument(
        "--seed-datasets",
        type=int,
        default=0,
        metavar="N",
        help="create N synthetic datasets before serving",
    )
    s.add_argument("--rows", type=int, default=10_000, help="rows per seeded dataset")

    sub = parser.add_subparsers(dest="emulator_command")
    seed = sub.add_parser(
        "seed", help="create synthetic feature datasets and print their ids as JSON"
    )
    _common(seed)
    seed.add_argument("--count", type=int, default=3, help="datasets to create (default 3)")
    seed.add_argument("--rows", type=int, default=10_000, help="rows each (default 10000)")
    seed.add_argument("--name", default="customer_features", help="dataset name (prefix)")
    seed.add_argument("--sandbox", default="prod")
    seed.add_argument(
        "--seed",
        type=int,
        help="random seed: the same seed gives the same datasets and ids (default: random)",
    )
    seed.set_defaults(func=run_seed)


def span(text: str) -> Span:
    """An argparse type for `A-B` ranges that says what is wrong with a bad one."""
    try:
        return Span.parse(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError("; ".join(str(e["msg"]) for e in exc.errors())) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a range A-B") from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where datasets and exported files live (default %(default)s)",
    )


def knobs_from(args: argparse.Namespace) -> Knobs:
    secret = (
        args.client_secret_file.read_text().strip()
        if args.client_secret_file
        else Knobs().client_secret
    )
    return Knobs(
        client_id=args.client_id,
        client_secret=secret,
        org_id=args.org_id,
        sandboxes=args.sandboxes or ["prod", "dev"],
        token_lifetime_s=args.token_lifetime,
        time_scale=args.time_scale,
        not_ready_window_s=args.not_ready_window,
        run_duration_s=args.run_duration,
        run_failure_rate=args.run_failure_rate,
        run_partial_rate=args.run_partial_rate,
        adhoc_disabled_flow_specs=args.adhoc_disabled_flow_spec,
        latency_ms=args.latency_ms,
        rate_limit_rps=args.rate_limit,
        rate_limit_burst=args.rate_limit_burst,
        retry_after=args.retry_after,
        error_429_rate=args.error_429_rate,
        error_5xx_rate=args.error_5xx_rate,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
        allow_json_uncompressed=args.allow_json_uncompressed,
        max_destination_flows=args.max_destination_flows,
        adhoc_max_datasets_per_call=args.adhoc_max_datasets_per_call,
        seed=args.seed,
    )


def seed_lake(
    data_dir: Path, *, sandbox: str, name: str, count: int, rows: int, seed: int | None
) -> list[dict[str, Any]]:
    from aep_emulator.datalake import DataLake  # pyarrow: only when seeding

    lake = DataLake(data_dir / "datalake")
    rng = random.Random(seed)
    # A seeded run is reproducible, ids included (they embed the creation time).
    now = SEEDED_EPOCH_MS if seed is not None else int(time.time() * 1000)
    made = []
    for i in range(count):
        ds = lake.create_dataset(
            sandbox, name if count == 1 else f"{name}_{i + 1:02d}", rows, rng=rng, now_ms=now
        )
        made.append({"id": ds.id, "name": ds.name, "rows": ds.rows, "sandbox": sandbox})
    return made


def run_seed(args: argparse.Namespace) -> int:
    if args.count < 1 or args.rows < 0:
        print("error: --count must be at least 1 and --rows at least 0", file=sys.stderr)
        return 2
    made = seed_lake(
        args.data_dir,
        sandbox=args.sandbox,
        name=args.name,
        count=args.count,
        rows=args.rows,
        seed=args.seed,
    )
    print(json.dumps(made, indent=2))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        knobs = knobs_from(args)
    except (ValidationError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seed_datasets:
        made = seed_lake(
            args.data_dir,
            sandbox=knobs.sandboxes[0],
            name="customer_features",
            count=args.seed_datasets,
            rows=args.rows,
            seed=args.seed,
        )
        print(json.dumps({"seeded": made}), flush=True)
    return asyncio.run(_serve(knobs, args.data_dir, args.host, args.port))


async def _serve(knobs: Knobs, data_dir: Path, host: str, port: int) -> int:
    from aep_emulator.app import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serve(knobs, data_dir, host=host, port=port) as (url, _):
            print(f"aep-exporter emulator listening on {url} (data in {data_dir})", flush=True)
            await stop.wait()
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0
