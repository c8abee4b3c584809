"""The storage-server fixtures themselves: each stores, lists and reads back through its own
protocol, and refuses credentials it does not know (the emulator's tests rely on both)."""

from __future__ import annotations

import base64

import asyncssh
import obstore
import pytest
from obstore.exceptions import BaseError

from tests.storage_servers import AzuriteBlob, GcsServer, S3Server, SftpServer


def test_s3_stores_lists_and_reads_back(s3_server: S3Server) -> None:
    obstore.put(s3_server.store(), "smoke/a.bin", b"abc")
    assert s3_server.list("smoke/") == {"smoke/a.bin": 3}
    assert s3_server.read("smoke/a.bin") == b"abc"


def test_s3_refuses_a_wrong_secret(s3_server: S3Server) -> None:
    wrong = s3_server.store(secret_access_key=s3_server.secret_key[::-1])
    with pytest.raises(BaseError, match=r"403|SignatureDoesNotMatch"):
        obstore.put(wrong, "smoke/refused.bin", b"x")
    assert "smoke/refused.bin" not in s3_server.list("smoke/")


def test_azurite_stores_lists_and_reads_back(azurite_blob: AzuriteBlob) -> None:
    assert "BlobEndpoint=http://127.0.0.1:" in azurite_blob.connection_string
    obstore.put(azurite_blob.store(), "smoke/a.bin", b"abcd")
    assert azurite_blob.list("smoke/") == {"smoke/a.bin": 4}
    assert azurite_blob.read("smoke/a.bin") == b"abcd"


def test_azurite_refuses_a_wrong_key(azurite_blob: AzuriteBlob) -> None:
    wrong_key = base64.b64encode(b"\x00" * 32).decode()
    with pytest.raises(BaseError, match=r"403|AuthorizationFailure|authenticate"):
        obstore.put(azurite_blob.store(account_key=wrong_key), "smoke/refused.bin", b"x")
    assert "smoke/refused.bin" not in azurite_blob.list("smoke/")


def test_gcs_takes_an_s3_style_put_and_lists_it_through_the_json_api(
    gcs_server: GcsServer,
) -> None:
    obstore.put(gcs_server.s3_store(), "smoke/x/exportTime=202401010000/part-0.parquet", b"xyz")
    assert gcs_server.list("smoke/x/") == {"smoke/x/exportTime=202401010000/part-0.parquet": 3}
    assert gcs_server.read("smoke/x/exportTime=202401010000/part-0.parquet") == b"xyz"


def test_sftp_lists_and_reads_back_what_a_key_user_wrote(sftp_server: SftpServer) -> None:
    key = asyncssh.import_private_key(base64.b64decode(sftp_server.private_key_b64))

    async def write() -> None:
        async with (
            asyncssh.connect(
                sftp_server.host,
                sftp_server.port,
                username=sftp_server.key_user,
                client_keys=[key],
                known_hosts=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.makedirs("smoke/deep", exist_ok=True)
            async with sftp.open("smoke/deep/a.bin", "wb") as handle:
                await handle.write(b"abcdef")

    sftp_server.call(write())
    assert sftp_server.list("smoke") == {"smoke/deep/a.bin": 6}
    assert sftp_server.read("smoke/deep/a.bin") == b"abcdef"


def test_sftp_refuses_a_wrong_password(sftp_server: SftpServer) -> None:
    async def connect() -> None:
        async with asyncssh.connect(
            sftp_server.host,
            sftp_server.port,
            username=sftp_server.password_user,
            password=sftp_server.password + "x",
            known_hosts=None,
            client_keys=None,
        ):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        sftp_server.call(connect())
