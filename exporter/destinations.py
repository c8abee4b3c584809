"""Named destinations: where exports land, and the credentials AEP uses to write there.

A destination is declared once in config; jobs refer to it by name and never carry
secrets. Secret values come from a file (`*_file`, the way systemd credentials and
container secrets arrive) or the environment, and are held as `SecretStr` so they print
as `**********`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from exporter.aep.facts import STORAGE_SPECS, StorageSpec, StorageType
from exporter.delivery.config import VerifySettings
from exporter.redaction import Secret

S3_BUCKET = r"^(?!\d+\.\d+\.\d+\.\d+$)(?!xn--)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
BLOB_CONTAINER = r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"
GCS_BUCKET = r"^(?!goog)(?!.*google)[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"
# AWS access key ids: AKIA (long-term) or ASIA (temporary, from STS), then 16 characters of
# the base32 alphabet; AEP's S3 spec takes 20 of those (docs/aep-notes.md). Secret access
# keys are 40 characters of base64's alphabet.
S3_ACCESS_KEY_ID = r"^A[KS]IA[A-Z2-7]{16}$"
S3_SECRET_KEY = re.compile(r"[A-Za-z0-9/+]{40}")
# ADLS Gen2: the account URL, or the `abfss://<container>@<account>.dfs.core.windows.net`
# form of Adobe's ADLS Gen2 destination page, with a container (and maybe a folder).
ADLS_URL = (
    r"^(?!.*/\.\.(/|$))(https://[a-z0-9]{3,24}\.dfs\.core\.windows\.net/?"
    r"|abfss://[a-z0-9](?![a-z0-9-]*--)[a-z0-9-]{1,61}[a-z0-9]@[a-z0-9]{3,24}"
    r"\.dfs\.core\.windows\.net(/[0-9a-zA-Z/!\-_.*'()]*)?)$"
)
# AEP's file encryption spec ("File PGP/GPG Encryption", docs/aep-notes.md#destination-options).
ENCRYPTION_SPEC_NAME = "File PGP/GPG Encryption"
_ARMORED_PUBLIC = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"


def read_secret(path: Path) -> SecretStr:
    """A secret from a file; surrounding whitespace (a trailing newline) is not part of it."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(value)


def _holds_secret(annotation: Any) -> bool:
    """Whether a field's type is `SecretStr`, plain, `Annotated` (`Secret`) or optional."""
    return annotation is SecretStr or any(_holds_secret(a) for a in get_args(annotation))


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")

    verify: VerifySettings | None = None
    """Opt-in delivery verification and completion signals (exporter/delivery/); not part
    of the storage's identity, so changing it makes no new connections."""

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """`<name>_file = "/path"` fills the secret field `<name>` from that file."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            if not key.endswith("_file"):
                continue
            name = key.removesuffix("_file")
            if name not in cls.model_fields or name not in cls._secret_fields():
                continue
            if data.get(name) is not None:
                raise ValueError(f"give either {name} or {key}, not both")
            out[name] = read_secret(Path(str(value)))
            del out[key]
        return out

    @model_validator(mode="after")
    def _verify_reader(self) -> _Base:
        if self.verify is not None:
            self.verify.require_reader(getattr(self, "type"))  # noqa: B009
        return self

    @classmethod
    def _secret_fields(cls) -> set[str]:
        return {n for n, f in cls.model_fields.items() if _holds_secret(f.annotation)}

    @property
    def spec(self) -> StorageSpec:
        return STORAGE_SPECS[StorageType(getattr(self, "type"))]  # noqa: B009

    def auth(self) -> dict[str, Any] | None:
        """The base connection's `auth` body, secrets revealed: only for the request."""
        raise NotImplementedError

    def location(self) -> dict[str, str]:
        """Target connection parameters other than path, format and compression."""
        return {}

    def encryption(self) -> dict[str, Any] | None:
        """The base connection's `encryption` body (PGP/GPG file encryption), or None."""
        return None

    def identity(self, key: bytes) -> str:
        """What tells this storage from another — its type, bucket, container, host, account
        and credentials — as a keyed hash (HMAC-SHA256 under `key`, the AEP client secret):
        an edited destination, rotated keys included, gets new connections and lanes, and
        the names AEP shows reveal nothing of the credentials."""
        content = {"type": getattr(self, "type"), "location": self.location(), "auth": self.auth()}  # noqa: B009
        if self.encryption() is not None:  # only then: unencrypted identities stay as they were
            content["encryption"] = self.encryption()
        text = json.dumps(content, sort_keys=True).encode()
        return hmac.new(key, text, hashlib.sha256).hexdigest()[:16]

    def describe(self) -> str:
        return self.spec.name


