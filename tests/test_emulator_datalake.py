"""The emulator's data lake and what its runs write: real Parquet/JSON files in tmp_path."""

from __future__ import annotations

import gzip
import json
import random
import re
import threading
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aep_emulator.datalake import Batch, DataLake, Dataset
from aep_emulator.exporting import (
    ExportResult,
    export_batches,
    render_folder,
    validate_template,
)
from aep_emulator.facts import Compression, FileType
from exporter.aep.facts import ALLOWED_FORMATS

NOW_MS = 1_750_000_000_000  # 2025-06-15T15:06:40Z
DATASET_ID_RE = re.compile(r"^[0-9a-f]{24}$")
BATCH_ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
PART_RE = r"^part-(\d{5})-tid-(\d{19})-([0-9a-f-]{36})-(\d{4,6})-1-c000\.%s$"
ALL_FORMATS = [
    (FileType.PARQUET, Compression.NONE, "parquet"),
    (FileType.PARQUET, Compression.GZIP, "gz.parquet"),
    (FileType.JSON, Compression.GZIP, "json.gz"),
    (FileType.JSON, Compression.NONE, "json"),
]


@pytest.fixture
def lake(tmp_path: Path) -> DataLake:
    return DataLake(tmp_path / "lake")


def make(lake: DataLake, rows: int, seed: int = 1, name: str = "propensity_features") -> Dataset:
    return lake.create_dataset("prod", name, rows, rng=random.Random(seed), now_ms=NOW_MS)


def export(
    batches: Sequence[Batch],
    dest: Path,
    file_type: FileType = FileType.PARQUET,
    compression: Compression = Compression.NONE,
    max_rows: int = 1_000_000,
) -> ExportResult:
    return export_batches(
        batches,
        dest,
        file_type=file_type,
        compression=compression,
        rng=random.Random(7),
        max_rows_per_file=max_rows,
    )


def source_rows(batches: Sequence[Batch]) -> list[dict[str, Any]]:
    return [row for b in batches for row in pq.read_table(b.path).to_pylist()]


