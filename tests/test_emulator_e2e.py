"""The seed workflow end to end over real HTTP: what lands at every destination reads back equal
to the dataset, for every format and compression, with metrics true to the files on disk."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aep_emulator.settings import Knobs
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    DATALAKE_SOURCE_SPEC_ID,
    FLOW_SERVICE_PATH,
    NOT_READY_PHRASE,
    STORAGE_SPECS,
    StorageType,
)
from tests.conftest import Answer, Emulator, default_knobs

RUN_SECONDS = 5  # default_knobs: every run takes 5 emulated seconds
WINDOW_SECONDS = 60  # default_knobs: the not-ready window
FIRST_ROWS, APPENDED_ROWS = 40, 23

EXTENSIONS = {
    ("PARQUET", "NONE"): "parquet",
    ("PARQUET", "GZIP"): "gz.parquet",
    ("JSON", "GZIP"): "json.gz",
    ("JSON", "NONE"): "json",
}
ALLOWED = [("PARQUET", "NONE"), ("PARQUET", "GZIP"), ("JSON", "GZIP")]
PART_RE = r"part-(\d{5})-tid-\d+-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-\d+-1-c000\.%s"


@dataclass(frozen=True)
class Destination:
    """One way to reach a storage: base-connection auth, target location, and the local folder
    (under `<data_dir>/destinations/<storage>/`) the emulator stands it in with."""

    storage: StorageType
    auth: dict[str, Any] | None
    location: dict[str, str]
    local_root: tuple[str, ...]


def _auth(spec_name: str, **params: str) -> dict[str, Any]:
    return {"specName": spec_name, "params": params}


DESTINATIONS = {
    "dlz": Destination(StorageType.DLZ, None, {"path": "ml/egress"}, ("prod", "dlz-destination")),
    "s3": Destination(
        StorageType.S3,
        _auth(
            "Access Key",
            s3AccessKey="AKIAIOSFODNN7EXAMPLE",
            s3SecretKey="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        {"bucketName": "acme-exports", "path": "aep/features"},
        ("acme-exports",),
    ),
    "s3-assumed-role": Destination(
        StorageType.S3,
        _auth("Assumed Role", s3Role="arn:aws:iam::123456789012:role/aep-export"),
        {"bucketName": "acme.role-bucket", "path": "role"},
        ("acme.role-bucket",),
    ),
    "sftp": Destination(
        StorageType.SFTP,
        _auth("SFTP with Password", domain="sftp.example.com", username="aep", password="pw"),
        {"remotePath": "/upload/aep"},
        ("sftp.example.com",),
    ),
    "sftp-ssh-key": Destination(
        StorageType.SFTP,
        _auth("SFTP with SSH Key", domain="10.1.2.3", username="aep", sshKey="c3NoLWtleQ=="),
        {"remotePath": "keyed"},
        ("10.1.2.3",),
    ),
    "azure-blob": Destination(
        StorageType.AZURE_BLOB,
        _auth(
            "ConnectionString",
            connectionString="DefaultEndpointsProtocol=https;AccountName=acmeblob;"
            "AccountKey=a2V5;EndpointSuffix=core.windows.net",
        ),
        {"container": "exports", "path": "aep"},
        ("acmeblob", "exports"),
    ),
    "adls-gen2": Destination(
        StorageType.ADLS_GEN2,
        _auth(
            "Azure Service Principal Auth",
            url="https://acmelake.dfs.core.windows.net/",
            servicePrincipalId="00000000-0000-0000-0000-000000000001",
            servicePrincipalKey="sp-secret",
            tenant="acme.onmicrosoft.com",
        ),
        {"path": "lake/aep"},
        ("acmelake",),
    ),
    "gcs": Destination(
        StorageType.GCS,
        _auth(
            "Google Cloud Storage authentication credentials",
            accessKeyId="GOOG1E",
            secretAccessKey="GCSsecret+EXAMPLE/0123456789abcdefghijkl",
        ),
        {"bucketName": "acme-gcs", "path": "exports"},
        ("acme-gcs",),
    ),
}
PRIMARY = ["dlz", "s3", "sftp", "azure-blob", "adls-gen2", "gcs"]


@dataclass
class Workflow:
    """The entities of one export, as created over HTTP, and the dataset they export."""

    dest: Destination
    dataset_id: str
    dataset_name: str
    flow_id: str
    base_id: str
    flow_created_ms: int
    params: dict[str, Any] = field(default_factory=dict)

    def local_root(self, emulator: Emulator) -> Path:
        """Where the emulator keeps this destination's folder, derived from the connection."""
        folder = self.params.get("path", self.params.get("remotePath", ""))
        root = emulator.data_dir / "destinations" / self.dest.storage.value
        return root.joinpath(*self.dest.local_root, *folder.strip("/").split("/"))


