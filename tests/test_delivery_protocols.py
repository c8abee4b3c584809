"""Delivery verification through real storage protocols: the emulator writes each run to a
loopback server (moto S3, Azurite Blob, an asyncssh SFTP server; tests/storage_servers.py)
and the exporter reads it back through that server with obstore or asyncssh — listing,
ranged footer reads, marker writes — never from the emulator's memory or files.

GCS is read as AEP writes it, through the S3-interoperable XML API with HMAC keys; the GCS
emulator serves no XML listing, so moto stands in for storage.googleapis.com there (the
`gcs-xml-on-moto` case: a `gcs` destination, the emulator writing and the exporter reading
with S3 signatures). ADLS Gen2 has no local server at all (docs/design.md, "Delivery").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import random
import urllib.error
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import obstore
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.aep.api import RunInfo
from exporter.aep.client import HttpAep
from exporter.delivery.deliver import Deliverer
from exporter.delivery.landing import Landing
from exporter.delivery.signals import MANIFEST, SUCCESS_MARKER
from exporter.delivery.stores import SftpStore, Store, StoreError, open_store
from exporter.destinations import Destination
from exporter.engine.engine import Engine
from exporter.jobs import Job, JobState, Outcome
from tests.aepclient_support import config_for
from tests.conftest import Emulator
from tests.delivery_support import (
    ENGINE,
    WEBHOOK_SECRET,
    Receiver,
    check_signature,
    destination,
    webhook_receiver,
)
from tests.storage_servers import AzuriteBlob, S3Server, SftpServer
from tests.test_emulator_storage import use_servers

# -- through the engine: S3 (moto), GCS's XML API (moto), Azure Blob (Azurite), SFTP --------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as rec:
        yield rec


Tamper = Callable[[str], None]
"""Change the export folder (its key prefix in the bucket or container) at the server."""


def job(dataset: str, path: str) -> Job:
    return Job.model_validate({"dataset_id": dataset, "destination": "store", "path": path})


class Target:
    """One storage server as a destination: how to configure it, list it and change it."""

    def __init__(
        self,
        dest: Callable[..., Destination],
        store: Any,
        endpoints: str,
        wrong_read: dict[str, str],
    ) -> None:
        self.dest = dest
        self.store = store
        self.endpoints = endpoints
        self.wrong_read = wrong_read
        """Read credentials of the right shape that the server refuses."""

    def list(self, prefix: str) -> dict[str, int]:
        return {
            str(m["path"]).removeprefix(prefix): int(m["size"])
            for chunk in obstore.list(self.store, prefix=prefix)
            for m in chunk
        }

    def read(self, key: str) -> bytes:
        return bytes(obstore.get(self.store, key).bytes())

    def remove_one(self, prefix: str) -> None:
        first = sorted(k for k in self.list(prefix) if k.startswith("part-"))[0]
        obstore.delete(self.store, prefix + first)

    def truncate_one(self, prefix: str) -> None:
        last = sorted(k for k in self.list(prefix) if k.startswith("part-"))[-1]
        data = self.read(prefix + last)
        obstore.put(self.store, prefix + last, data[: len(data) - 64])


class SftpTarget(Target):
    """The SFTP server: listed and read over SFTP; changed in its chroot folder."""

    def __init__(self, server: SftpServer, dest: Callable[..., Destination]) -> None:
        super().__init__(dest, None, "sftp=connection", {"password": "not-the-password"})
        self.server = server

    def list(self, prefix: str) -> dict[str, int]:
        return {k.removeprefix(prefix): v for k, v in self.server.list(prefix).items()}

    def read(self, key: str) -> bytes:
        return self.server.read(key)

    def _parts(self, prefix: str) -> Sequence[Path]:
        return sorted((self.server.root / prefix).glob("part-*"))

    def remove_one(self, prefix: str) -> None:
        self._parts(prefix)[0].unlink()

    def truncate_one(self, prefix: str) -> None:
        last = self._parts(prefix)[-1]
        last.write_bytes(last.read_bytes()[:-64])


@pytest.fixture(params=["s3", "gcs-xml-on-moto", "azure_blob", "sftp"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "sftp":
        sftp: SftpServer = request.getfixturevalue("sftp_server")

        def sftp_dest(**verify: Any) -> Destination:
            return destination(
                "sftp",
                host=sftp.host,
                port=sftp.port,
                username=sftp.password_user,
                password=sftp.password,
                verify=verify,
            )

        return SftpTarget(sftp, sftp_dest)
    if request.param in ("s3", "gcs-xml-on-moto"):
        # GCS through its S3-interoperable XML API with HMAC keys, as AEP's GCS destination
        # writes and the verifier reads: moto stands in for storage.googleapis.com, because
        # the GCS emulator serves no XML listing.
        s3: S3Server = request.getfixturevalue("s3_server")
        kind = "s3" if request.param == "s3" else "gcs"

        def s3_dest(**verify: Any) -> Destination:
            return destination(
                kind,
                bucket=s3.bucket,
                access_key_id=s3.access_key,
                secret_access_key=s3.secret_key,
                verify={"endpoint": s3.endpoint, "region": s3.region, **verify},
            )

        wrong = {"access_key_id": "AKIAAAAAAAAAAAAAAAAA", "secret_access_key": "x" * 40}
        return Target(s3_dest, s3.store(), f"{kind}={s3.endpoint}", wrong)
    blob: AzuriteBlob = request.getfixturevalue("azurite_blob")

    def blob_dest(**verify: Any) -> Destination:
        return destination(
            "azure_blob",
            container=blob.container,
            connection_string=blob.connection_string,
            verify=verify,
        )

    wrong = {"account_key": "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="}
    return Target(blob_dest, blob.store(), "azure_blob=connection", wrong)


@pytest.fixture
async def run_job(emulator: Emulator, target: Target) -> AsyncIterator[Callable[..., Any]]:
    """Run one job of a fresh dataset to `target` through an engine; `tamper` changes the
    folder at the server between the run and verification."""
    await use_servers(emulator, target.endpoints)
    config = config_for(emulator, rate_limit_rps=200)
    engines: list[Engine] = []
    async with HttpAep.from_config(config, clock=emulator.clock, rng=random.Random(5)) as api:

        async def run(
            path: str, tamper: Tamper | None = None, **verify: Any
        ) -> tuple[Outcome, str]:
            eng = Engine(
                api,
                {"store": target.dest(**verify)},
                ENGINE,
                org_id=config.org_id,
                sandbox=config.sandbox,
                clock=emulator.clock,
                rng=random.Random(6),
            )
            engines.append(eng)
            eng.start(renew=False)
            folder: list[str] = []
            opened = eng.delivery._open_store

            def open_then_tamper(dest: Destination, place: Landing, **kw: Any) -> Store:
                folder.append(place.prefix)
                if tamper is not None:
                    tamper(place.prefix)
                return opened(dest, place, **kw)

            eng.delivery._open_store = open_then_tamper
            (dataset,) = await emulator.seed(rows=100)
            outcome = await eng.run(job(dataset, path))
            return outcome, folder[0] if folder else ""

        yield run
        for eng in engines:
            await eng.stop()


async def test_a_verified_export_gets_its_manifest_and_success_marker_at_the_server(
    run_job: Callable[..., Any], target: Target, receiver: Receiver, emulator: Emulator
) -> None:
    hook = {"url": receiver.url, "secret": WEBHOOK_SECRET}
    outcome, prefix = await run_job("ml/verified", webhook=hook)
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert outcome.files == 3  # max_rows_per_file = 40
    assert outcome.landing_uri is not None
    assert outcome.landing_uri.endswith(f"/ml/verified/{outcome_dataset(prefix)}/{leaf(prefix)}/")
    listed = target.list(prefix)
    parts = {k: v for k, v in listed.items() if k.startswith("part-")}
    assert len(parts) == 3
    assert sum(parts.values()) == outcome.bytes
    assert listed[SUCCESS_MARKER] == 0
    manifest = json.loads(target.read(prefix + MANIFEST))
    assert {f["name"]: f["size"] for f in manifest["files"]} == parts
    assert sum(f["rows"] for f in manifest["files"]) == manifest["rows"] == 100
    assert manifest["run_id"] == outcome.run_id
    delivery = outcome.delivery
    assert delivery is not None
    assert (delivery.verdict, delivery.rows, delivery.requests) == ("verified", 100, 1 + 3 + 2)
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    ((headers, body),) = receiver.got
    check_signature(headers, body, emulator.clock.time())
    assert json.loads(body)["landing_uri"] == outcome.landing_uri


def outcome_dataset(prefix: str) -> str:
    return prefix.rstrip("/").split("/")[-2]


def leaf(prefix: str) -> str:
    return prefix.rstrip("/").split("/")[-1]


@pytest.fixture
def knobs() -> Any:
    from tests.conftest import default_knobs

    return default_knobs(max_rows_per_file=40)


async def test_a_file_removed_at_the_server_is_a_mismatch_and_no_markers_are_written(
    run_job: Callable[..., Any], target: Target
) -> None:
    outcome, prefix = await run_job("ml/removed", target.remove_one, grace_s=0)
    assert outcome.state == JobState.DELIVERY_MISMATCH, outcome
    assert "files: 2 at the destination, the run reported 3" in outcome.message
    listed = target.list(prefix)
    assert len(listed) == 2
    assert SUCCESS_MARKER not in listed
    assert MANIFEST not in listed


async def test_a_file_truncated_at_the_server_is_a_mismatch(
    run_job: Callable[..., Any], target: Target
) -> None:
    outcome, prefix = await run_job("ml/truncated", target.truncate_one, grace_s=0)
    assert outcome.state == JobState.DELIVERY_MISMATCH, outcome
    assert f"bytes: {outcome.bytes - 64} at the destination" in outcome.message
    assert "not a complete Parquet file" in outcome.message
    assert SUCCESS_MARKER not in target.list(prefix)


async def test_read_credentials_the_server_refuses_are_a_mismatch_that_names_no_secret(
    run_job: Callable[..., Any], target: Target
) -> None:
    wrong = target.wrong_read
    outcome, _ = await run_job("ml/refused", grace_s=0, attempts=1, **wrong)
    assert outcome.state == JobState.DELIVERY_MISMATCH
    assert "failed" in outcome.message
    assert next(iter(wrong.values())) not in outcome.model_dump_json()


# -- the Data Landing Zone: its SAS, against Azurite -----------------------------------------


def account_sas(account: str, key: str, permissions: str) -> str:
    """An Azure Storage account SAS for the Blob service (version 2021-08-06), signed with the
    account key as Azure does: what the landing zone's credentials call hands out, in shape."""
    version, expiry = "2021-08-06", "2099-01-01T00:00:00Z"
    to_sign = "\n".join(
        [account, permissions, "b", "sco", "", expiry, "", "http,https", version, "", ""]
    )
    digest = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    query = {
        "sv": version,
        "ss": "b",
        "srt": "sco",
        "sp": permissions,
        "se": expiry,
        "spr": "http,https",
        "sig": base64.b64encode(digest).decode(),
    }
    return urllib.parse.urlencode(query)


