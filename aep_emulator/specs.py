"""Connection specs and flow specs served by the emulator.

Auth and target parameters are JSON Schemas, as in AEP's own connection specs; the emulator
validates create requests against them. Parameters marked `"format": "password"` are secrets:
stored, never echoed back.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aep_emulator.encryption import encryption_spec
from aep_emulator.facts import (
    DATALAKE_SOURCE_SPEC_ID,
    DATALAKE_SOURCE_SPEC_NAME,
    DESTINATION_PROVIDER_ID,
    SPEC_VERSION,
    STORAGE_SPECS,
    StorageSpec,
    StorageType,
)

_DRAFT = "http://json-schema.org/draft-07/schema#"
# The storages whose connection spec lists AEP's "File PGP/GPG Encryption" spec: the cloud
# storage destinations of Adobe's "Add encryption to exported files" section. The Data Landing
# Zone is Adobe's own container and takes no base connection parameters.
ENCRYPTING = frozenset(
    {
        StorageType.S3,
        StorageType.AZURE_BLOB,
        StorageType.ADLS_GEN2,
        StorageType.GCS,
        StorageType.SFTP,
    }
)
DATALAKE_PROVIDER_ID = "0ed90a81-07f4-4586-8190-b40eccef1c5a"

PATH_PATTERN = r"^[0-9a-zA-Z/!\-_.*'()]+$"
S3_BUCKET_PATTERN = r"^(?!\d+\.\d+\.\d+\.\d+$)(?!xn--)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
BLOB_CONTAINER_PATTERN = r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"
GCS_BUCKET_PATTERN = r"^(?!goog)(?!.*google)[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"


def _obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": _DRAFT,
        "type": "object",
        "properties": properties,
        "required": required,
    }


def _text(pattern: str | None = None, *, secret: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    if secret:
        schema["format"] = "password"
    return schema


# `port`: Adobe's SFTP examples send it as a string ("<Add port>"); a number is taken too.
# Range checked in connections.py (a schema cannot bound a numeric string).
_SFTP_BASE = {
    "domain": _text(r"^[A-Za-z0-9.-]+$"),
    "username": _text(),
    "port": {"type": ["integer", "string"], "pattern": r"^[0-9]{1,5}$", "minimum": 1},
}
# ADLS Gen2: the account URL, or the `abfss://<container>@<account>.dfs.core.windows.net`
# form Adobe's ADLS Gen2 destination page documents (a container, and maybe a folder).
ADLS_URL_PATTERN = (
    r"^(?!.*/\.\.(/|$))(https://[a-z0-9]{3,24}\.dfs\.core\.windows\.net/?"
    r"|abfss://[a-z0-9](?![a-z0-9-]*--)[a-z0-9-]{1,61}[a-z0-9]@[a-z0-9]{3,24}"
    r"\.dfs\.core\.windows\.net(/[0-9a-zA-Z/!\-_.*'()]*)?)$"
)

AUTH_SPECS: dict[StorageType, list[dict[str, Any]]] = {
    StorageType.S3: [
        {
            "name": "Access Key",
            "type": "KeyBased",
            "spec": _obj(
                {
                    "s3AccessKey": _text(r"^[A-Z2-7]{20}$"),
                    "s3SecretKey": _text(r"^[A-Za-z0-9/+]{40}$", secret=True),
                },
                ["s3AccessKey", "s3SecretKey"],
            ),
        },
        {
            "name": "Assumed Role",
            "type": "AssumedRole",
            "spec": _obj({"s3Role": _text(r"^arn:aws:iam::\d{12}:role/\S+$")}, ["s3Role"]),
        },
    ],
    StorageType.AZURE_BLOB: [
        {
            "name": "ConnectionString",
            "type": "ConnectionString",
            "spec": _obj(
                {"connectionString": _text(r"(^|;)AccountName=[^;]+", secret=True)},
                ["connectionString"],
            ),
        }
    ],
    StorageType.ADLS_GEN2: [
        {
            "name": "Azure Service Principal Auth",
            "type": "AzureServicePrincipal",
            "spec": _obj(
                {
                    "url": _text(ADLS_URL_PATTERN),
                    "servicePrincipalId": _text(),
                    "servicePrincipalKey": _text(secret=True),
                    "tenant": _text(),
                },
                ["url", "servicePrincipalId", "servicePrincipalKey", "tenant"],
            ),
        }
    ],
    StorageType.DLZ: [],
    StorageType.GCS: [
        {
            "name": "Google Cloud Storage authentication credentials",
            "type": "GoogleCloudStorageAuth",
            "spec": _obj(
                {
                    "accessKeyId": _text(),
                    # Google: an HMAC key's secret is a 40-character base64 string.
                    "secretAccessKey": _text(r"^[A-Za-z0-9/+]{40}$", secret=True),
                },
                ["accessKeyId", "secretAccessKey"],
            ),
        }
    ],
    StorageType.SFTP: [
        {
            "name": "SFTP with Password",
            "type": "SFTPPassword",
            "spec": _obj(
                {**_SFTP_BASE, "password": _text(secret=True)}, ["domain", "username", "password"]
            ),
        },
        {
            "name": "SFTP with SSH Key",
            "type": "SFTPSSHKey",
            "spec": _obj(
                {**_SFTP_BASE, "sshKey": _text(r"^[A-Za-z0-9+/=\s]+$", secret=True)},
                ["domain", "username", "sshKey"],
            ),
        },
    ],
}

_LOCATION: dict[StorageType, dict[str, Any]] = {
    StorageType.S3: {"bucketName": _text(S3_BUCKET_PATTERN), "path": _text(PATH_PATTERN)},
    StorageType.AZURE_BLOB: {
        "container": _text(BLOB_CONTAINER_PATTERN),
        "path": _text(PATH_PATTERN),
    },
    StorageType.ADLS_GEN2: {"path": _text(PATH_PATTERN)},
    StorageType.DLZ: {"path": _text(PATH_PATTERN)},
    StorageType.GCS: {"bucketName": _text(GCS_BUCKET_PATTERN), "path": _text(PATH_PATTERN)},
    StorageType.SFTP: {"remotePath": _text(PATH_PATTERN)},
}

_COMMON_TARGET = {
    "mode": {"type": "string", "enum": ["Server-to-server"]},
    "datasetFileType": {"type": "string", "enum": ["JSON", "PARQUET"]},
    "compression": {"type": "string", "enum": ["NONE", "GZIP"]},
}


@cache  # one object per storage: validators are cached by the schema's identity
def target_schema(storage: StorageType) -> dict[str, Any]:
    location = _LOCATION[storage]
    return _obj({**location, **_COMMON_TARGET}, [*location, "datasetFileType", "compression"])


def _connection_spec(spec: StorageSpec) -> dict[str, Any]:
    return {
        "id": spec.connection_spec_id,
        "name": spec.name,
        "providerId": DESTINATION_PROVIDER_ID,
        "version": SPEC_VERSION,
        "type": "destination",
        "attributes": {"category": "cloudStorage", "isDestination": True},
        "authSpec": AUTH_SPECS[spec.storage],
        "encryptionSpecs": [encryption_spec()] if spec.storage in ENCRYPTING else [],
        "targetSpec": {
            "name": "User based target",
            "type": "UserNamespace",
            "spec": target_schema(spec.storage),
        },
        "permissionsInfo": {"view": [], "manage": []},
    }


DATALAKE_SOURCE_SPEC: dict[str, Any] = {
    "id": DATALAKE_SOURCE_SPEC_ID,
    "name": DATALAKE_SOURCE_SPEC_NAME,
    "providerId": DATALAKE_PROVIDER_ID,
    "version": SPEC_VERSION,
    "type": "source",
    "attributes": {"category": "activation", "isSource": True},
    "authSpec": [],
    "sourceSpec": {
        "name": "Data lake datasets",
        "type": "DataLake",
        "spec": _obj(
            {
                "datasets": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {"dataSetId": _text(), "name": {"type": "string"}}, ["dataSetId"]
                    ),
                }
            },
            ["datasets"],
        ),
    },
}

CONNECTION_SPECS: dict[str, dict[str, Any]] = {
    DATALAKE_SOURCE_SPEC_ID: DATALAKE_SOURCE_SPEC,
    **{s.connection_spec_id: _connection_spec(s) for s in STORAGE_SPECS.values()},
}

FLOW_SPECS: dict[str, dict[str, Any]] = {
    s.dataset_flow_spec_id: {
        "id": s.dataset_flow_spec_id,
        "name": f"{s.name} dataset export",
        "providerId": DESTINATION_PROVIDER_ID,
        "version": SPEC_VERSION,
        "sourceConnectionSpecIds": [DATALAKE_SOURCE_SPEC_ID],
        "targetConnectionSpecIds": [s.connection_spec_id],
        "attributes": {"isDestinationFlow": True, "workflows": ["DATASETS"]},
        "scheduleSpec": {
            "name": "Dataset export schedule",
            "type": "Batch",
            "spec": {
                "type": "object",
                "properties": {
                    "exportMode": {
                        "type": "string",
                        "enum": ["DAILY_FULL_EXPORT", "FIRST_FULL_THEN_INCREMENTAL"],
                    },
                    "timeUnit": {"type": "string", "enum": ["hour", "day"]},
                    "interval": {"type": "integer", "enum": [0, 1, 3, 6, 9, 12]},
                    "startTime": {"type": "integer"},
                    "endTime": {"type": "integer"},
                },
                "required": ["timeUnit", "interval", "startTime"],
            },
        },
    }
    for s in STORAGE_SPECS.values()
}


def secret_params(storage: StorageType, spec_name: str) -> frozenset[str]:
    """Names of the auth parameters that are secrets for this auth spec."""
    for auth in AUTH_SPECS[storage]:
        if auth["name"] == spec_name:
            props: dict[str, dict[str, Any]] = auth["spec"]["properties"]
            return frozenset(k for k, v in props.items() if v.get("format") == "password")
    return frozenset()
