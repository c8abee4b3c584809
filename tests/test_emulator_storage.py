"""The emulator exports through real storage protocols (storage_endpoints): each run's files
land on a loopback server (moto S3, Azurite Blob, a GCS emulator, an asyncssh SFTP server),
written with the base connection's credentials, and are read back through that server — never
from the emulator. A server that refuses the credentials fails the run as AEP's failed runs
read. Encrypted exports (the base connection's PGP/GPG `encryption`) are decrypted here with
the test's own private key."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pyarrow.parquet as pq
import pytest

from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, STORAGE_SPECS, StorageType
from tests.conftest import Emulator
from tests.pgp_support import Keypair
from tests.storage_servers import AzuriteBlob, GcsServer, S3Server, SftpServer
from tests.test_emulator_runs import (
    WINDOW,
    batch_ids,
    created,
    destination_files,
    finished,
    start,
    status,
)

# -- helpers --------------------------------------------------------------------------------


async def use_servers(emulator: Emulator, *endpoints: str) -> None:
    """Map storage kinds to servers through the control API, as a user would."""
    await emulator.control("PATCH", "/config", {"storage_endpoints": list(endpoints)})


async def export(
    emulator: Emulator,
    storage: StorageType,
    auth: dict[str, Any],
    location: dict[str, str],
    *,
    encryption: dict[str, Any] | None = None,
    rows: int = 40,
) -> tuple[str, str, dict[str, Any]]:
    """Seed a dataset, build the connections and a one-time flow, run it to its end: the
    dataset id, the run id and the finished run."""
    (dataset_id,) = await emulator.seed(rows=rows)
    spec = STORAGE_SPECS[storage]
    ref = {"id": spec.connection_spec_id, "version": "1.0"}
    base: dict[str, Any] = {"name": "base", "connectionSpec": ref, "auth": auth}
    if encryption is not None:
        base["encryption"] = encryption
    base_id = await created(emulator, "connections", base)
    source_id = await created(
        emulator,
        "sourceConnections",
        {
            "name": "source",
            "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
            "params": {"datasets": [{"dataSetId": dataset_id}]},
        },
    )
    target_id = await created(
        emulator,
        "targetConnections",
        {
            "name": "target",
            "baseConnectionId": base_id,
            "connectionSpec": ref,
            "params": {**location, "datasetFileType": "PARQUET", "compression": "GZIP"},
        },
    )
    flow_id = await created(
        emulator,
        "flows",
        {
            "name": "flow",
            "flowSpec": {"id": spec.dataset_flow_spec_id, "version": "1.0"},
            "sourceConnectionIds": [source_id],
            "targetConnectionIds": [target_id],
            "scheduleParams": {
                "exportMode": "DAILY_FULL_EXPORT",
                "timeUnit": "day",
                "interval": 0,
                "startTime": int(emulator.clock.time()),
            },
        },
    )
    await emulator.clock.advance(WINDOW)
    run_id = await start(emulator, flow_id, dataset_id)
    return dataset_id, run_id, await finished(emulator, run_id)


def rows_of(blobs: list[bytes]) -> list[str]:
    return [
        pid
        for blob in blobs
        for pid in pq.read_table(io.BytesIO(blob)).column("person_id").to_pylist()
    ]


def assert_landed(
    emulator: Emulator,
    run: dict[str, Any],
    dataset_id: str,
    listed: dict[str, int],
    folder_prefix: str,
) -> list[str]:
    """The run succeeded; the server holds its files, in AEP's folder layout, and they are
    what the run's metrics say (count and bytes). Returns their keys."""
    assert status(run) == "success", run["metrics"]["statusSummary"]
    metrics = run["metrics"]
    keys = sorted(listed)
    assert keys, "nothing landed on the server"
    pattern = re.compile(
        re.escape(folder_prefix) + re.escape(dataset_id) + r"/exportTime=\d{12}/part-\d{5}-.*"
    )
    assert all(pattern.fullmatch(k) for k in keys), keys
    assert metrics["fileSummary"]["outputFileCount"] == len(keys)
    assert metrics["sizeSummary"]["outputBytes"] == sum(listed.values())
    assert not destination_files(emulator), "a server export left files in local folders"
    return keys