@pytest.mark.parametrize("case", ["verified", "removed", "forged"])
async def test_the_landing_zone_is_read_with_the_sas_aep_hands_out(
    emulator: Emulator, azurite_blob: AzuriteBlob, case: str
) -> None:
    """The files are put into Azurite's `dlz-destination` container (the emulator writes the
    landing zone to local folders only); the exporter reads them with a SAS from the
    credentials call, never with the account key."""
    with contextlib.suppress(urllib.error.HTTPError):  # 409: made by another case
        azurite_blob.make_container("dlz-destination")
    admin = azurite_blob.store("dlz-destination")
    minute = ["verified", "removed", "forged"].index(case)
    created_ms = 1_767_225_600_000 + minute * 60_000  # 2026-01-01 00:0<minute>
    prefix = f"ml/dlz/ds1/exportTime=20260101000{minute}/"
    removed = case == "removed"
    sizes = []
    for index in range(3):
        sink = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(index * 10, index * 10 + 10))}), sink)
        obstore.put(admin, f"{prefix}part-{index:05d}-c000.parquet", sink.getvalue())
        sizes.append(len(sink.getvalue()))
    if removed:
        obstore.delete(admin, f"{prefix}part-00001-c000.parquet")
    sas = account_sas(azurite_blob.account, azurite_blob.key, "rwlc")
    if case == "forged":  # signed with another key: Azurite must refuse it
        sas = account_sas(azurite_blob.account, base64.b64encode(b"k" * 64).decode(), "rwlc")

    async def credentials() -> dict[str, Any]:
        return {
            "containerName": "dlz-destination",
            "SASToken": sas,
            "storageAccountName": azurite_blob.account,
            "SASUri": f"{azurite_blob.endpoint}/dlz-destination?{sas}",
        }

    run = RunInfo(
        id="run-dlz",
        flow_id="flow-dlz",
        status="success",
        created_at_ms=created_ms,
        started_at_ms=created_ms,
        completed_at_ms=created_ms + 1,
        output_files=3,
        output_records=30,
        output_bytes=sum(sizes),
    )
    outcome = Outcome(
        job_id="dlz", state=JobState.SUCCEEDED, run_id=run.id, files=3, records=30, bytes=sum(sizes)
    )
    dest = destination(
        "dlz", verify={"endpoint": azurite_blob.endpoint, "grace_s": 0, "attempts": 1}
    )
    deliverer = Deliverer(emulator.clock, random.Random(1), dlz_credentials=credentials)
    result = await deliverer.deliver(dest, job("ds1", "ml/dlz"), run, outcome)
    await deliverer.aclose()
    assert result.landing_uri == (
        f"https://{azurite_blob.account}.blob.core.windows.net/dlz-destination/{prefix}"
    )
    assert result.retention_days == 7
    listed = {
        str(m["path"]).removeprefix(prefix)
        for chunk in obstore.list(admin, prefix=prefix)
        for m in chunk
    }
    if removed:
        assert result.state == JobState.DELIVERY_MISMATCH
        assert "files: 2 at the destination, the run reported 3" in result.message
        assert SUCCESS_MARKER not in listed
    elif case == "forged":
        assert result.state == JobState.DELIVERY_MISMATCH
        assert "listing" in result.message
        assert "failed" in result.message
        assert SUCCESS_MARKER not in listed
    else:
        assert result.state == JobState.SUCCEEDED, result
        assert result.delivery is not None
        assert result.delivery.rows == 30
        assert {SUCCESS_MARKER, MANIFEST} <= listed
    assert sas.split("sig=")[1] not in result.model_dump_json()