def read_back(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Rows of exported files, in file order, as a reader of the destination would see them."""
    rows: list[dict[str, Any]] = []
    for path in files:
        if path.name.endswith("parquet"):
            rows.extend(pq.read_table(path).to_pylist())
            continue
        raw = path.read_bytes()
        text = gzip.decompress(raw) if path.name.endswith(".gz") else raw
        rows.extend(json.loads(line) for line in text.decode("utf-8").splitlines())
    return rows


def as_json(row: dict[str, Any]) -> dict[str, Any]:
    """What the JSON export should hold for a row read from Parquet."""

    def value(v: Any) -> Any:
        if isinstance(v, datetime):
            return (
                v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
            )
        if isinstance(v, date):
            return v.isoformat()
        return v

    return {k: value(v) for k, v in row.items()}


def test_create_dataset_writes_one_feature_batch(lake: DataLake) -> None:
    ds = make(lake, 500)

    assert DATASET_ID_RE.match(ds.id)
    assert ds.id.startswith(f"{NOW_MS // 1000:08x}")
    assert (ds.sandbox, ds.name, ds.created_ms, ds.rows) == (
        "prod",
        "propensity_features",
        NOW_MS,
        500,
    )
    [batch] = ds.batches
    assert BATCH_ID_RE.match(batch.id)
    assert (batch.rows, batch.created_ms) == (500, NOW_MS)
    assert batch.path == lake.root / "prod" / ds.id / "batches" / f"{batch.id}.parquet"
    table = pq.read_table(batch.path)
    assert table.num_rows == 500
    assert tuple(table.column_names) == ds.columns
    for column in ("person_id", "snapshot_date", "recency_days", "country", "purchased_next_30d"):
        assert column in ds.columns
    row = table.slice(0, 1).to_pylist()[0]
    assert re.fullmatch(r"\d{38}", row["person_id"])
    assert row["snapshot_date"] == date(2025, 6, 15)
    assert isinstance(row["purchased_next_30d"], bool)
    assert table.column("purchased_next_30d").to_pylist().count(True) not in (0, 500)
    meta = json.loads((lake.root / "prod" / ds.id / "dataset.json").read_text())
    assert meta["batches"] == [{"id": batch.id, "created": NOW_MS, "rows": 500}]
    assert lake.get("prod", ds.id) == ds
    assert lake.get("dev", ds.id) is None
    assert not list((lake.root / "prod" / ds.id).rglob(".*"))


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make(DataLake(tmp_path / "a"), 300, seed=42)
    b = make(DataLake(tmp_path / "b"), 300, seed=42)
    c = make(DataLake(tmp_path / "c"), 300, seed=43)

    assert (a.id, a.batches[0].id) == (b.id, b.batches[0].id)
    assert pq.read_table(a.batches[0].path).equals(pq.read_table(b.batches[0].path))
    assert a.id != c.id
    assert not pq.read_table(a.batches[0].path).equals(pq.read_table(c.batches[0].path))


@pytest.mark.parametrize(("file_type", "compression", "ext"), ALL_FORMATS)
def test_export_round_trip(
    lake: DataLake, tmp_path: Path, file_type: FileType, compression: Compression, ext: str
) -> None:
    ds = make(lake, 1_234)
    dest = tmp_path / "dest" / ds.id / "exportTime=202506151506"

    result = export(ds.batches, dest, file_type, compression)

    [path] = result.files
    assert re.match(PART_RE % re.escape(ext), path.name), path.name
    assert sorted(dest.iterdir()) == [path]
    assert result.records == 1_234
    assert result.bytes == path.stat().st_size > 0
    expected = source_rows(ds.batches)
    if file_type == FileType.JSON:
        expected = [as_json(r) for r in expected]
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == (compression == Compression.GZIP)
    else:
        codec = pq.ParquetFile(path).metadata.row_group(0).column(0).compression
        assert codec == ("GZIP" if compression == Compression.GZIP else "UNCOMPRESSED")
    assert read_back(result.files) == expected


def test_every_allowed_format_has_a_file_name() -> None:
    assert {(f, c) for f, c, _ in ALL_FORMATS} >= ALLOWED_FORMATS


def test_json_lines_escape_awkward_values(tmp_path: Path) -> None:
    naive = datetime(2024, 2, 29, 23, 59, 58, 123_000)
    # Parquet has no second unit: the `s` column comes back in ms, hence `.000Z`.
    paris = timezone(timedelta(hours=2))
    table = pa.table(
        {
            "text": ['a "quoted", comma', "nul\x00inside", "ünïcode ✓", None],
            "at": pa.array([naive, None, naive, naive], pa.timestamp("ms")),
            "at_tz": pa.array(
                [datetime(2024, 1, 1, 2, tzinfo=paris)] * 4, pa.timestamp("s", "UTC")
            ),
            "day": pa.array([date(1999, 12, 31), None, None, None], pa.date32()),
            "tags": [["x", "y"], [], None, ["z\x00"]],
            "score": [1.5, None, -0.0, 1e-9],
        }
    )
    source = tmp_path / "custom.parquet"
    pq.write_table(table, source)

    result = export([Batch("B1", 0, source, 4)], tmp_path / "out", FileType.JSON)

    assert read_back(result.files) == [
        {
            "text": 'a "quoted", comma',
            "at": "2024-02-29T23:59:58.123Z",
            "at_tz": "2024-01-01T00:00:00.000Z",
            "day": "1999-12-31",
            "tags": ["x", "y"],
            "score": 1.5,
        },
        {"text": "nul\x00inside", "at": None, "at_tz": "2024-01-01T00:00:00.000Z", "day": None}
        | {"tags": [], "score": None},
        {"text": "ünïcode ✓", "at": "2024-02-29T23:59:58.123Z", "at_tz": "2024-01-01T00:00:00.000Z"}
        | {"day": None, "tags": None, "score": -0.0},
        {"text": None, "at": "2024-02-29T23:59:58.123Z", "at_tz": "2024-01-01T00:00:00.000Z"}
        | {"day": None, "tags": ["z\x00"], "score": 1e-9},
    ]


@pytest.mark.parametrize(("file_type", "compression", "ext"), ALL_FORMATS)
def test_export_splits_into_part_files(
    lake: DataLake, tmp_path: Path, file_type: FileType, compression: Compression, ext: str
) -> None:
    ds = make(lake, 2_500)

    result = export(ds.batches, tmp_path / "out", file_type, compression, max_rows=1_000)

    names = [re.match(PART_RE % re.escape(ext), p.name) for p in result.files]
    assert all(names)
    assert [m.group(1) for m in names if m] == ["00000", "00001", "00002"]
    assert len({(m.group(2), m.group(3)) for m in names if m}) == 1  # one Spark job
    assert [len(read_back([p])) for p in result.files] == [1_000, 1_000, 500]
    assert result.records == 2_500
    assert result.bytes == sum(p.stat().st_size for p in result.files)
    expected = source_rows(ds.batches)
    if file_type == FileType.JSON:
        expected = [as_json(r) for r in expected]
    assert read_back(result.files) == expected


def test_incremental_export_takes_only_the_given_batches(lake: DataLake, tmp_path: Path) -> None:
    ds = make(lake, 100)
    batch = lake.append_rows("prod", ds.id, 40, rng=random.Random(9), now_ms=NOW_MS + 3_600_000)
    grown = lake.get("prod", ds.id)
    assert grown is not None
    assert grown.batches == (*ds.batches, batch)
    assert (grown.rows, grown.updated_ms) == (140, NOW_MS + 3_600_000)

    only_new = export([batch], tmp_path / "incremental")
    everything = export(grown.batches, tmp_path / "full", max_rows=70)

    assert only_new.records == 40
    assert read_back(only_new.files) == source_rows([batch])
    assert [len(read_back([p])) for p in everything.files] == [70, 70]
    assert read_back(everything.files) == source_rows(grown.batches)


def test_empty_exports_and_empty_datasets(lake: DataLake, tmp_path: Path) -> None:
    ds = make(lake, 0)
    empty = lake.append_rows("prod", ds.id, 0, rng=random.Random(2), now_ms=NOW_MS)

    result = export(ds.batches, tmp_path / "none")
    also = export([empty], tmp_path / "empty-batch", FileType.JSON, Compression.GZIP)

    assert ds.batches == ()
    assert empty.rows == 0
    assert pq.read_table(empty.path).num_rows == 0
    assert result == ExportResult((), 0, 0)
    assert also == ExportResult((), 0, 0)
    assert not (tmp_path / "none").exists()


def test_failed_export_leaves_nothing_behind(lake: DataLake, tmp_path: Path) -> None:
    first = make(lake, 120)
    second = lake.append_rows("prod", first.id, 10, rng=random.Random(3), now_ms=NOW_MS)
    second.path.unlink()
    out = tmp_path / "out"

    with pytest.raises(OSError, match=re.escape(second.id)):
        export([*first.batches, second], out, max_rows=50)

    assert list(out.iterdir()) == []


def test_a_new_lake_loads_what_is_on_disk(lake: DataLake, tmp_path: Path) -> None:
    older = make(lake, 10, seed=1, name="older")
    newer = lake.create_dataset(
        "prod", "newer", 5, rng=random.Random(2), now_ms=NOW_MS + 1, description="second"
    )
    lake.append_rows("prod", older.id, 3, rng=random.Random(4), now_ms=NOW_MS + 2)
    other = lake.create_dataset("dev-1", "elsewhere", 1, rng=random.Random(5), now_ms=NOW_MS)
    (lake.root / "prod" / "half-written").mkdir()
    (lake.root / "prod" / "odd" / "dataset.json").mkdir(parents=True)

    reloaded = DataLake(lake.root)

    assert reloaded.list("prod") == lake.list("prod")
    assert [d.name for d in reloaded.list("prod")] == ["newer", "older"]
    assert reloaded.get("prod", newer.id) == newer
    assert reloaded.get("dev-1", other.id) == other
    loaded_older = reloaded.get("prod", older.id)
    assert loaded_older is not None
    assert loaded_older.rows == 13
    assert reloaded.list("nowhere") == []


def test_same_seed_twice_in_one_lake_gives_distinct_ids(lake: DataLake) -> None:
    first = make(lake, 1, seed=5)
    second = make(lake, 1, seed=5)

    assert first.id != second.id
    assert len(lake.list("prod")) == 2


def test_failed_creation_leaves_no_dataset(lake: DataLake, tmp_path: Path) -> None:
    doomed = make(DataLake(tmp_path / "probe"), 3, seed=6)  # the same seed gives the same id
    folder = lake.root / "prod" / doomed.id
    (folder / "dataset.json").mkdir(parents=True)  # metadata cannot be written over a folder

    with pytest.raises(OSError, match=re.escape("dataset.json")):
        make(lake, 3, seed=6)

    assert not folder.exists()
    assert lake.list("prod") == []
    assert make(lake, 3, seed=6).id == doomed.id


def test_bad_requests(lake: DataLake) -> None:
    with pytest.raises(ValueError, match="rows"):
        make(lake, -1)
    with pytest.raises(ValueError, match="rows"):
        lake.append_rows("prod", make(lake, 1).id, -1, rng=random.Random(1), now_ms=NOW_MS)
    with pytest.raises(ValueError, match="sandbox"):
        lake.create_dataset("../up", "x", 1, rng=random.Random(1), now_ms=NOW_MS)
    with pytest.raises(KeyError):
        lake.append_rows("prod", "0" * 24, 1, rng=random.Random(1), now_ms=NOW_MS)
    with pytest.raises(ValueError, match="max_rows_per_file"):
        export([], lake.root / "out", max_rows=0)


def test_concurrent_creation_from_threads(lake: DataLake) -> None:
    made: list[Dataset] = []

    def create(seed: int) -> None:
        made.append(make(lake, 50, seed=seed, name=f"ds{seed}"))

    threads = [threading.Thread(target=create, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(d.id for d in lake.list("prod")) == sorted(d.id for d in made)
    assert len({d.id for d in made}) == 8


def test_clear_forgets_and_deletes(lake: DataLake) -> None:
    ds = make(lake, 5)

    lake.clear()

    assert lake.list("prod") == []
    assert not (lake.root / "prod" / ds.id).exists()
    assert DataLake(lake.root).list("prod") == []


def test_catalog_item_matches_the_listing_shape(lake: DataLake) -> None:
    ds = make(lake, 5)
    empty = lake.create_dataset("prod", "Empty One", 0, rng=random.Random(8), now_ms=NOW_MS)

    item = ds.to_catalog("ORG@AdobeOrg")

    assert item["id"] == ds.id
    assert item["name"] == "propensity_features"
    assert item["imsOrg"] == "ORG@AdobeOrg"
    assert item["fileDescription"] == {
        "persisted": True,
        "containerFormat": "parquet",
        "format": "parquet",
    }
    assert item["schemaRef"]["contentType"] == "application/vnd.adobe.xed-full+json;version=1"
    assert (item["created"], item["updated"]) == (NOW_MS, NOW_MS)
    assert item["lastBatchId"] == item["lastSuccessfulBatch"] == ds.batches[0].id
    assert item["lastBatchStatus"] == "success"
    assert DATASET_ID_RE.match(item["viewId"])
    assert re.fullmatch(r"[0-9a-f-]{36}", item["sandboxId"])
    assert json.loads(json.dumps(item)) == item
    assert "lastBatchId" not in empty.to_catalog("ORG@AdobeOrg")
    assert empty.to_catalog("o")["tags"]["adobe/pqs/table"] == ["empty_one"]


FOLDER_ARGS: dict[str, Any] = {
    "dataset_id": "5c8c3c555033b814b69f947f",
    "dataset_name": "propensity_features",
    "export_time": datetime(2025, 6, 5, 7, 8, 9, tzinfo=UTC),
    "destination_name": "Amazon S3",
    "destination_instance_id": "flow-1",
    "destination_instance_name": "nightly export",
    "sandbox_name": "prod",
    "organization_name": "ACME@AdobeOrg",
}


@pytest.mark.parametrize(
    ("template", "folder"),
    [
        (None, "5c8c3c555033b814b69f947f/exportTime=202506050708"),
        ("%DATASET_ID%/%EXPORT_TIME%", "5c8c3c555033b814b69f947f/exportTime=202506050708"),
        ("%DESTINATION%", "Amazon S3"),
        ("%DESTINATION_NAME%", "Amazon S3"),
        ("%DATASET_NAME%", "propensity_features"),
        ("%DESTINATION_INSTANCE_ID%", "flow-1"),
        ("%DESTINATION_INSTANCE_NAME%", "nightly export"),
        ("%SANDBOX_NAME%", "prod"),
        ("%ORGANIZATION_NAME%", "ACME@AdobeOrg"),
        ("%DATETIME(YYYYMMdd_HHmmss)%", "20250605_070809"),
        ("%DATETIME(yyyy-MM-dd)%/%DATETIME(HH.mm.ss.SSS)%", "2025-06-05/07.08.09.000"),
        ("%DATETIME(yyMd)%", "2565"),
        (
            "exports/%DESTINATION%_%DATASET_ID%_%DATETIME(YYYYMMdd_HHmmss)%",
            "exports/Amazon S3_5c8c3c555033b814b69f947f_20250605_070809",
        ),
        ("ml/features", "ml/features"),
    ],
)
def test_render_folder(template: str | None, folder: str) -> None:
    assert render_folder(template, **FOLDER_ARGS) == folder
    validate_template(template)


def test_render_folder_uses_utc() -> None:
    local = datetime(2025, 6, 5, 1, 30, tzinfo=timezone(timedelta(hours=-5)))
    naive = datetime(2025, 6, 5, 1, 30)

    assert render_folder("%EXPORT_TIME%", **{**FOLDER_ARGS, "export_time": local}) == (
        "exportTime=202506050630"
    )
    assert render_folder("%EXPORT_TIME%", **{**FOLDER_ARGS, "export_time": naive}) == (
        "exportTime=202506050130"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("%DATASET_ID%/%SEGMENT_ID%", "SEGMENT_ID"),
        ("%dataset_id%", "dataset_id"),
        ("%DATASET_ID()%", "DATASET_ID"),
        ("%DATETIME%", "pattern"),
        ("%DATETIME(YYYYMMDD)%", "'D'"),
        ("../%DATASET_ID%", r"'\.\.'"),
        ("/abs/%DATASET_ID%", "relative"),
        ("a//b", "segment"),
        ("", "segment"),
        ("a/./b", "segment"),
        ("a\\..\\b", "unsafe character"),
    ],
)
def test_bad_templates_are_rejected(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_template(template)
    with pytest.raises(ValueError, match=message):
        render_folder(template, **FOLDER_ARGS)


@pytest.mark.parametrize("name", ["..", "a/../../etc", "nul\x00byte"])
def test_macro_values_cannot_escape_the_folder(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        render_folder("%DATASET_NAME%", **{**FOLDER_ARGS, "dataset_name": name})