def assert_refused(run: dict[str, Any], reason: str, *secrets: str) -> None:
    """Failed as AEP's failed runs read, saying the credentials were refused and the server's
    `reason`, quoting none of `secrets`."""
    assert status(run) == "failed"
    (error,) = run["metrics"]["statusSummary"]["errors"]
    assert error["code"] == "ACTIVATION_BATCH-0000-FAILED"
    assert "refused" in error["message"], error
    assert reason in error["message"], error
    assert "outputBytes" not in run["metrics"]["sizeSummary"]
    for secret in secrets:
        assert secret not in error["message"]


# -- S3 (moto) ------------------------------------------------------------------------------


def s3_auth(server: S3Server, secret: str | None = None) -> dict[str, Any]:
    return {
        "specName": "Access Key",
        "params": {"s3AccessKey": server.access_key, "s3SecretKey": secret or server.secret_key},
    }


async def test_s3_export_lands_in_the_bucket_and_reads_back(
    emulator: Emulator, s3_server: S3Server
) -> None:
    await use_servers(emulator, f"s3={s3_server.endpoint}")
    dataset_id, run_id, run = await export(
        emulator,
        StorageType.S3,
        s3_auth(s3_server),
        {"bucketName": s3_server.bucket, "path": "ml/s3-landed"},
    )
    listed = s3_server.list("ml/s3-landed/")
    keys = assert_landed(emulator, run, dataset_id, listed, "ml/s3-landed/")
    assert sorted(rows_of([s3_server.read(k) for k in keys])) == sorted(
        batch_ids(emulator, dataset_id)
    )
    where = await emulator.control("GET", f"/runs/{run_id}")
    folder = keys[0].rsplit("/", 1)[0]
    assert where["location"] == f"s3://{s3_server.bucket}/{folder}/"
    assert sorted(where["files"]) == keys


async def test_s3_refused_secret_fails_the_run_and_writes_nothing(
    emulator: Emulator, s3_server: S3Server
) -> None:
    await use_servers(emulator, f"s3={s3_server.endpoint}")
    wrong = s3_server.secret_key[::-1]
    _, _, run = await export(
        emulator,
        StorageType.S3,
        s3_auth(s3_server, wrong),
        {"bucketName": s3_server.bucket, "path": "ml/s3-refused"},
    )
    assert_refused(run, "403 SignatureDoesNotMatch", wrong, s3_server.secret_key)
    assert s3_server.list("ml/s3-refused/") == {}


async def test_folder_path_slash_exports_at_the_bucket_root(
    emulator: Emulator, s3_server: S3Server
) -> None:
    """`/` as the folder path (Adobe allows it since 2024): the dataset folder is top level."""
    s3_server.make_bucket("root-exports")
    await use_servers(emulator, f"s3={s3_server.endpoint}")
    dataset_id, _, run = await export(
        emulator, StorageType.S3, s3_auth(s3_server), {"bucketName": "root-exports", "path": "/"}
    )
    assert_landed(emulator, run, dataset_id, s3_server.list_in("root-exports"), "")


# -- Azure Blob (Azurite) -------------------------------------------------------------------


def blob_auth(connection_string: str) -> dict[str, Any]:
    return {"specName": "ConnectionString", "params": {"connectionString": connection_string}}


async def test_azure_blob_export_goes_to_the_connection_strings_blob_endpoint(
    emulator: Emulator, azurite_blob: AzuriteBlob
) -> None:
    await use_servers(emulator, "azure_blob=connection")
    dataset_id, run_id, run = await export(
        emulator,
        StorageType.AZURE_BLOB,
        blob_auth(azurite_blob.connection_string),
        {"container": azurite_blob.container, "path": "ml/blob-landed"},
    )
    keys = assert_landed(
        emulator, run, dataset_id, azurite_blob.list("ml/blob-landed/"), "ml/blob-landed/"
    )
    assert sorted(rows_of([azurite_blob.read(k) for k in keys])) == sorted(
        batch_ids(emulator, dataset_id)
    )
    where = await emulator.control("GET", f"/runs/{run_id}")
    assert where["location"].startswith(
        f"https://{azurite_blob.account}.blob.core.windows.net/{azurite_blob.container}/ml/"
    )