# -- an SFTP server's host key -----------------------------------------------------------


def sftp_with_known_hosts(sftp: SftpServer, known_hosts: Path | None, host: str) -> Destination:
    verify: dict[str, Any] = {} if known_hosts is None else {"known_hosts": str(known_hosts)}
    return destination(
        "sftp",
        host=host,
        port=sftp.port,
        username=sftp.password_user,
        password=sftp.password,
        verify=verify,
    )


async def test_the_sftp_servers_key_must_be_the_one_known_hosts_names(
    sftp_server: SftpServer, tmp_path: Path
) -> None:
    place = Landing(uri="sftp://test/", prefix="")
    right = tmp_path / "right_known_hosts"
    right.write_text(sftp_server.known_hosts_line())
    store = open_store(sftp_with_known_hosts(sftp_server, right, sftp_server.host), place)
    try:
        assert isinstance(await store.list(""), list)
    finally:
        await store.aclose()

    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{sftp_server.host}]:{sftp_server.port} {impostor.strip()}\n")
    store = open_store(sftp_with_known_hosts(sftp_server, wrong, sftp_server.host), place)
    try:
        with pytest.raises(StoreError, match="SFTP connection failed"):
            await store.list("")
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("host", "given", "checked_against"),
    [
        ("sftp.example.com", False, "the user's ~/.ssh/known_hosts"),
        ("sftp.example.com", True, "the given file"),
        ("127.0.0.1", True, "the given file"),
        ("127.0.0.1", False, "nothing: a server on this machine"),
        ("localhost", False, "nothing: a server on this machine"),
    ],
)
def test_an_sftp_key_goes_unchecked_only_on_this_machine(
    sftp_server: SftpServer, tmp_path: Path, host: str, given: bool, checked_against: str
) -> None:
    known = tmp_path / "known_hosts" if given else None
    store = open_store(
        sftp_with_known_hosts(sftp_server, known, host), Landing(uri="sftp://x/", prefix="")
    )
    assert isinstance(store, SftpStore)
    # asyncssh reads ~/.ssh/known_hosts when the option is absent; None turns checking off.
    options = store.connect_options
    expected: object = {
        "the user's ~/.ssh/known_hosts": "absent",
        "the given file": str(known),
        "nothing: a server on this machine": None,
    }[checked_against]
    assert options.get("known_hosts", "absent") == expected