def pgp_public_key_problem(key: bytes) -> str | None:
    """Why `key` (the decoded bytes) is not an OpenPGP public key AEP can encrypt to, or
    None. Never quotes the key."""
    text = key.lstrip()
    if b"PRIVATE KEY BLOCK" in text:
        return "pgp_public_key is a private key: give the public key only"
    if text.startswith(_ARMORED_PUBLIC):
        return None
    # A binary key starts with a public-key packet: tag 6, old format (0x98-0x9b) or new (0xc6).
    if text and (text[0] in (0x98, 0x99, 0x9A, 0x9B, 0xC6)):
        return None
    return (
        "pgp_public_key is not an OpenPGP public key (an armored "
        "'-----BEGIN PGP PUBLIC KEY BLOCK-----' or a binary key, as `gpg --export` writes)"
    )


class _Encrypting(_Base):
    """A cloud storage destination that can have its files PGP/GPG-encrypted: AEP's base
    connection `encryption` with the public key, base64-encoded as AEP takes it."""

    pgp_public_key: str | None = Field(default=None, repr=False)
    pgp_public_key_file: Path | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _pgp_key(self) -> _Encrypting:
        if self.pgp_public_key is not None and self.pgp_public_key_file is not None:
            raise ValueError("give either pgp_public_key or pgp_public_key_file, not both")
        key = self._pgp_key_bytes()
        if key is not None:
            problem = pgp_public_key_problem(key)
            if problem:
                raise ValueError(problem)
        return self

    def _pgp_key_bytes(self) -> bytes | None:
        if self.pgp_public_key_file is not None:
            try:
                return self.pgp_public_key_file.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"cannot read pgp_public_key_file {self.pgp_public_key_file}: {exc.strerror}"
                ) from None
        if self.pgp_public_key is None:
            return None
        text = self.pgp_public_key
        if text.lstrip().startswith("-----BEGIN PGP"):  # armored: kept as given
            return text.encode()
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "pgp_public_key is neither an armored OpenPGP public key nor its base64"
            ) from None

    def encryption(self) -> dict[str, Any] | None:
        key = self._pgp_key_bytes()
        if key is None:
            return None
        return {
            "specName": ENCRYPTION_SPEC_NAME,
            "params": {"encryptionAlgo": "PGPGPG", "publicKey": base64.b64encode(key).decode()},
        }