async def created(emulator: Emulator, what: str, body: dict[str, Any]) -> str:
    answer = await emulator.fs("POST", f"/{what}", json_body=body)
    assert answer.status == 201, answer.body
    assert isinstance(answer.body["id"], str)
    return answer.body["id"]


async def build(
    emulator: Emulator,
    dest: Destination,
    *,
    file_type: str = "PARQUET",
    compression: str = "GZIP",
    schedule: dict[str, Any] | None = None,
    rows: int = FIRST_ROWS,
    appended: int = APPENDED_ROWS,
) -> Workflow:
    """Seed a dataset (two batches) and create base, source and target connections and a flow."""
    (dataset_id,) = await emulator.seed(rows=rows)
    if appended:
        await emulator.control("POST", f"/datasets/{dataset_id}/batches", {"rows": appended})
    dataset = emulator.state.lake.get("prod", dataset_id)
    assert dataset is not None
    spec = STORAGE_SPECS[dest.storage]
    ref = {"id": spec.connection_spec_id, "version": "1.0"}
    base_body: dict[str, Any] = {"name": f"{dest.storage} base", "connectionSpec": ref}
    if dest.auth is not None:
        base_body["auth"] = dest.auth
    base_id = await created(emulator, "connections", base_body)
    source_id = await created(
        emulator,
        "sourceConnections",
        {
            "name": "datalake source",
            "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
            "params": {"datasets": [{"dataSetId": dataset_id, "name": dataset.name}]},
        },
    )
    params = {
        "mode": "Server-to-server",
        **dest.location,
        "datasetFileType": file_type,
        "compression": compression,
    }
    target_id = await created(
        emulator,
        "targetConnections",
        {
            "name": "target",
            "baseConnectionId": base_id,
            "connectionSpec": ref,
            "params": params,
        },
    )
    flow_id = await created(
        emulator,
        "flows",
        {
            "name": "export flow",
            "flowSpec": {"id": spec.dataset_flow_spec_id, "version": "1.0"},
            "sourceConnectionIds": [source_id],
            "targetConnectionIds": [target_id],
            "transformations": [],
            "scheduleParams": schedule
            or {
                "exportMode": "DAILY_FULL_EXPORT",
                "timeUnit": "day",
                "interval": 0,
                "startTime": int(emulator.clock.time()),
            },
        },
    )
    flow = await emulator.fs("GET", f"/flows/{flow_id}")
    assert flow.status == 200, flow.body
    return Workflow(
        dest,
        dataset_id,
        dataset.name,
        flow_id,
        base_id,
        flow.body["items"][0]["createdAt"],
        params,
    )


async def trigger(emulator: Emulator, flow_id: str, dataset_id: str) -> Answer:
    return await emulator.request(
        "POST",
        ADHOC_PATH,
        json_body={
            "activationInfo": {
                "destinations": [{"flowId": flow_id, "datasets": [{"id": dataset_id}]}]
            }
        },
        headers={"Accept": ADHOC_DATASET_ACCEPT},
    )


