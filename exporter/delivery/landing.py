"""Where an export lands: the storage URI of the run's export folder.

AEP's run metrics say how many files, records and bytes a run wrote, never where
(docs/aep-notes.md#where-an-export-lands). The folder is derived the way AEP lays it out:
`<target path>/<datasetId>/exportTime=YYYYMMDDHHMM/`, the time being the run's `createdAt`
in UTC, under the storage the destination names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from exporter.destinations import (
    AdlsGen2Destination,
    AzureBlobDestination,
    Destination,
    DlzDestination,
    GcsDestination,
    S3Destination,
    SftpDestination,
)

DLZ_CONTAINER = "dlz-destination"
DLZ_RETENTION_DAYS = 7
SFTP_PORT = 22
URI_SAFE = "/=!*'()"  # what a job's path and AEP's folder names may hold, kept as-is
_AZURE_PART = re.compile(r"(?:^|;)(AccountName|BlobEndpoint|EndpointSuffix)=([^;]+)")
_TEMPLATE_KEYS = ("foldernameTemplate", "folderNameTemplate")


@dataclass(frozen=True, slots=True)
class Landing:
    """The export folder: its URI, its key prefix inside the store's root (bucket,
    container, SFTP login folder; ends with `/`), and the storage's retention if any."""

    uri: str
    prefix: str
    retention_days: int | None = None
    container: str | None = None
    """ADLS Gen2: the file system (the path's first segment while the URL names none)."""


def export_folder(path: str, dataset_id: str, created_at_ms: int) -> str:
    """`<path>/<datasetId>/exportTime=YYYYMMDDHHMM/`: AEP's default folder layout, the run's
    creation time in UTC to the minute. `path` is the target connection's folder path."""
    when = datetime.fromtimestamp(created_at_ms / 1000, UTC)
    parts = [p for p in path.strip("/").split("/") if p]
    return "/".join([*parts, dataset_id, f"exportTime={when:%Y%m%d%H%M}"]) + "/"


def azure_parts(connection_string: str) -> dict[str, str]:
    """AccountName, BlobEndpoint and EndpointSuffix of a connection string (no keys)."""
    return {m.group(1): m.group(2) for m in _AZURE_PART.finditer(connection_string)}


def blob_base(connection_string: str) -> str:
    """The Blob service's base URL: the connection string's BlobEndpoint (Azurite, sovereign
    clouds) or `https://<account>.blob.<suffix>`."""
    parts = azure_parts(connection_string)
    if "BlobEndpoint" in parts:
        return parts["BlobEndpoint"].rstrip("/")
    suffix = parts.get("EndpointSuffix", "core.windows.net")
    return f"https://{parts['AccountName']}.blob.{suffix}"


def landing(
    destination: Destination,
    path: str,
    dataset_id: str,
    created_at_ms: int,
    *,
    schedule: Mapping[str, object] | None = None,
    dlz_account: str | None = None,
) -> Landing | None:
    """The run's export folder, or None where it cannot be known: a flow with a folder
    template (its macros may name things only AEP knows), or a landing zone whose storage
    account is unknown."""
    if schedule and any(schedule.get(k) for k in _TEMPLATE_KEYS):
        return None
    prefix = export_folder(path, dataset_id, created_at_ms)
    quoted = quote(prefix, safe=URI_SAFE)
    match destination:
        case S3Destination():
            return Landing(f"s3://{destination.bucket}/{quoted}", prefix)
        case GcsDestination():
            return Landing(f"gs://{destination.bucket}/{quoted}", prefix)
        case AzureBlobDestination():
            base = blob_base(destination.connection_string.get_secret_value())
            return Landing(f"{base}/{destination.container}/{quoted}", prefix)
        case AdlsGen2Destination():
            url = destination.url
            if url.startswith("abfss://"):
                # abfss://<file system>@<account>.dfs.core.windows.net[/<folder>]
                authority, _, url_folder = url.removeprefix("abfss://").partition("/")
                filesystem, _, host = authority.partition("@")
                account = host.split(".", 1)[0]
                key = "/".join(p for p in (url_folder.strip("/"), prefix) if p)
                return Landing(
                    f"abfss://{filesystem}@{account}.dfs.core.windows.net/"
                    f"{quote(key, safe=URI_SAFE)}",
                    key,
                    container=filesystem,
                )
            # The URL names the account; the folder path's first segment is the file system.
            account = url.removeprefix("https://").split(".", 1)[0]
            filesystem, _, rest = prefix.partition("/")
            return Landing(
                f"abfss://{filesystem}@{account}.dfs.core.windows.net/{quote(rest, safe=URI_SAFE)}",
                rest,
                container=filesystem,
            )
        case SftpDestination():
            port = getattr(destination, "port", None) or SFTP_PORT
            return Landing(f"sftp://{destination.host}:{port}/{quoted}", prefix)
        case DlzDestination():
            if dlz_account is None:
                return None
            return Landing(
                f"https://{dlz_account}.blob.core.windows.net/{DLZ_CONTAINER}/{quoted}",
                prefix,
                retention_days=DLZ_RETENTION_DAYS,
                container=DLZ_CONTAINER,
            )
    return None