async def test_azure_blob_export_to_a_mapped_azurite_endpoint(
    emulator: Emulator, azurite_blob: AzuriteBlob
) -> None:
    """A connection string without BlobEndpoint (as Azure's portal gives it) and the knob
    naming Azurite: the account goes into the path, as Azurite's URLs have it."""
    plain = (
        f"DefaultEndpointsProtocol=https;AccountName={azurite_blob.account};"
        f"AccountKey={azurite_blob.key};EndpointSuffix=core.windows.net"
    )
    server_root = azurite_blob.endpoint.removesuffix(f"/{azurite_blob.account}")
    await use_servers(emulator, f"azure_blob={server_root}")
    dataset_id, _, run = await export(
        emulator,
        StorageType.AZURE_BLOB,
        blob_auth(plain),
        {"container": azurite_blob.container, "path": "ml/blob-mapped"},
    )
    assert_landed(
        emulator, run, dataset_id, azurite_blob.list("ml/blob-mapped/"), "ml/blob-mapped/"
    )


async def test_azure_blob_refused_key_fails_the_run(
    emulator: Emulator, azurite_blob: AzuriteBlob
) -> None:
    wrong_key = "A" * 43 + "="
    wrong = azurite_blob.connection_string.replace(azurite_blob.key, wrong_key)
    await use_servers(emulator, "azure_blob=connection")
    _, _, run = await export(
        emulator,
        StorageType.AZURE_BLOB,
        blob_auth(wrong),
        {"container": azurite_blob.container, "path": "ml/blob-refused"},
    )
    assert_refused(run, "403 AuthorizationFailure", wrong_key, azurite_blob.key)
    assert azurite_blob.list("ml/blob-refused/") == {}


# -- GCS (gcp-storage-emulator) -------------------------------------------------------------


async def test_gcs_export_is_written_with_the_hmac_keys_and_reads_back(
    emulator: Emulator, gcs_server: GcsServer
) -> None:
    """Written as AEP writes to GCS (the XML API, HMAC keys); read back through the JSON API.
    The GCS emulator checks no credentials: a refused key is not testable here
    (docs/aep-notes.md#exports-to-storage-servers)."""
    await use_servers(emulator, f"gcs={gcs_server.endpoint}")
    dataset_id, _, run = await export(
        emulator,
        StorageType.GCS,
        {
            "specName": "Google Cloud Storage authentication credentials",
            "params": {
                "accessKeyId": gcs_server.hmac_access_id,
                "secretAccessKey": gcs_server.hmac_secret,
            },
        },
        {"bucketName": gcs_server.bucket, "path": "ml/gcs-landed"},
    )
    keys = assert_landed(
        emulator, run, dataset_id, gcs_server.list("ml/gcs-landed/"), "ml/gcs-landed/"
    )
    assert sorted(rows_of([gcs_server.read(k) for k in keys])) == sorted(
        batch_ids(emulator, dataset_id)
    )


# -- SFTP (asyncssh) ------------------------------------------------------------------------


def sftp_auth(server: SftpServer, **params: Any) -> dict[str, Any]:
    base = {"domain": server.host, "port": str(server.port)}
    if "sshKey" in params:
        return {"specName": "SFTP with SSH Key", "params": {**base, **params}}
    return {"specName": "SFTP with Password", "params": {**base, **params}}


async def test_sftp_export_with_a_password_lands_at_the_remote_path(
    emulator: Emulator, sftp_server: SftpServer
) -> None:
    await use_servers(emulator, "sftp=connection")
    dataset_id, run_id, run = await export(
        emulator,
        StorageType.SFTP,
        sftp_auth(sftp_server, username=sftp_server.password_user, password=sftp_server.password),
        {"remotePath": "/ml/sftp-password"},
    )
    keys = assert_landed(
        emulator, run, dataset_id, sftp_server.list("ml/sftp-password"), "ml/sftp-password/"
    )
    assert sorted(rows_of([sftp_server.read(k) for k in keys])) == sorted(
        batch_ids(emulator, dataset_id)
    )
    where = await emulator.control("GET", f"/runs/{run_id}")
    assert where["location"].startswith(
        f"sftp://{sftp_server.host}:{sftp_server.port}/ml/sftp-password/{dataset_id}/"
    )


async def test_sftp_export_with_an_ssh_key(emulator: Emulator, sftp_server: SftpServer) -> None:
    await use_servers(emulator, "sftp=connection")
    dataset_id, _, run = await export(
        emulator,
        StorageType.SFTP,
        sftp_auth(sftp_server, username=sftp_server.key_user, sshKey=sftp_server.private_key_b64),
        {"remotePath": "/ml/sftp-key"},
    )
    assert_landed(emulator, run, dataset_id, sftp_server.list("ml/sftp-key"), "ml/sftp-key/")