class S3Destination(_Encrypting):
    type: Literal["s3"]
    bucket: Annotated[str, Field(pattern=S3_BUCKET)]
    access_key_id: Annotated[str, Field(pattern=S3_ACCESS_KEY_ID)] | None = None
    secret_access_key: Secret | None = None
    role_arn: Annotated[str, Field(pattern=r"^arn:aws:iam::\d{12}:role/\S+$")] | None = None

    @model_validator(mode="after")
    def _one_auth(self) -> S3Destination:
        keys = self.access_key_id is not None or self.secret_access_key is not None
        if keys == (self.role_arn is not None):
            raise ValueError("give either access_key_id with secret_access_key(_file), or role_arn")
        if keys and (self.access_key_id is None or self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if self.secret_access_key is not None and not S3_SECRET_KEY.fullmatch(
            self.secret_access_key.get_secret_value()
        ):
            # AEP refuses it and echoes it in the error; the value is never named here.
            raise ValueError(
                "secret_access_key is not an AWS secret access key: 40 characters of "
                "A-Z, a-z, 0-9, / and +"
            )
        return self

    def auth(self) -> dict[str, Any]:
        if self.role_arn is not None:
            return {"specName": "Assumed Role", "params": {"s3Role": self.role_arn}}
        assert self.secret_access_key is not None
        return {
            "specName": "Access Key",
            "params": {
                "s3AccessKey": self.access_key_id,
                "s3SecretKey": self.secret_access_key.get_secret_value(),
            },
        }

    def location(self) -> dict[str, str]:
        return {"bucketName": self.bucket}

    def describe(self) -> str:
        return f"s3://{self.bucket}"


class AzureBlobDestination(_Encrypting):
    type: Literal["azure_blob"]
    container: Annotated[str, Field(pattern=BLOB_CONTAINER)]
    connection_string: Secret

    @model_validator(mode="after")
    def _account(self) -> AzureBlobDestination:
        if not re.search(r"(^|;)AccountName=[^;]+", self.connection_string.get_secret_value()):
            raise ValueError("connection_string must contain AccountName=…")
        return self

    def auth(self) -> dict[str, Any]:
        return {
            "specName": "ConnectionString",
            "params": {"connectionString": self.connection_string.get_secret_value()},
        }

    def location(self) -> dict[str, str]:
        return {"container": self.container}

    def describe(self) -> str:
        return f"Azure Blob container {self.container}"


class AdlsGen2Destination(_Encrypting):
    type: Literal["adls_gen2"]
    url: Annotated[str, Field(pattern=ADLS_URL)]
    service_principal_id: str = Field(min_length=1)
    service_principal_key: Secret
    tenant: str = Field(min_length=1)

    def auth(self) -> dict[str, Any]:
        return {
            "specName": "Azure Service Principal Auth",
            "params": {
                "url": self.url,
                "servicePrincipalId": self.service_principal_id,
                "servicePrincipalKey": self.service_principal_key.get_secret_value(),
                "tenant": self.tenant,
            },
        }

    def describe(self) -> str:
        return self.url


class DlzDestination(_Base):
    type: Literal["dlz"]

    def auth(self) -> None:
        return None

    def describe(self) -> str:
        return "Data Landing Zone"


class GcsDestination(_Encrypting):
    type: Literal["gcs"]
    bucket: Annotated[str, Field(pattern=GCS_BUCKET)]
    access_key_id: str = Field(min_length=1)
    secret_access_key: Secret

    def auth(self) -> dict[str, Any]:
        return {
            "specName": "Google Cloud Storage authentication credentials",
            "params": {
                "accessKeyId": self.access_key_id,
                "secretAccessKey": self.secret_access_key.get_secret_value(),
            },
        }

    def location(self) -> dict[str, str]:
        return {"bucketName": self.bucket}

    def describe(self) -> str:
        return f"gs://{self.bucket}"


def ssh_key_problem(value: str) -> str | None:
    """Why `value` is not what AEP takes as an SFTP key — the OpenSSH/PEM private key file,
    Base64-encoded (docs/aep-notes.md) — or None. Never quotes the value."""
    if "-----BEGIN" in value:
        return (
            "ssh_key is a PEM private key as-is: AEP expects it Base64-encoded "
            "(e.g. `base64 -w0 id_ed25519`)"
        )
    try:
        decoded = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return "ssh_key is not Base64: AEP expects the private key file Base64-encoded"
    if not re.match(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", decoded.lstrip()):
        return (
            "ssh_key is Base64 but not of a private key file (one that starts with "
            "-----BEGIN ... PRIVATE KEY-----)"
        )
    return None


class SftpDestination(_Encrypting):
    type: Literal["sftp"]
    host: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+$")]
    # The SFTP base connection's `port` (Adobe's API pages; unset: AEP's default, 22).
    port: int | None = Field(default=None, ge=1, le=65_535)
    username: str = Field(min_length=1)
    password: Secret | None = None
    ssh_key: Secret | None = None

    @model_validator(mode="after")
    def _one_auth(self) -> SftpDestination:
        if (self.password is None) == (self.ssh_key is None):
            raise ValueError("give either password(_file) or ssh_key(_file)")
        if self.ssh_key is not None:
            problem = ssh_key_problem(self.ssh_key.get_secret_value())
            if problem:
                raise ValueError(problem)
        return self

    def auth(self) -> dict[str, Any]:
        base: dict[str, Any] = {"domain": self.host, "username": self.username}
        if self.port is not None:
            base["port"] = str(self.port)  # a string in Adobe's examples ("<Add port>")
        if self.password is not None:
            return {
                "specName": "SFTP with Password",
                "params": {**base, "password": self.password.get_secret_value()},
            }
        assert self.ssh_key is not None
        return {
            "specName": "SFTP with SSH Key",
            "params": {**base, "sshKey": self.ssh_key.get_secret_value()},
        }

    def describe(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"sftp://{self.username}@{self.host}{port}"


Destination = Annotated[
    S3Destination
    | AzureBlobDestination
    | AdlsGen2Destination
    | DlzDestination
    | GcsDestination
    | SftpDestination,
    Field(discriminator="type"),
]


def unknown_destination(name: str, configured: Iterable[str]) -> str:
    """Why a job naming `name` cannot run: the one wording every check (a job document, a
    schedule, the engine) gives, with the names that are configured."""
    return f"unknown destination {name!r}; configured: {', '.join(sorted(configured)) or 'none'}"
