"""Delivery: the landing URI, verification at the destination, `_SUCCESS`, the manifest and
the webhook — end to end through the engine, the emulator over HTTP and its files, on the
fake clock."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from exporter.aep.client import HttpAep
from exporter.delivery.landing import Landing, landing
from exporter.delivery.parquet import TAIL, NotParquet, footer_of
from exporter.delivery.signals import MANIFEST, SUCCESS_MARKER
from exporter.delivery.stores import LocalStore, Store
from exporter.destinations import Destination
from exporter.engine.engine import Engine
from exporter.jobs import Job, JobState, Outcome
from tests.aepclient_support import config_for
from tests.conftest import Emulator, default_knobs
from tests.delivery_support import (
    ENGINE,
    KEY_ID,
    SECRET_KEY,
    WEBHOOK_SECRET,
    Receiver,
    check_signature,
    destination,
    webhook_receiver,
)
from tests.pgp_support import Keypair


def s3(**verify: Any) -> Destination:
    extra = {"verify": verify} if verify else {}
    return destination(
        "s3", bucket="ml-exports", access_key_id=KEY_ID, secret_access_key=SECRET_KEY, **extra
    )


# -- the landing URI: a pure derivation ---------------------------------------------------

CREATED_MS = 1_764_806_459_000  # 2025-12-04 00:00:59 UTC: the minute is kept, not rounded


@pytest.mark.parametrize(
    ("dest", "uri"),
    [
        (s3(), "s3://ml-exports/ml/features/ds1/exportTime=202512040000/"),
        (
            destination("gcs", bucket="ml-exports", access_key_id="GOOG1", secret_access_key="x"),
            "gs://ml-exports/ml/features/ds1/exportTime=202512040000/",
        ),
        (
            destination(
                "azure_blob",
                container="exports",
                connection_string="DefaultEndpointsProtocol=https;AccountName=acct1;AccountKey=a2V5a2V5a2V5",
            ),
            "https://acct1.blob.core.windows.net/exports/ml/features/ds1/exportTime=202512040000/",
        ),
        (
            destination(
                "azure_blob",
                container="exports",
                connection_string="AccountName=devstoreaccount1;AccountKey=a2V5a2V5a2V5;"
                "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1",
            ),
            "http://127.0.0.1:10000/devstoreaccount1/exports/ml/features/ds1/exportTime=202512040000/",
        ),
        (
            destination(
                "adls_gen2",
                url="https://acct2.dfs.core.windows.net",
                service_principal_id="sp",
                service_principal_key="k" * 12,
                tenant="t",
            ),
            "abfss://ml@acct2.dfs.core.windows.net/features/ds1/exportTime=202512040000/",
        ),
        (
            destination(
                "adls_gen2",
                url="abfss://exports@acct2.dfs.core.windows.net/team",
                service_principal_id="sp",
                service_principal_key="k" * 12,
                tenant="t",
            ),
            "abfss://exports@acct2.dfs.core.windows.net/team/ml/features/ds1/exportTime=202512040000/",
        ),
        (
            destination(
                "sftp", host="sftp.example.com", port=2222, username="u", password="p" * 10
            ),
            "sftp://sftp.example.com:2222/ml/features/ds1/exportTime=202512040000/",
        ),
        (
            destination("sftp", host="sftp.example.com", username="u", password="p" * 10),
            "sftp://sftp.example.com:22/ml/features/ds1/exportTime=202512040000/",
        ),
    ],
    ids=["s3", "gcs", "blob", "azurite", "adls", "abfss", "sftp-port", "sftp"],
)
def test_the_landing_uri_of_each_storage(dest: Destination, uri: str) -> None:
    place = landing(dest, "ml/features/", "ds1", CREATED_MS)
    assert place is not None
    assert place.uri == uri
    assert place.retention_days is None


def test_the_landing_zone_gives_its_container_url_and_seven_days() -> None:
    dlz = destination("dlz")
    assert landing(dlz, "ml", "ds1", CREATED_MS) is None  # the account comes from AEP
    place = landing(dlz, "ml", "ds1", CREATED_MS, dlz_account="dlzacct")
    assert place == Landing(
        "https://dlzacct.blob.core.windows.net/dlz-destination/ml/ds1/exportTime=202512040000/",
        "ml/ds1/exportTime=202512040000/",
        retention_days=7,
        container="dlz-destination",
    )


def test_slash_as_the_path_puts_the_dataset_folder_at_the_root() -> None:
    place = landing(s3(), "/", "ds1", CREATED_MS)
    assert place is not None
    assert place.uri == "s3://ml-exports/ds1/exportTime=202512040000/"


def test_a_folder_template_makes_the_folder_unknown_rather_than_wrong() -> None:
    schedule = {"foldernameTemplate": "%DATASET_NAME%/%EXPORT_TIME%"}
    assert landing(s3(), "ml", "ds1", CREATED_MS, schedule=schedule) is None


# -- Parquet footers, read with ranged reads --------------------------------------------


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


@dataclass
class Ranges:
    data: bytes
    reads: list[tuple[int, int]] = field(default_factory=list)

    async def __call__(self, start: int, end: int) -> bytes:
        self.reads.append((start, end))
        return self.data[start:end]


@pytest.mark.parametrize(
    ("rows", "options"),
    [
        (0, {}),
        (1, {"compression": "gzip"}),
        (5_000, {"row_group_size": 100, "compression": "gzip"}),
        (3, {"compression": "none", "use_dictionary": False}),
    ],
)
async def test_row_counts_and_columns_come_from_the_footer_of_what_pyarrow_writes(
    rows: int, options: dict[str, Any]
) -> None:
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("name", pa.string()),
            ("flag", pa.bool_()),
            ("nested", pa.struct([("x", pa.float64()), ("tags", pa.list_(pa.string()))])),
        ]
    )
    table = pa.table(
        {
            "id": range(rows),
            "name": [f"n{i}" for i in range(rows)],
            "flag": [i % 2 == 0 for i in range(rows)],
            "nested": [{"x": 1.5, "tags": ["a", "b"]}] * rows,
        },
        schema=schema,
    )
    data = Ranges(parquet_bytes(table, **options))
    footer = await footer_of(len(data.data), data)
    assert footer.rows == rows
    assert footer.columns == (
        ("id", "int64"),
        ("name", "binary"),
        ("flag", "boolean"),
        ("nested.x", "double"),
        ("nested.tags.list.element", "binary"),
    )
    footer_len = int.from_bytes(data.data[-8:-4], "little")
    # One read when the tail holds the whole footer, else exactly the rest in a second one.
    assert len(data.reads) == (1 if footer_len + 8 <= TAIL else 2)
    assert data.reads[0] == (max(0, len(data.data) - TAIL), len(data.data))
    assert sum(end - start for start, end in data.reads) == max(
        min(TAIL, len(data.data)), footer_len + 8
    )


async def test_a_footer_longer_than_the_first_read_takes_a_second_read() -> None:
    wide = pa.table({f"column_with_a_long_name_{i:04d}": [i] for i in range(300)})
    data = Ranges(parquet_bytes(wide))
    footer = await footer_of(len(data.data), data)
    assert footer.rows == 1
    assert len(footer.columns) == 300
    assert len(data.reads) == 2
    assert data.reads[0] == (len(data.data) - TAIL, len(data.data))


async def test_a_truncated_or_foreign_file_is_not_parquet() -> None:
    data = parquet_bytes(pa.table({"a": list(range(100))}))
    for broken in (data[: len(data) // 2], data[:-1], b"{}" * 40, data[:8]):
        with pytest.raises(NotParquet):
            await footer_of(len(broken), Ranges(broken))


# -- end to end: the engine, the emulator, its destination folders -----------------------


def run_folder(emulator: Emulator, dest: str, *parts: str) -> Path:
    return emulator.data_dir / "destinations" / dest / Path(*parts)


def job(dataset: str, **changes: Any) -> Job:
    return Job.model_validate(
        {"dataset_id": dataset, "destination": "lake", "path": "ml/features", **changes}
    )


@dataclass
class Rig:
    emulator: Emulator
    engine: Engine

    async def folder(self, outcome: Outcome) -> Path:
        run = await self.emulator.control("GET", f"/runs/{outcome.run_id}")
        return Path(run["folder"])


@pytest.fixture
def knobs() -> Any:
    return default_knobs(max_rows_per_file=40)


def engine_for(emulator: Emulator, api: HttpAep, dest: Destination, seed: int = 6) -> Engine:
    config = config_for(emulator)
    return Engine(
        api,
        {"lake": dest},
        ENGINE,
        org_id=config.org_id,
        sandbox=config.sandbox,
        clock=emulator.clock,
        rng=random.Random(seed),
    )


@pytest.fixture
async def rig_for(emulator: Emulator) -> AsyncIterator[Callable[[Destination], Rig]]:
    config = config_for(emulator, rate_limit_rps=200)
    engines: list[Engine] = []
    async with HttpAep.from_config(config, clock=emulator.clock, rng=random.Random(5)) as api:

        def make(dest: Destination) -> Rig:
            eng = engine_for(emulator, api, dest)
            eng.start(renew=False)
            engines.append(eng)
            return Rig(emulator, eng)

        yield make
        for eng in engines:
            await eng.stop()


def dlz(emulator: Emulator, **verify: Any) -> Destination:
    root = emulator.data_dir / "destinations" / "dlz" / "prod" / "dlz-destination"
    return destination("dlz", verify={"store": "local", "root": str(root), **verify})


async def test_a_verified_export_says_where_it_landed_with_success_and_manifest(
    emulator: Emulator, rig_for: Callable[[Destination], Rig]
) -> None:
    rig = rig_for(dlz(emulator))
    (dataset,) = await emulator.seed(rows=100)
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED, outcome
    folder = await rig.folder(outcome)
    assert outcome.retention_days == 7
    assert outcome.landing_uri is not None
    assert outcome.landing_uri.endswith(f"/dlz-destination/ml/features/{dataset}/{folder.name}/"), (
        outcome.landing_uri,
        folder,
    )
    assert outcome.landing_uri.startswith("https://")
    parts = sorted(p.name for p in folder.iterdir())
    assert len([p for p in parts if p.startswith("part-")]) == outcome.files == 3
    assert SUCCESS_MARKER in parts
    assert MANIFEST in parts
    delivery = outcome.delivery
    assert delivery is not None
    assert delivery.verdict == "verified"
    assert (delivery.files, delivery.bytes, delivery.rows) == (3, outcome.bytes, 100)
    assert delivery.success_marker
    assert delivery.manifest == MANIFEST
    # one listing, one footer read per file, the manifest and _SUCCESS
    assert delivery.requests == 1 + 3 + 2
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {p.name: p for p in folder.iterdir() if p.name.startswith("part-")}
    assert {f["name"]: f["size"] for f in manifest["files"]} == {
        n: p.stat().st_size for n, p in files.items()
    }
    assert {f["name"]: f["rows"] for f in manifest["files"]} == {
        n: pq.ParquetFile(p).metadata.num_rows for n, p in files.items()
    }
    assert manifest["dataset_id"] == dataset
    assert manifest["run_id"] == outcome.run_id
    assert manifest["rows"] == 100
    assert manifest["landing_uri"] == outcome.landing_uri
    schema = pq.ParquetFile(next(iter(files.values()))).schema_arrow
    assert next(c["name"].split(".")[0] for c in manifest["schema"]) == schema.names[0]
    assert manifest["export_time"].startswith(folder.name.removeprefix("exportTime=")[:4])


def tamper(rig: Rig, change: Callable[[Path], None]) -> None:
    """Change the destination after the run wrote it and before verification reads it."""
    opened = rig.engine.delivery._open_store

    def open_then_change(dest: Destination, place: Landing, **kw: Any) -> Store:
        store = opened(dest, place, **kw)
        assert isinstance(store, LocalStore)
        change(store.root / place.prefix)
        return store

    rig.engine.delivery._open_store = open_then_change


async def test_a_file_removed_at_the_destination_is_a_delivery_mismatch_without_markers(
    emulator: Emulator, rig_for: Callable[[Destination], Rig]
) -> None:
    rig = rig_for(dlz(emulator, grace_s=60, poll_s=20))
    (dataset,) = await emulator.seed(rows=100)
    tamper(rig, lambda folder: sorted(folder.glob("part-*"))[0].unlink())
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.DELIVERY_MISMATCH, outcome
    assert "files: 2 at the destination, the run reported 3" in outcome.message
    assert "rows: 60 in the Parquet footers, the run reported 100" in outcome.message
    assert outcome.delivery is not None
    assert outcome.delivery.verdict == "mismatch"
    # Each look is a listing and two footer reads, at 0, 20, 40 and 60 s of the grace period
    # (fake time may jump past later looks while a listing is in a thread on a busy machine).
    assert outcome.delivery.requests % 3 == 0
    assert 3 <= outcome.delivery.requests <= 4 * 3
    folder = await rig.folder(outcome)
    names = {p.name for p in folder.iterdir()}
    assert SUCCESS_MARKER not in names
    assert MANIFEST not in names


async def test_a_truncated_file_is_a_delivery_mismatch(
    emulator: Emulator, rig_for: Callable[[Destination], Rig]
) -> None:
    rig = rig_for(dlz(emulator, grace_s=0))

    def truncate(folder: Path) -> None:
        part = sorted(folder.glob("part-*"))[-1]
        part.write_bytes(part.read_bytes()[:-100])

    (dataset,) = await emulator.seed(rows=100)
    tamper(rig, truncate)
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.DELIVERY_MISMATCH
    assert f"bytes: {outcome.bytes - 100} at the destination" in outcome.message
    assert "not a complete Parquet file" in outcome.message
    assert not (await rig.folder(outcome)).joinpath(SUCCESS_MARKER).exists()


async def test_no_folder_after_the_grace_period_is_a_mismatch_and_a_late_folder_is_fine(
    emulator: Emulator, rig_for: Callable[[Destination], Rig]
) -> None:
    dest = dlz(emulator, grace_s=100, poll_s=30)
    rig = rig_for(dest)
    (first, second) = await emulator.seed(rows=10, count=2)
    hidden: dict[str, Path] = {}

    def hide(folder: Path) -> None:
        hidden["folder"] = folder
        folder.rename(folder.with_name("elsewhere"))

    tamper(rig, hide)
    outcome = await rig.engine.run(job(first))
    assert outcome.state == JobState.DELIVERY_MISMATCH
    assert outcome.message.endswith(
        "no export folder (or an empty one) at the destination after 100 s"
    )
    started = emulator.clock.monotonic()

    def late(folder: Path) -> None:
        async def arrive() -> None:
            await emulator.clock.sleep(45)
            aside.rename(folder)

        aside = folder.with_name("not-yet")
        folder.rename(aside)
        asyncio.get_running_loop().create_task(arrive())

    rig = rig_for(dest)
    tamper(rig, late)
    outcome = await rig.engine.run(job(second))
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert outcome.delivery is not None
    assert outcome.delivery.verdict == "verified"
    assert emulator.clock.monotonic() - started >= 45


async def test_without_a_verify_section_the_outcome_still_says_where(
    emulator: Emulator, rig_for: Callable[[Destination], Rig]
) -> None:
    rig = rig_for(destination("dlz"))
    (dataset,) = await emulator.seed(rows=10)
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED
    assert outcome.delivery is None
    folder = await rig.folder(outcome)
    assert outcome.landing_uri is not None
    assert outcome.landing_uri.endswith(f"/{dataset}/{folder.name}/")
    assert not (folder / SUCCESS_MARKER).exists()


# -- the webhook -------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as rec:
        yield rec


async def test_the_webhook_is_signed_and_a_forgery_would_not_verify(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], receiver: Receiver
) -> None:
    hook = {"url": receiver.url, "secret": WEBHOOK_SECRET}
    rig = rig_for(dlz(emulator, webhook=hook))
    (dataset,) = await emulator.seed(rows=10)
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    ((headers, body),) = receiver.got
    check_signature(headers, body, emulator.clock.time())
    event = json.loads(body)
    assert event["event"] == "export.verified"
    assert event["landing_uri"] == outcome.landing_uri
    assert (event["run_id"], event["rows"], event["manifest"]) == (outcome.run_id, 10, MANIFEST)
    with pytest.raises(AssertionError):
        check_signature(headers, body.replace(b"verified", b"mismatch"), emulator.clock.time())


async def test_a_receiver_that_fails_gets_bounded_retries_and_the_outcome_stands(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], receiver: Receiver
) -> None:
    receiver.answers = [503] * 10
    hook = {"url": receiver.url, "secret": WEBHOOK_SECRET, "attempts": 4}
    rig = rig_for(dlz(emulator, webhook=hook))
    (dataset,) = await emulator.seed(rows=10)
    with capture_logs() as logs:
        outcome = await rig.engine.run(job(dataset))
        assert outcome.state == JobState.SUCCEEDED  # returned before the webhook is done
        (task,) = rig.engine.delivery.webhooks
        assert await asyncio.wait_for(task, 10) is False
    assert len(receiver.got) == 4
    assert [e["event"] for e in logs if e["event"].startswith("webhook")] == [
        "webhook_retrying",
        "webhook_retrying",
        "webhook_retrying",
        "webhook_failed",
    ]
    for headers, body in receiver.got:
        check_signature(headers, body, emulator.clock.time())


async def test_a_receiver_that_is_down_changes_nothing(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], receiver: Receiver
) -> None:
    down = receiver.url.replace("/hook", "/gone")  # 404: refused for good, no retry
    closed = "http://127.0.0.1:9/hook"  # discard port: nothing listens, connection refused
    results = []
    for url in (down, closed):
        hook = {"url": url, "secret": WEBHOOK_SECRET, "attempts": 3}
        rig = rig_for(dlz(emulator, webhook=hook))
        (dataset,) = await emulator.seed(rows=10)
        outcome = await rig.engine.run(job(dataset))
        (task,) = rig.engine.delivery.webhooks
        results.append((outcome.state, await asyncio.wait_for(task, 10)))
    assert results == [(JobState.SUCCEEDED, False), (JobState.SUCCEEDED, False)]


# -- configuration -----------------------------------------------------------------------


def test_verification_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("obstore", "asyncssh") else real(name, *a),
    )
    with pytest.raises(ValidationError, match=r"pip install 'aep-exporter\[delivery\]'"):
        s3(endpoint="https://s3.example.com")
    with pytest.raises(ValidationError, match="asyncssh"):
        destination("sftp", host="h", username="u", password="p" * 10, verify={})
    assert s3(store="local", root=str(tmp_path)).verify is not None  # a folder needs neither


@pytest.mark.parametrize(
    ("verify", "problem"),
    [
        ({"store": "local"}, "needs root"),
        ({"root": "/srv/exports"}, 'root is only for store = "local"'),
        ({"endpoint": "http://s3.example.com"}, "https://"),
        ({"webhook": {"url": "http://hooks.example.com/x", "secret": "s" * 20}}, "https://"),
        ({"access_key_id": KEY_ID}, "go together"),
    ],
)
def test_bad_verify_sections_are_refused_clearly(verify: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        s3(**verify)


async def test_read_secrets_never_reach_the_outcome_or_the_logs(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], tmp_path: Path
) -> None:
    read_secret = "Zm9vYmFyYmF6cXV4cmVhZG9ubHlrZXkxMjM0NTY3OA"
    (tmp_path / "read_key").write_text(read_secret + "\n")
    dest = s3(
        endpoint="http://127.0.0.1:9",  # nothing listens: reading fails
        access_key_id="AKIAREADONLY00000000",
        secret_access_key_file=str(tmp_path / "read_key"),
        grace_s=0,
        attempts=1,
        webhook={"url": "http://127.0.0.1:9/hook", "secret": WEBHOOK_SECRET, "attempts": 1},
    )
    assert dest.verify is not None
    assert dest.verify.secret_access_key == SecretStr(read_secret)
    assert read_secret not in repr(dest)
    assert WEBHOOK_SECRET not in repr(dest)
    rig = rig_for(dest)
    (dataset,) = await emulator.seed(rows=10)
    with capture_logs() as logs:
        outcome = await rig.engine.run(job(dataset))
        await asyncio.gather(*rig.engine.delivery.webhooks)
    assert outcome.state == JobState.DELIVERY_MISMATCH
    assert "listing" in outcome.message
    assert "failed" in outcome.message
    text = outcome.model_dump_json() + json.dumps(logs, default=str)
    assert read_secret not in text
    assert WEBHOOK_SECRET not in text
    assert SECRET_KEY not in text


def test_every_way_a_job_ends_has_an_exit_code_and_a_mismatch_has_its_own() -> None:
    from exporter.exitcodes import Exit
    from exporter.jobs import TERMINAL, check_transition
    from exporter.oneshot import EXIT

    assert set(TERMINAL) <= set(EXIT)
    assert EXIT[JobState.DELIVERY_MISMATCH] == Exit.DELIVERY_MISMATCH
    assert list(EXIT.values()).count(Exit.DELIVERY_MISMATCH) == 1
    check_transition(JobState.RUNNING, JobState.DELIVERY_MISMATCH)  # the journal accepts it


async def test_the_daemon_files_where_it_landed_and_the_verdict(tmp_path: Path) -> None:
    """Through the daemon on the AEP fake, whose run reports a file that nothing wrote: the
    journal takes `running -> delivery_mismatch`, the result is filed under failed/, and it
    and the `job_finished` line carry the landing URI and the verdict."""
    from exporter.aep.fake import FakeAep
    from exporter.clock import FakeClock
    from exporter.daemon.core import EXIT_OK
    from exporter.sources.spool import RESULT_SUFFIX
    from tests.daemon_support import spool_daemon, spool_of
    from tests.test_daemon_fake import fake_settings

    root = tmp_path / "bucket"
    settings = fake_settings(tmp_path).model_copy(
        update={"destinations": {"lake": s3(store="local", root=str(root), grace_s=0)}}
    )
    clock = FakeClock(auto_advance=True)
    aep = FakeAep(clock, ready_after_s=-1e9, run_duration_s=30)
    daemon = spool_daemon(settings, clock=clock, api=aep, rng=random.Random(7))
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        async with asyncio.timeout(20):
            await daemon.ready.wait()
        spool = spool_of(daemon)
        staged = tmp_path / "spool" / "job.json.tmp"
        staged.write_text(
            json.dumps({"id": "j", "dataset_id": "d1", "destination": "lake", "path": "ml/x"})
        )
        staged.rename(spool.dirs["incoming"] / "job.json")
        async with asyncio.timeout(20), daemon.filed:
            await daemon.filed.wait_for(lambda: daemon.counts.filed >= 1)
        daemon.stop()
        async with asyncio.timeout(20):
            assert await task == EXIT_OK
    result = json.loads((spool.dirs["failed"] / f"job.json{RESULT_SUFFIX}").read_text())
    assert result["state"] == "delivery_mismatch"
    assert (result["files"], result["delivery"]["files"]) == (1, 0)
    assert result["message"].startswith("delivery mismatch: no export folder")
    assert result["landing_uri"].startswith("s3://ml-exports/ml/x/d1/exportTime=")
    (line,) = [e for e in logs if e["event"] == "job_finished"]
    assert (line["state"], line["landing_uri"], line["delivery"]) == (
        "delivery_mismatch",
        result["landing_uri"],
        "mismatch",
    )
    assert not root.exists()  # no marker was written anywhere


async def test_an_empty_export_is_verified_and_still_gets_its_success_marker(
    tmp_path: Path,
) -> None:
    """A run of `success` with no new data writes no folder: nothing to miss, and `_SUCCESS`
    in a folder made for it tells a reader the export is done (and empty)."""
    from exporter.aep.api import RunInfo
    from exporter.clock import FakeClock
    from exporter.delivery.deliver import Deliverer

    run = RunInfo("r0", "f0", "success", CREATED_MS, CREATED_MS, CREATED_MS + 1)
    outcome = Outcome(job_id="empty", state=JobState.SUCCEEDED, run_id="r0")
    deliverer = Deliverer(FakeClock(auto_advance=True), random.Random(1))
    result = await deliverer.deliver(
        s3(store="local", root=str(tmp_path)), job("ds1"), run, outcome
    )
    assert result.state == JobState.SUCCEEDED, result
    assert result.delivery is not None
    assert (result.delivery.files, result.delivery.rows) == (0, None)
    folder = tmp_path / "ml/features/ds1/exportTime=202512040000"
    assert sorted(p.name for p in folder.iterdir()) == [SUCCESS_MARKER, MANIFEST]
    assert json.loads((folder / MANIFEST).read_text())["files"] == []


async def test_a_redirecting_receiver_is_not_followed(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], receiver: Receiver
) -> None:
    """A 302 to a path that would accept the POST: not followed, not retried (a redirect
    could carry the signed event somewhere the secret's owner never named)."""
    receiver.answers = [302, 204]
    hook = {"url": receiver.url, "secret": WEBHOOK_SECRET, "attempts": 3}
    rig = rig_for(dlz(emulator, webhook=hook))
    (dataset,) = await emulator.seed(rows=10)
    outcome = await rig.engine.run(job(dataset))
    (task,) = rig.engine.delivery.webhooks
    assert await asyncio.wait_for(task, 10) is False
    assert outcome.state == JobState.SUCCEEDED
    assert len(receiver.got) == 1


def test_the_export_command_reports_where_and_the_verdict() -> None:
    from rich.console import Console

    from exporter.jobs import Delivery
    from exporter.oneshot import report

    console = Console(record=True, width=200)
    outcome = Outcome(
        job_id="j",
        state=JobState.DELIVERY_MISMATCH,
        landing_uri="https://acct.blob.core.windows.net/dlz-destination/ml/ds/exportTime=1/",
        retention_days=7,
        delivery=Delivery(verdict="mismatch", files=2, bytes=10, rows=5),
        message="delivery mismatch: files: 2 at the destination, the run reported 3",
    )
    report(outcome, console)
    text = console.export_text()
    assert "landed   https://acct.blob.core.windows.net/dlz-destination/" in text
    assert "(kept 7 days)" in text
    assert "MISMATCH 2 files, 10 bytes, 5 rows at the destination" in text


async def test_an_encrypted_export_is_verified_by_names_and_sizes_and_decrypts(
    emulator: Emulator, rig_for: Callable[[Destination], Rig], keypair: Keypair
) -> None:
    """PGP-encrypted part files (`<part file>.gpg`): footers cannot be read, so verification
    compares the files and the bytes AEP reports for them, and counts no rows; the manifest
    lists them, and the test's own key decrypts them to the rows the run reported."""
    root = emulator.data_dir / "destinations" / "s3" / "ml-exports"
    dest = destination(
        "s3",
        bucket="ml-exports",
        access_key_id=KEY_ID,
        secret_access_key=SECRET_KEY,
        pgp_public_key=keypair.armored.decode(),
        verify={"store": "local", "root": str(root)},
    )
    rig = rig_for(dest)
    (dataset,) = await emulator.seed(rows=100)
    outcome = await rig.engine.run(job(dataset))
    assert outcome.state == JobState.SUCCEEDED, outcome
    delivery = outcome.delivery
    assert delivery is not None
    assert (delivery.verdict, delivery.files, delivery.rows) == ("verified", 3, None)
    folder = await rig.folder(outcome)
    manifest = json.loads((folder / MANIFEST).read_text())
    names = [f["name"] for f in manifest["files"]]
    assert all(n.endswith(".gz.parquet.gpg") for n in names), names
    rows = sum(
        pq.read_table(io.BytesIO(keypair.decrypt((folder / n).read_bytes()))).num_rows
        for n in names
    )
    assert rows == outcome.records == 100


async def test_a_stop_cancels_a_webhook_that_hangs(emulator: Emulator) -> None:
    """A receiver that never answers: stopping cancels the send (no wait past the drain
    deadline) and the job's outcome was never waiting for it."""
    import aiohttp
    from aiohttp import web

    from exporter.delivery.config import WebhookSettings
    from exporter.delivery.deliver import Deliverer
    from exporter.delivery.signals import send_webhook

    got = asyncio.Event()
    hold = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        got.set()
        await hold.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        settings = WebhookSettings(
            url=f"http://127.0.0.1:{port}/hook", secret=SecretStr(WEBHOOK_SECRET), timeout_s=300
        )
        deliverer = Deliverer(emulator.clock, random.Random(1))
        session = aiohttp.ClientSession()
        task = asyncio.create_task(
            send_webhook(
                session,
                settings,
                {"event": "export.verified"},
                clock=emulator.clock,
                rng=random.Random(2),
            )
        )
        deliverer.webhooks.add(task)
        await asyncio.wait_for(got.wait(), 10)
        await deliverer.aclose(within_s=0)
        assert task.cancelled()
        await session.close()
    finally:
        hold.set()
        await runner.cleanup()