async def test_sftp_refused_password_fails_the_run(
    emulator: Emulator, sftp_server: SftpServer
) -> None:
    await use_servers(emulator, "sftp=connection")
    wrong = sftp_server.password + "-wrong"
    _, _, run = await export(
        emulator,
        StorageType.SFTP,
        sftp_auth(sftp_server, username=sftp_server.password_user, password=wrong),
        {"remotePath": "/ml/sftp-refused"},
    )
    assert_refused(run, "user 'exporter'", wrong)
    assert sftp_server.list("ml/sftp-refused") == {}


async def test_sftp_refused_key_fails_the_run(emulator: Emulator, sftp_server: SftpServer) -> None:
    import asyncssh

    stranger = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
    await use_servers(emulator, "sftp=connection")
    _, _, run = await export(
        emulator,
        StorageType.SFTP,
        sftp_auth(
            sftp_server,
            username=sftp_server.key_user,
            sshKey=base64.b64encode(stranger).decode(),
        ),
        {"remotePath": "/ml/sftp-key-refused"},
    )
    assert_refused(run, "user 'exporter-key'")
    assert sftp_server.list("ml/sftp-key-refused") == {}


# -- PGP/GPG encryption ---------------------------------------------------------------------


async def test_encrypted_export_decrypts_with_the_private_key(
    emulator: Emulator, s3_server: S3Server, keypair: Keypair
) -> None:
    await use_servers(emulator, f"s3={s3_server.endpoint}")
    dataset_id, _, run = await export(
        emulator,
        StorageType.S3,
        s3_auth(s3_server),
        {"bucketName": s3_server.bucket, "path": "ml/encrypted"},
        encryption={
            "specName": "File PGP/GPG Encryption",
            "params": {"encryptionAlgo": "PGPGPG", "publicKey": keypair.public_b64},
        },
    )
    listed = s3_server.list("ml/encrypted/")
    keys = assert_landed(emulator, run, dataset_id, listed, "ml/encrypted/")
    assert all(k.endswith(".gz.parquet.gpg") for k in keys), keys
    blobs = [s3_server.read(k) for k in keys]
    with pytest.raises(Exception, match=r"Parquet|magic"):
        rows_of(blobs[:1])  # not readable without the key
    plain = [keypair.decrypt(b) for b in blobs]
    assert sorted(rows_of(plain)) == sorted(batch_ids(emulator, dataset_id))


async def test_encrypted_export_to_a_local_folder(emulator: Emulator, keypair: Keypair) -> None:
    """Local folders (the default) are encrypted the same way, and keep no plain copy."""
    dataset_id, _, run = await export(
        emulator,
        StorageType.S3,
        {
            "specName": "Access Key",
            "params": {"s3AccessKey": "AKIAIOSFODNN7EXAMPLE", "s3SecretKey": "a" * 40},
        },
        {"bucketName": "local-bucket", "path": "ml/encrypted"},
        encryption={"params": {"encryptionAlgo": "PGPGPG", "publicKey": keypair.public_b64}},
    )
    assert status(run) == "success"
    files = destination_files(emulator)
    assert files
    assert all(f.name.endswith(".gpg") for f in files)
    assert run["metrics"]["sizeSummary"]["outputBytes"] == sum(f.stat().st_size for f in files)
    plain = [keypair.decrypt(f.read_bytes()) for f in files]
    assert sorted(rows_of(plain)) == sorted(batch_ids(emulator, dataset_id))


# -- what the connection specs take (issue 12, item 5) --------------------------------------


async def test_cloud_storage_specs_list_the_pgp_encryption_spec(emulator: Emulator) -> None:
    for storage in StorageType:
        answer = await emulator.fs(
            "GET", f"/connectionSpecs/{STORAGE_SPECS[storage].connection_spec_id}"
        )
        (spec,) = answer.body["items"]
        names = [e["name"] for e in spec["encryptionSpecs"]]
        if storage == StorageType.DLZ:
            assert names == []
            continue
        assert names == ["File PGP/GPG Encryption"]
        (encryption,) = spec["encryptionSpecs"]
        assert encryption["type"] == "FileAsymmetric"
        properties = encryption["spec"]["properties"]
        assert properties["encryptionAlgo"]["enum"] == ["PGPGPG", "NONE"]
        assert properties["publicKey"]["contentEncoding"] == "base64"
        assert encryption["spec"]["required"] == ["encryptionAlgo", "publicKey"]


async def base_answer(emulator: Emulator, storage: StorageType, **extra: Any) -> Any:
    ref = {"id": STORAGE_SPECS[storage].connection_spec_id, "version": "1.0"}
    return await emulator.fs(
        "POST", "/connections", json_body={"name": "b", "connectionSpec": ref, **extra}
    )