async def export_once(emulator: Emulator, flow: Workflow) -> tuple[dict[str, Any], int]:
    """The notebook's loop: trigger ("not ready" first), wait, trigger, poll to the end.
    Returns the finished run and the emulated time (ms) at which it was triggered."""
    wait = flow.flow_created_ms / 1000 + WINDOW_SECONDS - emulator.clock.time()
    if wait > 0:
        first = await trigger(emulator, flow.flow_id, flow.dataset_id)
        assert first.status == 400
        assert NOT_READY_PHRASE in first.body["message"]
        await emulator.clock.advance(wait)
    triggered_ms = round(emulator.clock.time() * 1000)
    answer = await trigger(emulator, flow.flow_id, flow.dataset_id)
    assert answer.status == 200, answer.body
    (started,) = answer.body["destinations"][0]["datasets"]
    assert started["id"] == flow.dataset_id
    assert started["flowId"] == flow.flow_id
    status_url: str = started["statusURL"]
    assert status_url.startswith(f"{emulator.url}{FLOW_SERVICE_PATH}/runs/")
    run_path = status_url.removeprefix(emulator.url + FLOW_SERVICE_PATH)
    for _ in range(RUN_SECONDS * 4 + 1):
        got = await emulator.fs("GET", run_path)
        assert got.status == 200, got.body
        (run,) = got.body["items"]
        if run["metrics"]["statusSummary"]["status"] != "processing":
            return run, triggered_ms
        await emulator.clock.advance(0.5)
    raise AssertionError(f"run {run_path} still processing")


