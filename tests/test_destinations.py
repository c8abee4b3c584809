"""Destinations: validated before any call, secrets from files, never shown."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from exporter.aep.facts import StorageType
from exporter.destinations import Destination
from exporter.settings import describe_errors
from tests.pgp_support import Keypair
from tests.workflow import AUTH

ADAPTER: TypeAdapter[Destination] = TypeAdapter(Destination)
# Valid for every storage, S3's 40-character secret access key included.
SECRET = "s3cr3t+value/that/must/not/leak/01234567"
PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
SSH_KEY = base64.b64encode(PEM.encode()).decode()


def make(**data: Any) -> Destination:
    return ADAPTER.validate_python(data)


def examples(secret_file: Path) -> dict[StorageType, dict[str, Any]]:
    return {
        StorageType.S3: {
            "type": "s3",
            "bucket": "ml-features",
            "access_key_id": "AKIAIOSFODNN7EXAMPLE",
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
                "access_key_id": "AKIAIOSFODNN7EXAMPLE",
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
    key_file = secret_file.with_name("ssh_key")
    key_file.write_text(SSH_KEY + "\n")
    ssh = make(type="sftp", host="h.example.com", username="u", ssh_key_file=str(key_file))
    auth = ssh.auth()
    assert auth is not None
    assert auth["specName"] == "SFTP with SSH Key"
    assert auth["params"]["sshKey"] == SSH_KEY


S3_BASE = {"type": "s3", "bucket": "ml-x"}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            {**S3_BASE, "access_key_id": "AKIA1234", "secret_access_key": SECRET},
            "access_key_id",
        ),
        (  # AWS key ids are AKIA (long-term) or ASIA (temporary), then 16 base32 characters
            {**S3_BASE, "access_key_id": "ABCDEFGHIJKLMNOPQRST", "secret_access_key": SECRET},
            "access_key_id",
        ),
        (  # one character too long: AEP would refuse it and echo it in its error
            {**S3_BASE, "access_key_id": "ASIAIOSFODNN7EXAMPLE", "secret_access_key": SECRET + "x"},
            "not an AWS secret access key: 40 characters",
        ),
        (
            {**S3_BASE, "access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_access_key": SECRET[:-1]},
            "not an AWS secret access key",
        ),
        (
            {
                **S3_BASE,
                "access_key_id": "AKIAIOSFODNN7EXAMPLE",
                "secret_access_key": SECRET[:-1] + "-",
            },
            "not an AWS secret access key",
        ),
        (
            {"type": "sftp", "host": "h", "username": "u", "ssh_key": PEM},
            "ssh_key is a PEM private key as-is: AEP expects it Base64-encoded",
        ),
        (
            {"type": "sftp", "host": "h", "username": "u", "ssh_key": "key: " + SECRET},
            "ssh_key is not Base64",
        ),
        (
            {
                "type": "sftp",
                "host": "h",
                "username": "u",
                "ssh_key": base64.b64encode(SECRET.encode()).decode(),
            },
            "not of a private key file",
        ),
    ],
)
def test_s3_keys_and_ssh_keys_are_checked_locally_without_echoing_them(
    data: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**data)
    text = describe_errors(caught.value, "destinations.x")  # what the CLI and reloads print
    assert words in text
    for secret in (SECRET, PEM, PEM.replace("-", ""), "b3BlbnNzaC1rZXkt"):
        assert secret[:-1] not in text


def test_a_base64_ssh_key_with_line_breaks_is_accepted() -> None:
    wrapped = "\n".join(SSH_KEY[i : i + 64] for i in range(0, len(SSH_KEY), 64))
    ssh = make(type="sftp", host="h.example.com", username="u", ssh_key=wrapped)
    auth = ssh.auth()
    assert auth is not None
    assert auth["params"]["sshKey"] == wrapped


# -- issue 12: SFTP port, abfss URLs, `/` as the folder path, PGP/GPG encryption --------------

SFTP_BASE = {"type": "sftp", "host": "sftp.example.com", "username": "u", "password": SECRET}
ADLS_BASE = {
    "type": "adls_gen2",
    "service_principal_id": "sp",
    "service_principal_key": SECRET,
    "tenant": "t",
}


def test_sftp_port_goes_into_the_base_connection() -> None:
    dest = make(**SFTP_BASE, port=2222)
    auth = dest.auth()
    assert auth is not None
    assert auth["params"]["port"] == "2222"
    assert dest.describe() == "sftp://u@sftp.example.com:2222"
    plain = make(**SFTP_BASE).auth()
    assert plain is not None
    assert "port" not in plain["params"]  # unset: AEP's default


@pytest.mark.parametrize("port", [0, 65_536, -22, "ssh"])
def test_sftp_port_out_of_range_is_refused(port: Any) -> None:
    with pytest.raises(ValidationError, match="port"):
        make(**SFTP_BASE, port=port)


@pytest.mark.parametrize(
    "url",
    [
        "https://mllake.dfs.core.windows.net",
        "abfss://features@mllake.dfs.core.windows.net",
        "abfss://features@mllake.dfs.core.windows.net/",
        "abfss://ml-features@mllake.dfs.core.windows.net/exports/daily",
    ],
)
def test_adls_gen2_takes_the_account_url_and_the_abfss_form(url: str) -> None:
    dest = make(**ADLS_BASE, url=url)
    auth = dest.auth()
    assert auth is not None
    assert auth["params"]["url"] == url


@pytest.mark.parametrize(
    "url",
    [
        "abfss://mllake.dfs.core.windows.net",  # no container
        "abfss://@mllake.dfs.core.windows.net",
        "abfss://Features@mllake.dfs.core.windows.net",  # container names are lowercase
        "abfss://ml--features@mllake.dfs.core.windows.net",
        "abfs://features@mllake.dfs.core.windows.net",  # not TLS
        "abfss://features@mllake.blob.core.windows.net",  # the Blob endpoint, not dfs
        "abfss://features@mllake.dfs.core.windows.net/../up",
    ],
)
def test_adls_gen2_refuses_malformed_abfss_urls(url: str) -> None:
    with pytest.raises(ValidationError, match="url"):
        make(**ADLS_BASE, url=url)


def test_pgp_public_key_armored_base64_or_file_gives_the_same_encryption(
    keypair: Keypair, tmp_path: Path
) -> None:
    key_file = tmp_path / "exports.asc"
    key_file.write_bytes(keypair.armored)
    armored = make(**SFTP_BASE, pgp_public_key=keypair.armored.decode())
    encoded = make(**SFTP_BASE, pgp_public_key=keypair.public_b64)
    from_file = make(**SFTP_BASE, pgp_public_key_file=str(key_file))
    expected = {
        "specName": "File PGP/GPG Encryption",
        "params": {"encryptionAlgo": "PGPGPG", "publicKey": keypair.public_b64},
    }
    assert armored.encryption() == encoded.encryption() == from_file.encryption() == expected
    assert make(**SFTP_BASE).encryption() is None
    key_text = base64.b64encode(keypair.armored).decode()
    for dest in (armored, encoded, from_file):
        assert keypair.armored.decode()[40:120] not in repr(dest)
        assert key_text[40:120] not in repr(dest)
        assert key_text[40:120] not in dest.describe()


def test_a_binary_public_key_file_is_taken(keypair: Keypair, tmp_path: Path) -> None:
    key_file = tmp_path / "exports.gpg"
    key_file.write_bytes(keypair.binary)
    dest = make(**SFTP_BASE, pgp_public_key_file=str(key_file))
    encryption = dest.encryption()
    assert encryption is not None
    assert base64.b64decode(encryption["params"]["publicKey"]) == keypair.binary


def test_the_pgp_key_changes_the_destination_identity(keypair: Keypair) -> None:
    """A new key needs a new base connection (AEP holds the key it was made with)."""
    plain = make(**SFTP_BASE).identity(b"k")
    encrypted = make(**SFTP_BASE, pgp_public_key=keypair.public_b64).identity(b"k")
    assert plain != encrypted
    assert make(**SFTP_BASE).identity(b"k") == plain


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("not base64 at all!", "neither an armored OpenPGP public key nor its base64"),
        (base64.b64encode(b"just some bytes").decode(), "not an OpenPGP public key"),
    ],
)
def test_bad_pgp_public_keys_are_refused_with_a_reason(key: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**SFTP_BASE, pgp_public_key=key)
    assert words in describe_errors(caught.value, "destinations.x")


def test_a_private_key_is_refused_without_being_echoed(keypair: Keypair) -> None:
    with pytest.raises(ValidationError) as caught:
        make(**SFTP_BASE, pgp_public_key=keypair.armored_private.decode())
    text = describe_errors(caught.value, "destinations.x")
    assert "is a private key: give the public key only" in text
    body = keypair.armored_private.decode().splitlines()[3]
    assert body[:40] not in text


def test_pgp_key_and_key_file_together_are_refused(keypair: Keypair, tmp_path: Path) -> None:
    key_file = tmp_path / "k.asc"
    key_file.write_bytes(keypair.armored)
    with pytest.raises(ValidationError, match="not both"):
        make(**SFTP_BASE, pgp_public_key=keypair.public_b64, pgp_public_key_file=str(key_file))
    with pytest.raises(ValidationError, match="cannot read pgp_public_key_file"):
        make(**SFTP_BASE, pgp_public_key_file=str(tmp_path / "missing.asc"))


def test_the_landing_zone_takes_no_encryption(keypair: Keypair) -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        make(type="dlz", pgp_public_key=keypair.public_b64)
