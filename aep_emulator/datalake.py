"""The emulator's data lake: datasets stored as Parquet batches in a local folder.

Layout: `root/<sandbox>/<dataset_id>/dataset.json` holds the metadata and
`root/<sandbox>/<dataset_id>/batches/<batch_id>.parquet` the rows. The folder is the source of
truth: a new `DataLake` loads whatever an earlier process (or a `seed` command) left there.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import random
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_SANDBOX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,255}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SANDBOX_NS = uuid.UUID("6f0a7c1e-3b55-4c55-9a4e-4d0d3d1f7a10")
_COUNTRIES = ("US", "GB", "DE", "FR", "CA", "AU", "JP", "BR", "IN", "NL")
_COUNTRY_WEIGHTS = (0.38, 0.12, 0.1, 0.08, 0.07, 0.06, 0.06, 0.05, 0.05, 0.03)
_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_WEIGHTS = (0.58, 0.34, 0.08)
_DAY_MS = 86_400_000
_GENERATE_ROWS = 262_144

_SCHEMA = pa.schema(
    [
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("snapshot_date", pa.date32(), nullable=False),
        pa.field("last_event_ts", pa.timestamp("ms", tz="UTC")),
        pa.field("recency_days", pa.float64()),
        pa.field("frequency_30d", pa.int32()),
        pa.field("monetary_90d", pa.float64()),
        pa.field("avg_session_minutes", pa.float64()),
        pa.field("email_open_rate", pa.float64()),
        pa.field("country", pa.string()),
        pa.field("device_type", pa.string()),
        pa.field("purchased_next_30d", pa.bool_()),
    ]
)


@dataclass(frozen=True, slots=True)
class Batch:
    """One ingested batch: a Parquet file of rows added at `created_ms`."""

    id: str
    created_ms: int
    path: Path
    rows: int


@dataclass(frozen=True, slots=True)
class Dataset:
    """A data-lake dataset and its batches, oldest batch first."""

    id: str
    name: str
    description: str
    sandbox: str
    created_ms: int
    columns: tuple[str, ...]
    batches: tuple[Batch, ...]

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.batches)

    @property
    def updated_ms(self) -> int:
        return self.batches[-1].created_ms if self.batches else self.created_ms

    def to_catalog(self, ims_org: str) -> dict[str, Any]:
        """This dataset as a Catalog item of the exportable-datasets listing (`.../configs`)."""
        # Catalog view ids are the next ObjectId after the dataset's, as in Adobe's example.
        view_id = f"{(int(self.id, 16) + 1) % 16**24:024x}"
        schema_hash = hashlib.sha256(",".join(self.columns).encode()).hexdigest()[:48]
        item: dict[str, Any] = {
            "id": self.id,
            "schemaRef": {
                "id": f"https://ns.adobe.com/emulator/schemas/{schema_hash}",
                "contentType": "application/vnd.adobe.xed-full+json;version=1",
            },
            "name": self.name,
            "description": self.description,
            "state": "ENABLED",
            "tags": {
                "adobe/pqs/table": [_table_name(self.name)],
                "unifiedIdentity": ["enabled:false"],
            },
            "fileDescription": {
                "persisted": True,
                "containerFormat": "parquet",
                "format": "parquet",
            },
            "aspect": "production",
            "imsOrg": ims_org,
            "sandboxId": str(uuid.uuid5(_SANDBOX_NS, self.sandbox)),
            "version": "1.0.0",
            "created": self.created_ms,
            "updated": self.updated_ms,
            "createdClient": "emulator",
            "createdUser": "emulator@AdobeID",
            "updatedUser": "acp_foundation_dataTracker@AdobeID",
            "viewId": view_id,
            "basePath": f"abfss://emulator@datalake.dfs.core.windows.net/platform/{self.id}"
            f"/datasetViewId={view_id}",
            "files": f"@/dataSetFiles?dataSetId={self.id}",
            "enableErrorDiagnostics": False,
        }
        if self.batches:
            last = self.batches[-1].id
            item |= {"lastBatchStatus": "success", "lastBatchId": last, "lastSuccessfulBatch": last}
        return item


class DataLake:
    """Datasets of one emulator, kept on disk under `root` and mirrored in memory.

    Safe to call from several threads: file writes happen outside the lock, metadata changes
    inside it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._datasets: dict[tuple[str, str], Dataset] = {}
        self._reserved: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)
        for meta in sorted(root.glob("*/*/dataset.json")):
            if not meta.is_file():
                continue
            ds = self._load(meta)
            self._datasets[(ds.sandbox, ds.id)] = ds

    def create_dataset(
        self,
        sandbox: str,
        name: str,
        rows: int,
        *,
        rng: random.Random,
        now_ms: int,
        description: str = "",
    ) -> Dataset:
        """Create a dataset holding one batch of `rows` synthetic feature rows (none if 0)."""
        if not _SANDBOX_RE.match(sandbox):
            raise ValueError(f"invalid sandbox name {sandbox!r}")
        if rows < 0:
            raise ValueError("rows must be >= 0")
        dataset_id = self._reserve(sandbox, rng, now_ms)
        ds = Dataset(dataset_id, name, description, sandbox, now_ms, tuple(_SCHEMA.names), ())
        return self._publish(
            ds, lambda ds: (self._write_batch(ds, rows, rng, now_ms),) if rows else ()
        )

    def _reserve(self, sandbox: str, rng: random.Random, now_ms: int) -> str:
        """A new dataset id, reserved: not listed, since readers must not see a dataset whose
        rows are still coming; `_publish` lists it or gives it back."""
        with self._lock:
            dataset_id = _object_id(rng, now_ms)
            while (sandbox, dataset_id) in self._datasets or dataset_id in self._reserved:
                dataset_id = _object_id(rng, now_ms)
            self._reserved.add(dataset_id)
        return dataset_id

    def _publish(self, ds: Dataset, write: Callable[[Dataset], tuple[Batch, ...]]) -> Dataset:
        """Write a reserved dataset's batches, then list it; on any failure its folder goes."""
        try:
            ds = replace(ds, batches=write(ds))
            with self._lock:
                self._save(ds)
                self._datasets[(ds.sandbox, ds.id)] = ds
        except BaseException:
            shutil.rmtree(self._dir(ds.sandbox, ds.id), ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._reserved.discard(ds.id)
        return ds

    def append_rows(
        self, sandbox: str, dataset_id: str, rows: int, *, rng: random.Random, now_ms: int
    ) -> Batch:
        """Add a new batch of `rows` synthetic rows to an existing dataset (KeyError if absent)."""
        if rows < 0:
            raise ValueError("rows must be >= 0")
        ds = self.get(sandbox, dataset_id)
        if ds is None:
            raise KeyError(f"no dataset {dataset_id} in sandbox {sandbox}")
        return self._add_batch(ds, self._write_batch(ds, rows, rng, now_ms))

    def create_from_table(
        self, sandbox: str, name: str, table: pa.Table, *, rng: random.Random, now_ms: int
    ) -> Dataset:
        """A new dataset named `name` whose one batch holds `table` (a query's result)."""
        if not _SANDBOX_RE.match(sandbox):
            raise ValueError(f"invalid sandbox name {sandbox!r}")
        dataset_id = self._reserve(sandbox, rng, now_ms)
        ds = Dataset(dataset_id, name, "", sandbox, now_ms, tuple(table.schema.names), ())
        return self._publish(ds, lambda ds: (self._write_table(ds, table, rng, now_ms),))

    def append_table(
        self, sandbox: str, dataset_id: str, table: pa.Table, *, rng: random.Random, now_ms: int
    ) -> Batch:
        """Add `table` as a new batch of an existing dataset (KeyError if absent)."""
        ds = self.get(sandbox, dataset_id)
        if ds is None:
            raise KeyError(f"no dataset {dataset_id} in sandbox {sandbox}")
        return self._add_batch(ds, self._write_table(ds, table, rng, now_ms))

    def _add_batch(self, ds: Dataset, batch: Batch) -> Batch:
        """List a written batch as the dataset's newest (read again under the lock: another
        append may have come meanwhile)."""
        with self._lock:
            current = self._datasets[(ds.sandbox, ds.id)]
            ds = replace(current, batches=(*current.batches, batch))
            self._save(ds)
            self._datasets[(ds.sandbox, ds.id)] = ds
        return batch

    def _write_table(self, ds: Dataset, table: pa.Table, rng: random.Random, now_ms: int) -> Batch:
        batch_id = _ulid(rng, now_ms)
        path = self._dir(ds.sandbox, ds.id) / "batches" / f"{batch_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return Batch(batch_id, now_ms, path, table.num_rows)

    def get(self, sandbox: str, dataset_id: str) -> Dataset | None:
        """The dataset, or None if the sandbox has no such dataset."""
        with self._lock:
            return self._datasets.get((sandbox, dataset_id))

    def list(self, sandbox: str) -> builtins.list[Dataset]:
        """The sandbox's datasets, newest first."""
        with self._lock:
            found = [ds for (sb, _), ds in self._datasets.items() if sb == sandbox]
        return sorted(found, key=lambda d: (d.created_ms, d.id), reverse=True)

    def clear(self) -> None:
        """Forget every dataset and delete its files (only the lake's own folders)."""
        with self._lock:
            for sandbox, dataset_id in self._datasets:
                shutil.rmtree(self._dir(sandbox, dataset_id), ignore_errors=True)
            for sandbox in {sb for sb, _ in self._datasets}:
                if not any((self.root / sandbox).iterdir()):
                    (self.root / sandbox).rmdir()
            self._datasets.clear()

    def _dir(self, sandbox: str, dataset_id: str) -> Path:
        return self.root / sandbox / dataset_id

    def _write_batch(self, ds: Dataset, rows: int, rng: random.Random, now_ms: int) -> Batch:
        batch_id = _ulid(rng, now_ms)
        path = self._dir(ds.sandbox, ds.id) / "batches" / f"{batch_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with pq.ParquetWriter(tmp, _SCHEMA) as writer:
            # Generated in slices so memory stays flat for datasets of any size.
            for start in range(0, max(rows, 1), _GENERATE_ROWS):
                chunk = _generate(min(_GENERATE_ROWS, rows - start), rng=rng, now_ms=now_ms)
                writer.write_table(chunk, row_group_size=131_072)
        tmp.replace(path)
        return Batch(batch_id, now_ms, path, rows)

    def _save(self, ds: Dataset) -> None:
        meta = {
            "id": ds.id,
            "name": ds.name,
            "description": ds.description,
            "sandbox": ds.sandbox,
            "created": ds.created_ms,
            "columns": list(ds.columns),
            "batches": [{"id": b.id, "created": b.created_ms, "rows": b.rows} for b in ds.batches],
        }
        path = self._dir(ds.sandbox, ds.id) / "dataset.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".dataset.json.tmp")
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tmp.replace(path)

    def _load(self, meta_path: Path) -> Dataset:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        batch_dir = meta_path.parent / "batches"
        batches = tuple(
            Batch(b["id"], int(b["created"]), batch_dir / f"{b['id']}.parquet", int(b["rows"]))
            for b in meta["batches"]
        )
        return Dataset(
            id=meta_path.parent.name,
            name=meta["name"],
            description=meta.get("description", ""),
            sandbox=meta_path.parent.parent.name,
            created_ms=int(meta["created"]),
            columns=tuple(meta["columns"]),
            batches=batches,
        )


def _generate(rows: int, *, rng: random.Random, now_ms: int) -> pa.Table:
    """A customer-propensity feature table of `rows` rows, deterministic given `rng`."""

    def uniform() -> Any:
        return pc.random(rows, initializer=rng.getrandbits(63))

    def exponential(mean: float) -> Any:
        return pc.multiply(pc.negate(pc.ln(pc.subtract(1.0, uniform()))), mean)

    def with_nulls(values: Any, rate: float) -> Any:
        return pc.if_else(pc.less(uniform(), rate), pa.scalar(None, values.type), values)

    digits = [
        pc.utf8_lpad(
            pc.cast(pc.floor(pc.multiply(uniform(), 1e13)), pa.int64()).cast(pa.string()),
            width=13,
            padding="0",
        )
        for _ in range(3)
    ]
    person_id = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*digits, ""), 0, 38)

    recency = pc.round(pc.min_element_wise(exponential(14.0), 365.0), 2)
    frequency = pc.cast(pc.floor(exponential(3.0)), pa.int32())
    u1, u2 = uniform(), uniform()
    # Box-Muller: a standard normal from two uniforms, for a log-normal spend.
    normal = pc.multiply(
        pc.sqrt(pc.multiply(pc.ln(pc.subtract(1.0, u1)), -2.0)),
        pc.cos(pc.multiply(u2, 6.283185307179586)),
    )
    monetary = pc.round(pc.exp(pc.add(pc.multiply(normal, 0.9), 4.0)), 2)
    logit = pc.add(pc.subtract(pc.multiply(frequency, 0.35), pc.multiply(recency, 0.04)), -1.8)
    probability = pc.divide(1.0, pc.add(1.0, pc.exp(pc.negate(logit))))
    last_event_ms = pc.subtract(
        now_ms, pc.cast(pc.multiply(recency, _DAY_MS), pa.int64(), safe=False)
    )
    columns = [
        person_id,
        pa.repeat(pa.scalar(now_ms // _DAY_MS, pa.date32()), rows),
        last_event_ms.cast(pa.timestamp("ms", tz="UTC")),
        recency,
        frequency,
        monetary,
        with_nulls(pc.round(pc.add(exponential(6.0), 0.5), 2), 0.04),
        with_nulls(pc.round(uniform(), 4), 0.1),
        _choice(uniform(), _COUNTRIES, _COUNTRY_WEIGHTS),
        _choice(uniform(), _DEVICES, _DEVICE_WEIGHTS),
        pc.less(uniform(), probability),
    ]
    return pa.Table.from_arrays(columns, schema=_SCHEMA)


def _choice(u: Any, values: tuple[str, ...], weights: tuple[float, ...]) -> Any:
    index = pa.repeat(pa.scalar(0, pa.int8()), len(u))
    cumulative = 0.0
    for w in weights[:-1]:
        cumulative += w
        index = pc.add(index, pc.cast(pc.greater_equal(u, cumulative), pa.int8()))
    return pc.take(pa.array(values), index)


def _object_id(rng: random.Random, now_ms: int) -> str:
    return f"{now_ms // 1000 & 0xFFFFFFFF:08x}{rng.getrandbits(64):016x}"


def _ulid(rng: random.Random, now_ms: int) -> str:
    value = (now_ms & (2**48 - 1)) << 80 | rng.getrandbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def table_name(name: str) -> str:
    """The Query Service table name of a dataset (Catalog tag `adobe/pqs/table`)."""
    return _table_name(name)


def _table_name(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "dataset"
