"""Destinations: validated before any call, secrets from files, never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from exporter.aep import StorageType
from exporter.destinations import Destination
from tests.workflow import AUTH

ADAPTER: TypeAdapter[Destination] = TypeAdapter(Destination)
SECRET = "s3cr3t-value-that-must-not-leak"


def make(**data: Any) -> Destination:
    return ADAPTER.validate_python(data)


def examples(secret_file: Path) -> dict[StorageType, dict[str, Any]]:
    return {
        StorageType.S3: {
            "type": "s3",
            "bucket": "ml-features",
            "access_key_id": "ABCDEFGHIJKLMNOPQRST",
            "secret_access_key_file": str(secret_file),
        },
        StorageType.AZURE_BLOB: {
            "type": "azure_blob",
            "container": "ml-features",
            "connection_string": f"AccountName=mlacct;AccountKey={SECRET}",
        },
        StorageType.ADLS_GEN2: {
            "type": "adls_gen2",
            "url": "https://mllake.dfs.core.windows.net",
            "service_principal_id": "sp",
            "tenant": "t",
            "service_principal_key_file": str(secret_file),
        },
        StorageType.DLZ: {"type": "dlz"},
        StorageType.GCS: {
            "type": "gcs",
            "bucket": "ml-features",
            "access_key_id": "GOOG1",
            "secret_access_key_file": str(secret_file),
        },
        StorageType.SFTP: {
            "type": "sftp",
            "host": "sftp.example.com",
            "username": "ml",
            "password_file": str(secret_file),
        },
    }


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.mark.parametrize("storage", list(StorageType))
def test_each_storage_builds_the_auth_aep_expects_and_hides_secrets(
    storage: StorageType, secret_file: Path
) -> None:
    dest = make(**examples(secret_file)[storage])
    assert dest.spec.storage == storage
    auth = dest.auth()
    expected = AUTH[storage]
    if expected is None:
        assert auth is None
    else:
        assert auth is not None
        assert auth["specName"] == expected["specName"]
        assert set(auth["params"]) == set(expected["params"])
        assert SECRET in str(auth["params"].values())
    assert SECRET not in repr(dest)
    assert SECRET not in str(dest.model_dump())
    assert SECRET not in dest.describe()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"type": "s3", "bucket": "ml-x"}, "either access_key_id"),
        (
            {"type": "s3", "bucket": "Bad_Bucket", "role_arn": "arn:aws:iam::123456789012:role/r"},
            "bucket",
        ),
        (
            {
                "type": "s3",
                "bucket": "ml-x",
                "access_key_id": "ABCDEFGHIJKLMNOPQRST",
                "role_arn": "arn:aws:iam::123456789012:role/r",
            },
            "either",
        ),
        ({"type": "sftp", "host": "h", "username": "u"}, "password"),
        (
            {"type": "azure_blob", "container": "ml-x", "connection_string": "AccountKey=k"},
            "AccountName",
        ),
        (
            {"type": "gcs", "bucket": "google-ml", "access_key_id": "a", "secret_access_key": "s"},
            "bucket",
        ),
        ({"type": "ftp"}, "type"),
        ({"type": "dlz", "bucket": "x"}, "Extra inputs"),
    ],
)
def test_invalid_destinations_are_refused_with_a_reason(data: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**data)
    assert words in str(caught.value)


def test_secret_files_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = {"type": "sftp", "host": "h.example.com", "username": "u"}
    with pytest.raises(ValidationError, match="is empty"):
        make(**base, password_file=str(empty))
    with pytest.raises(ValidationError, match="cannot read secret file"):
        make(**base, password_file=str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="not both"):
        make(**base, password="x", password_file=str(empty))


def test_role_auth_and_ssh_keys(secret_file: Path) -> None:
    role = make(type="s3", bucket="ml-x", role_arn="arn:aws:iam::123456789012:role/exporter")
    assert role.auth() == {
        "specName": "Assumed Role",
        "params": {"s3Role": "arn:aws:iam::123456789012:role/exporter"},
    }
    ssh = make(type="sftp", host="h.example.com", username="u", ssh_key_file=str(secret_file))
    auth = ssh.auth()
    assert auth is not None
    assert auth["specName"] == "SFTP with SSH Key"
    assert auth["params"]["sshKey"] == SECRET
