"""`aep-exporter emulator`: serve the emulator, or seed its data lake."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from aep_emulator.settings import KNOB_GROUPS, SECRET_FILE, Flag, Knobs, Span

DEFAULT_DATA_DIR = Path(".aep-emulator")
SEEDED_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "not_ready_window_s": 3.0,
        "run_duration_s": Span(min=1, max=3),
        "seed": 1,
        "seed_datasets": 1,
        "rows": 1000,
    },
}
"""Option values a preset stands for; an option given on the command line wins. `quick`: one
dataset with a fixed id (seed 1), AEP's ten-minute not-ready window cut to three seconds and
runs of one to three, in real time: the README's quick try (with config/quick.toml)."""


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
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="quick: one seeded dataset (fixed id), a 3 s not-ready window and 1-3 s runs, for "
        "a first try with config/quick.toml; options given as well win",
    )
    net = parser.add_argument_group("listening")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    net.add_argument(
        "--port", type=int, default=8765, help="port; 0 picks a free one (default %(default)s)"
    )
    add_knob_options(parser)
    s = parser.add_argument_group("datasets")
    s.add_argument(
        "--seed-datasets",
        type=int,
        default=0,
        metavar="N",
        help="create N synthetic datasets before serving",
    )
    s.add_argument("--rows", type=int, default=10_000, help="rows per seeded dataset")
    parser.set_defaults(
        option_defaults={name: parser.get_default(name) for name in PRESETS["quick"]}
    )

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


class _Repeat(argparse.Action):
    """`append`, except that the first use replaces the default instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


def knob_flag(field: FieldInfo) -> Flag:
    (flag,) = [m for m in field.metadata if isinstance(m, Flag)]
    return flag


def option_name(name: str, flag: Flag) -> str:
    return flag.name or "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, Span):
        low, high = f"{value.min:g}", f"{value.max:g}"
        return low if low == high else f"{low}-{high}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _argument(field: FieldInfo, flag: Flag) -> dict[str, Any]:
    """argparse's keywords for a knob, from its type and default in the model."""
    default = field.get_default(call_default_factory=True)
    kind = field.annotation
    help_text = (field.description or "").replace("%", "%%")
    if default is not None and default is not False and not flag.from_file:
        help_text += f" (default {shown(default)})"
    found: dict[str, Any] = {"help": help_text}
    if flag.from_file:
        return found | {"type": Path, "default": None, "metavar": flag.metavar}
    if kind is bool:
        action = argparse.BooleanOptionalAction if default else "store_true"
        return found | {"action": action, "default": default}
    if get_origin(kind) is Literal:
        return found | {"choices": get_args(kind), "default": default}
    if get_origin(kind) is list:
        return found | {"action": _Repeat, "default": default, "metavar": flag.metavar}
    if kind is Span:
        return found | {"type": span, "default": default, "metavar": flag.metavar}
    if get_origin(kind) in (Union, UnionType):
        (kind,) = [a for a in get_args(kind) if a is not type(None)]
    if kind not in (str, int, float):
        raise TypeError(f"no command-line form for a knob of type {kind!r}")
    return found | {"type": kind, "default": default, "metavar": flag.metavar}


def add_knob_options(parser: argparse.ArgumentParser) -> None:
    """An option for every knob, named, typed, defaulted and explained by `Knobs` itself."""
    groups = {name: parser.add_argument_group(name) for name in KNOB_GROUPS}
    for name, field in Knobs.model_fields.items():
        flag = knob_flag(field)
        groups[flag.group].add_argument(
            option_name(name, flag), dest=name, **_argument(field, flag)
        )


def knobs_from(args: argparse.Namespace) -> Knobs:
    values: dict[str, Any] = {}
    for name, field in Knobs.model_fields.items():
        value = getattr(args, name)
        if knob_flag(field).from_file:
            if value is None:
                continue
            value = value.read_text().strip()
        values[name] = value
    return Knobs(**values)


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


def seeded_before(data_dir: Path, sandbox: str, seed: int | None) -> list[dict[str, Any]]:
    """The dataset a seeded run made in `data_dir` before, if it is there: a second
    `--preset quick` serves it again rather than add another beside it."""
    import tempfile

    from aep_emulator.datalake import DataLake

    if seed is None:
        return []
    with tempfile.TemporaryDirectory() as scratch:  # the id the seed gives first (no rows)
        first = DataLake(Path(scratch)).create_dataset(
            sandbox, "probe", 0, rng=random.Random(seed), now_ms=SEEDED_EPOCH_MS
        )
    found = DataLake(data_dir / "datalake").get(sandbox, first.id)
    if found is None:
        return []
    return [{"id": found.id, "name": found.name, "rows": found.rows, "sandbox": sandbox}]


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


def apply_preset(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """Fill in the preset's values where the command line left an option at its default."""
    for name, value in PRESETS.get(args.preset or "", {}).items():
        if getattr(args, name) == parser_defaults[name]:
            setattr(args, name, value)


def kept_secret(data_dir: Path, made: str) -> tuple[str, Path]:
    """The client secret kept in `data_dir` (`SECRET_FILE`), and where: the one a start made
    before, else `made`, written there first (mode 0600, whole or not at all)."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(made + "\n")
        try:
            os.link(tmp, path)  # fails if another start made it meanwhile: theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty: delete it to have a new secret made")
    return secret, path


def run_serve(args: argparse.Namespace) -> int:
    apply_preset(args, args.option_defaults)
    try:
        knobs = knobs_from(args)
        if args.client_secret is None:
            knobs.client_secret, where = kept_secret(args.data_dir, knobs.client_secret)
            print(f"client secret in {where} (the exporter's aep.client_secret_file)", flush=True)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.preset and (kept := seeded_before(args.data_dir, knobs.sandboxes[0], args.seed)):
        print(json.dumps({"seeded": kept}), flush=True)  # a second quick try: the same one
    elif args.seed_datasets:
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