S3_KEYS = {
    "specName": "Access Key",
    "params": {"s3AccessKey": "AKIAIOSFODNN7EXAMPLE", "s3SecretKey": "a" * 40},
}


@pytest.mark.parametrize(
    ("encryption", "words"),
    [
        ({"params": {"encryptionAlgo": "AES", "publicKey": "eA=="}}, "encryptionAlgo"),
        ({"params": {"encryptionAlgo": "PGPGPG"}}, "publicKey"),
        ({"params": {"encryptionAlgo": "PGPGPG", "publicKey": "not base64!"}}, "not base64"),
        (
            {"params": {"encryptionAlgo": "PGPGPG", "publicKey": "c29tZSBieXRlcw=="}},
            "no OpenPGP public key",
        ),
        ({"specName": 7, "params": {}}, "specName"),
        ("PGPGPG", "params must be an object"),
    ],
)
async def test_bad_encryption_is_refused_with_a_reason(
    emulator: Emulator, encryption: Any, words: str
) -> None:
    answer = await base_answer(emulator, StorageType.S3, auth=S3_KEYS, encryption=encryption)
    assert answer.status == 400, answer.body
    assert words in answer.body["errorMessage"], answer.body


async def test_a_private_key_is_refused_as_the_public_key(
    emulator: Emulator, keypair: Keypair
) -> None:
    private = base64.b64encode(keypair.armored_private).decode()
    answer = await base_answer(
        emulator,
        StorageType.S3,
        auth=S3_KEYS,
        encryption={"params": {"encryptionAlgo": "PGPGPG", "publicKey": private}},
    )
    assert answer.status == 400
    assert "private key" in answer.body["errorMessage"]
    assert private[60:120] not in str(answer.body)


async def test_encryption_none_and_the_encryption_specs_spelling(
    emulator: Emulator, keypair: Keypair
) -> None:
    none = await base_answer(
        emulator,
        StorageType.S3,
        auth=S3_KEYS,
        encryption={"params": {"encryptionAlgo": "NONE", "publicKey": "eA=="}},
    )
    assert none.status == 201, none.body
    box = emulator.state.sandbox(emulator.knobs.org_id, "prod")
    assert none.body["id"] in box.connections
    assert none.body["id"] not in box.encryption_keys
    # Adobe's German page names the field `encryptionSpecs` (with specName "Encryption spec").
    spelled = await base_answer(
        emulator,
        StorageType.SFTP,
        auth={
            "specName": "SFTP with Password",
            "params": {"domain": "h", "username": "u", "password": "p"},
        },
        encryptionSpecs={
            "specName": "Encryption spec",
            "params": {"encryptionAlgo": "PGPGPG", "publicKey": keypair.public_b64},
        },
    )
    assert spelled.status == 201, spelled.body
    read = await emulator.fs("GET", f"/connections/{spelled.body['id']}")
    (entity,) = read.body["items"]
    assert entity["encryption"]["params"]["encryptionAlgo"] == "PGPGPG"
    both = await base_answer(
        emulator,
        StorageType.S3,
        auth=S3_KEYS,
        encryption={"params": {"encryptionAlgo": "NONE", "publicKey": "eA=="}},
        encryptionSpecs={"params": {"encryptionAlgo": "NONE", "publicKey": "eA=="}},
    )
    assert both.status == 400
    dlz = await base_answer(
        emulator,
        StorageType.DLZ,
        encryption={"params": {"encryptionAlgo": "PGPGPG", "publicKey": keypair.public_b64}},
    )
    assert dlz.status == 400
    assert "take no file encryption" in dlz.body["errorMessage"]


SFTP_PASSWORD = {"domain": "sftp.example.com", "username": "u", "password": "p"}


@pytest.mark.parametrize(
    ("port", "ok"),
    [
        ("22", True),
        (2222, True),
        (65_535, True),
        ("0", False),
        (0, False),
        ("65536", False),
        (70_000, False),
        ("ssh", False),
        (True, False),
    ],
)
async def test_sftp_port_is_checked(emulator: Emulator, port: Any, ok: bool) -> None:
    answer = await base_answer(
        emulator,
        StorageType.SFTP,
        auth={"specName": "SFTP with Password", "params": {**SFTP_PASSWORD, "port": port}},
    )
    assert (answer.status == 201) is ok, answer.body
    if not ok:
        assert "port" in answer.body["errorMessage"]