def normalise(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    """Rows as comparable values: temporals (datetime/date or their ISO text in JSON) as epoch
    milliseconds and ISO dates; sorted, since a reader must not rely on the row order."""
    out = []
    for row in rows:
        assert set(row) == set(schema.names), row
        value: dict[str, Any] = {}
        for column in schema:
            item = row[column.name]
            if item is not None and pa.types.is_timestamp(column.type):
                if isinstance(item, str):
                    item = datetime.fromisoformat(item)
                assert isinstance(item, datetime)
                offset = item.utcoffset()
                assert offset is not None
                assert not offset, item
                item = round(item.timestamp() * 1000)
            elif item is not None and pa.types.is_date(column.type):
                item = date.fromisoformat(item) if isinstance(item, str) else item
                assert type(item) is date
            value[column.name] = item
        out.append(value)
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def dataset_rows(emulator: Emulator, dataset_id: str) -> tuple[list[dict[str, Any]], pa.Schema]:
    """The dataset's own rows, read from its Parquet batches in the data lake."""
    dataset = emulator.state.lake.get("prod", dataset_id)
    assert dataset is not None
    assert dataset.batches
    tables = [pq.read_table(b.path) for b in dataset.batches]
    schema = tables[0].schema
    assert all(t.schema.equals(schema) for t in tables)
    return [r for t in tables for r in t.to_pylist()], schema


def read_exported(files: Sequence[Path], file_type: str, compression: str) -> list[dict[str, Any]]:
    """Exported files as a consumer reads them, checking each is in the promised encoding."""
    rows: list[dict[str, Any]] = []
    for path in files:
        raw = path.read_bytes()
        if file_type == "PARQUET":
            assert raw[:4] == b"PAR1"
            meta = pq.ParquetFile(path).metadata
            codecs = {
                meta.row_group(g).column(c).compression
                for g in range(meta.num_row_groups)
                for c in range(meta.num_columns)
            }
            assert codecs == {"GZIP" if compression == "GZIP" else "UNCOMPRESSED"}
            rows.extend(pq.read_table(path).to_pylist())
            continue
        gzipped = raw[:2] == b"\x1f\x8b"
        assert gzipped == (compression == "GZIP")
        text = (gzip.decompress(raw) if gzipped else raw).decode("utf-8")
        assert text.endswith("\n")
        rows.extend(json.loads(line) for line in text.splitlines())
    return rows


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def check_export(
    emulator: Emulator,
    flow: Workflow,
    run: dict[str, Any],
    triggered_ms: int,
    *,
    file_type: str,
    compression: str,
    folder: str | None = None,
) -> list[Path]:
    """Everything a consumer can check after a successful run; returns the exported files."""
    metrics = run["metrics"]
    assert metrics["statusSummary"]["status"] == "success", metrics
    assert metrics["statusSummary"]["errors"] == []
    assert run["flowId"] == flow.flow_id
    assert metrics["durationSummary"]["startedAtUTC"] == triggered_ms
    assert metrics["durationSummary"]["completedAtUTC"] == triggered_ms + RUN_SECONDS * 1000

    export_time = datetime.fromtimestamp(triggered_ms / 1000, UTC)
    if folder is None:
        folder = f"{flow.dataset_id}/exportTime={export_time:%Y%m%d%H%M}"
    expected_dir = flow.local_root(emulator) / folder
    on_disk = files_under(emulator.data_dir / "destinations")
    assert on_disk, "the run wrote nothing"
    assert {p.parent for p in on_disk} == {expected_dir}
    ext = re.escape(EXTENSIONS[(file_type.upper(), compression.upper())])
    names = sorted(p.name for p in on_disk)
    indexes = []
    for name in names:
        match = re.fullmatch(PART_RE % ext, name)
        assert match, name
        indexes.append(int(match.group(1)))
    assert indexes == list(range(len(names)))

    where = await emulator.control("GET", f"/runs/{run['id']}")
    assert {Path(f) for f in where["files"]} == on_disk
    files = sorted(on_disk)

    source, schema = dataset_rows(emulator, flow.dataset_id)
    exported = read_exported(files, file_type.upper(), compression.upper())
    if file_type.upper() == "PARQUET":
        assert all(pq.read_schema(f).equals(schema) for f in files)
    assert normalise(exported, schema) == normalise(source, schema)

    assert metrics["recordSummary"]["outputRecordCount"] == len(exported) == len(source)
    assert metrics["recordSummary"]["inputRecordCount"] == len(source)
    assert metrics["fileSummary"]["outputFileCount"] == len(files)
    assert metrics["sizeSummary"]["outputBytes"] == sum(f.stat().st_size for f in files)
    return files


@pytest.mark.parametrize(("file_type", "compression"), ALLOWED)
@pytest.mark.parametrize("destination", PRIMARY)
async def test_export_reads_back_equal(
    emulator: Emulator, destination: str, file_type: str, compression: str
) -> None:
    flow = await build(
        emulator, DESTINATIONS[destination], file_type=file_type, compression=compression
    )
    run, triggered_ms = await export_once(emulator, flow)
    await check_export(
        emulator, flow, run, triggered_ms, file_type=file_type, compression=compression
    )


@pytest.mark.parametrize("destination", ["s3-assumed-role", "sftp-ssh-key"])
async def test_export_with_the_other_auth_specs(emulator: Emulator, destination: str) -> None:
    flow = await build(emulator, DESTINATIONS[destination], file_type="JSON", compression="GZIP")
    run, triggered_ms = await export_once(emulator, flow)
    await check_export(emulator, flow, run, triggered_ms, file_type="JSON", compression="GZIP")


async def test_base_connection_never_echoes_secrets(emulator: Emulator) -> None:
    flow = await build(emulator, DESTINATIONS["s3"])
    got = await emulator.fs("GET", f"/connections/{flow.base_id}")
    params = got.body["items"][0]["auth"]["params"]
    assert params["s3AccessKey"] == "AKIAIOSFODNN7EXAMPLE"
    assert "wJalrXUtnFEMI" not in json.dumps(got.body)


class TestUncompressedJson:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(allow_json_uncompressed=True)

    @pytest.mark.parametrize("destination", PRIMARY)
    async def test_allowed_by_the_knob(self, emulator: Emulator, destination: str) -> None:
        flow = await build(
            emulator, DESTINATIONS[destination], file_type="JSON", compression="NONE"
        )
        run, triggered_ms = await export_once(emulator, flow)
        await check_export(emulator, flow, run, triggered_ms, file_type="JSON", compression="NONE")


@pytest.mark.parametrize(("file_type", "compression"), [("JSON", "NONE"), ("json", "none")])
async def test_uncompressed_json_rejected_by_default(
    emulator: Emulator, file_type: str, compression: str
) -> None:
    assert emulator.knobs.allow_json_uncompressed is False
    spec = STORAGE_SPECS[StorageType.DLZ]
    ref = {"id": spec.connection_spec_id, "version": "1.0"}
    base_id = await created(emulator, "connections", {"name": "dlz", "connectionSpec": ref})
    body: dict[str, Any] = {
        "name": "target",
        "baseConnectionId": base_id,
        "connectionSpec": ref,
        "params": {"path": "x", "datasetFileType": file_type, "compression": compression},
    }
    answer = await emulator.fs("POST", "/targetConnections", json_body=body)
    assert answer.status == 400, answer.body
    assert answer.body["type"].endswith("-400")
    assert "GZIP" in answer.body["errorMessage"]
    listed = await emulator.fs("GET", "/targetConnections")
    assert listed.body["items"] == []
    # The same body with GZIP is fine: only the combination is refused.
    body["params"] = {**body["params"], "compression": "GZIP"}
    assert (await emulator.fs("POST", "/targetConnections", json_body=body)).status == 201


class TestManyFiles:
    @pytest.fixture
    def knobs(self) -> Knobs:
        return default_knobs(max_rows_per_file=7)

    @pytest.mark.parametrize(("file_type", "compression"), ALLOWED)
    async def test_rows_split_over_part_files(
        self, emulator: Emulator, file_type: str, compression: str
    ) -> None:
        flow = await build(
            emulator, DESTINATIONS["s3"], file_type=file_type, compression=compression
        )
        run, triggered_ms = await export_once(emulator, flow)
        files = await check_export(
            emulator, flow, run, triggered_ms, file_type=file_type, compression=compression
        )
        total = FIRST_ROWS + APPENDED_ROWS
        assert len(files) == -(-total // 7)
        per_file = [len(read_exported([f], file_type, compression)) for f in files]
        assert per_file == [7] * (total // 7) + ([total % 7] if total % 7 else [])


@pytest.mark.parametrize("key", ["foldernameTemplate", "folderNameTemplate"])
@pytest.mark.parametrize("destination", ["dlz", "sftp"])
async def test_folder_template_under_both_spellings(
    emulator: Emulator, key: str, destination: str
) -> None:
    template = "%SANDBOX_NAME%/%DATASET_NAME%/%DATETIME(yyyy-MM-dd_HHmm)%/%DESTINATION_INSTANCE_ID%"
    schedule = {
        "exportMode": "DAILY_FULL_EXPORT",
        "timeUnit": "day",
        "interval": 0,
        "startTime": int(emulator.clock.time()),
        key: template,
    }
    flow = await build(emulator, DESTINATIONS[destination], schedule=schedule)
    got = await emulator.fs("GET", f"/flows/{flow.flow_id}")
    assert got.body["items"][0]["scheduleParams"][key] == template
    run, triggered_ms = await export_once(emulator, flow)
    when = datetime.fromtimestamp(triggered_ms / 1000, UTC)
    folder = f"prod/{flow.dataset_name}/{when:%Y-%m-%d_%H%M}/{flow.flow_id}"
    await check_export(
        emulator, flow, run, triggered_ms, file_type="PARQUET", compression="GZIP", folder=folder
    )


async def test_export_time_macro_in_a_template(emulator: Emulator) -> None:
    schedule = {
        "exportMode": "DAILY_FULL_EXPORT",
        "timeUnit": "day",
        "interval": 0,
        "startTime": int(emulator.clock.time()),
        "folderNameTemplate": "%DESTINATION_NAME%/%EXPORT_TIME%",
    }
    flow = await build(emulator, DESTINATIONS["gcs"], schedule=schedule)
    await emulator.clock.advance(3600)  # an hour later than the flow: the stamp is the run's
    run, triggered_ms = await export_once(emulator, flow)
    when = datetime.fromtimestamp(triggered_ms / 1000, UTC)
    assert when.hour == 1
    await check_export(
        emulator,
        flow,
        run,
        triggered_ms,
        file_type="PARQUET",
        compression="GZIP",
        folder=f"{StorageType.GCS} base/exportTime={when:%Y%m%d%H%M}",
    )


async def test_lowercase_enums_are_accepted(emulator: Emulator) -> None:
    schedule = {
        "exportMode": "first_full_then_incremental",
        "timeUnit": "Hour",
        "interval": 3,
        "startTime": int(emulator.clock.time()),
    }
    flow = await build(
        emulator,
        DESTINATIONS["azure-blob"],
        file_type="parquet",
        compression="gzip",
        schedule=schedule,
    )
    got = await emulator.fs("GET", f"/flows/{flow.flow_id}")
    stored = got.body["items"][0]["scheduleParams"]
    assert (stored["exportMode"], stored["timeUnit"], stored["interval"]) == (
        "FIRST_FULL_THEN_INCREMENTAL",
        "hour",
        3,
    )
    run, triggered_ms = await export_once(emulator, flow)
    files = await check_export(
        emulator, flow, run, triggered_ms, file_type="parquet", compression="gzip"
    )
    assert all(f.name.endswith(".gz.parquet") for f in files)
