"""Request bodies for the Flow Service entities, shared by the emulator's tests."""

from __future__ import annotations

from typing import Any

from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, STORAGE_SPECS, StorageType
from exporter.clock import FakeClock

START = int(FakeClock().time())  # where the emulator fixture's clock starts

S3_KEYS = {"s3AccessKey": "ABCDEFGHIJKLMNOPQRST", "s3SecretKey": "a" * 40}

AUTH: dict[StorageType, dict[str, Any] | None] = {
    StorageType.S3: {"specName": "Access Key", "params": S3_KEYS},
    StorageType.AZURE_BLOB: {
        "specName": "ConnectionString",
        "params": {
            "connectionString": "DefaultEndpointsProtocol=https;AccountName=mlacct;"
            "AccountKey=c2VjcmV0;EndpointSuffix=core.windows.net"
        },
    },
    StorageType.ADLS_GEN2: {
        "specName": "Azure Service Principal Auth",
        "params": {
            "url": "https://mllake.dfs.core.windows.net",
            "servicePrincipalId": "sp",
            "servicePrincipalKey": "key",
            "tenant": "tenant",
        },
    },
    StorageType.DLZ: None,
    StorageType.GCS: {
        "specName": "Google Cloud Storage authentication credentials",
        "params": {
            "accessKeyId": "GOOG1EXAMPLE",
            "secretAccessKey": "bGm+EXAMPLE/0123456789abcdefghijklmnopqr",
        },
    },
    StorageType.SFTP: {
        "specName": "SFTP with Password",
        "params": {"domain": "sftp.example.com", "username": "ml", "password": "pw"},
    },
}

LOCATION: dict[StorageType, dict[str, str]] = {
    StorageType.S3: {"bucketName": "ml-features", "path": "exports/daily"},
    StorageType.AZURE_BLOB: {"container": "ml-features", "path": "exports/daily"},
    StorageType.ADLS_GEN2: {"path": "exports/daily"},
    StorageType.DLZ: {"path": "exports/daily"},
    StorageType.GCS: {"bucketName": "ml-features", "path": "exports/daily"},
    StorageType.SFTP: {"remotePath": "exports/daily"},
}


def spec_ref(storage: StorageType) -> dict[str, str]:
    return {"id": STORAGE_SPECS[storage].connection_spec_id, "version": "1.0"}


def base_connection(storage: StorageType, name: str = "base") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "connectionSpec": spec_ref(storage)}
    if AUTH[storage] is not None:
        body["auth"] = AUTH[storage]
    return body


def source_connection(dataset_id: str, name: str = "source") -> dict[str, Any]:
    return {
        "name": name,
        "connectionSpec": {"id": DATALAKE_SOURCE_SPEC_ID, "version": "1.0"},
        "params": {"datasets": [{"dataSetId": dataset_id, "name": "features"}]},
    }


def target_connection(
    storage: StorageType,
    base_id: str,
    *,
    file_type: str = "PARQUET",
    compression: str = "GZIP",
    name: str = "target",
) -> dict[str, Any]:
    return {
        "name": name,
        "baseConnectionId": base_id,
        "connectionSpec": spec_ref(storage),
        "params": {
            "mode": "Server-to-server",
            **LOCATION[storage],
            "datasetFileType": file_type,
            "compression": compression,
        },
    }


def flow(
    storage: StorageType,
    source_id: str,
    target_id: str,
    *,
    name: str = "flow",
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "flowSpec": {"id": STORAGE_SPECS[storage].dataset_flow_spec_id, "version": "1.0"},
        "sourceConnectionIds": [source_id],
        "targetConnectionIds": [target_id],
        "transformations": [],
        "scheduleParams": schedule
        or {
            "exportMode": "DAILY_FULL_EXPORT",
            "timeUnit": "day",
            "interval": 0,
            "startTime": START,
        },
    }