ADLS = {"servicePrincipalId": "sp", "servicePrincipalKey": "k", "tenant": "t"}


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://mllake.dfs.core.windows.net", True),
        ("abfss://features@mllake.dfs.core.windows.net", True),
        ("abfss://ml-features@mllake.dfs.core.windows.net/exports", True),
        ("abfss://mllake.dfs.core.windows.net", False),
        ("abfss://Features@mllake.dfs.core.windows.net", False),
        ("abfss://features@mllake.dfs.core.windows.net/../up", False),
    ],
)
async def test_adls_gen2_url_forms(emulator: Emulator, url: str, ok: bool) -> None:
    answer = await base_answer(
        emulator,
        StorageType.ADLS_GEN2,
        auth={"specName": "Azure Service Principal Auth", "params": {**ADLS, "url": url}},
    )
    assert (answer.status == 201) is ok, answer.body


async def test_abfss_exports_land_in_the_urls_container(emulator: Emulator) -> None:
    """ADLS Gen2 stays in local folders (no local dfs server); an abfss URL's container and
    folder name the local folder."""
    dataset_id, _, run = await export(
        emulator,
        StorageType.ADLS_GEN2,
        {
            "specName": "Azure Service Principal Auth",
            "params": {**ADLS, "url": "abfss://features@mllake.dfs.core.windows.net/lake"},
        },
        {"path": "daily"},
    )
    assert status(run) == "success"
    files = destination_files(emulator)
    assert files
    root = (
        emulator.data_dir
        / "destinations"
        / "adls_gen2"
        / "mllake"
        / "features"
        / "lake"
        / "daily"
        / dataset_id
    )
    assert all(f.is_relative_to(root) for f in files), files


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("adls_gen2=http://127.0.0.1:1", "no local server serves ADLS Gen2"),
        ("sftp=http://127.0.0.1:1", "sftp=connection"),
        ("s3=connection", "give its URL"),
        ("s3=ftp://127.0.0.1", "not an http(s) URL"),
        ("dlz=http://127.0.0.1:1", "stay local"),
        ("nfs=http://127.0.0.1:1", "kind must be one of"),
        ("s3", "KIND=URL"),
    ],
)
async def test_bad_storage_endpoints_are_refused(
    emulator: Emulator, entry: str, words: str
) -> None:
    async with emulator.session.patch(
        f"{emulator.url}/_emulator/config", json={"storage_endpoints": [entry]}
    ) as answer:
        body = await answer.text()
        assert answer.status == 400, body
    assert words in body
    assert emulator.knobs.storage_endpoints == []


async def test_an_assumed_role_cannot_be_written_to_a_server(emulator: Emulator) -> None:
    """No STS here: the trigger says so rather than failing later with a confusing error."""
    await use_servers(emulator, "s3=http://127.0.0.1:9")
    role = {"specName": "Assumed Role", "params": {"s3Role": "arn:aws:iam::123456789012:role/r"}}
    with pytest.raises(AssertionError, match="assumed role cannot be written"):
        await export(emulator, StorageType.S3, role, {"bucketName": "role-bucket", "path": "x"})


async def test_a_server_down_fails_the_run_with_a_write_error(emulator: Emulator) -> None:
    """Nothing listens there: the run fails (bounded by the connect deadline), as a write
    failure, not as refused credentials."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await use_servers(emulator, f"s3=http://127.0.0.1:{port}")
    _, _, run = await export(emulator, StorageType.S3, S3_KEYS, {"bucketName": "gone", "path": "x"})
    assert status(run) == "failed"
    (error,) = run["metrics"]["statusSummary"]["errors"]
    assert error["code"] == "CONNECTOR-1005-500"
    assert "Amazon S3" in error["message"]
    assert not destination_files(emulator)


def test_storage_endpoint_options_make_the_knob() -> None:
    import argparse

    from aep_emulator.cli import add_knob_options, knobs_from

    parser = argparse.ArgumentParser()
    add_knob_options(parser)
    args = parser.parse_args(
        ["--storage-endpoint", "s3=http://127.0.0.1:9000/", "--storage-endpoint", "sftp=connection"]
    )
    endpoints = {kind.value: url for kind, url in knobs_from(args).endpoints().items()}
    assert endpoints == {"s3": "http://127.0.0.1:9000", "sftp": "connection"}
    assert knobs_from(parser.parse_args([])).endpoints() == {}
