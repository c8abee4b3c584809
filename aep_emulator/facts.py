"""What the emulator knows of Adobe Experience Platform: paths, ids, media types, phrases.

The emulator's own copy, taken from Adobe's documentation and OpenAPI files (docs/aep-notes.md
lists the sources), not imported from the client's `exporter.aep.facts`: a stand-in that shared
the client's constants would agree with a client that misread Adobe's wording, and the tests
between them would pass. Change a value here only from Adobe's pages, never to match the client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FLOW_SERVICE_PATH = "/data/foundation/flowservice"
ADHOC_PATH = "/data/core/activation/disflowprovider/adhocrun"
LANDING_ZONE_PATH = "/data/foundation/connectors/landingzone"
QUERY_SERVICE_PATH = "/data/foundation/query"
IMS_TOKEN_PATH = "/ims/token/v3"  # noqa: S105 - a URL path, not a secret

DATALAKE_SOURCE_SPEC_ID = "23598e46-f560-407b-88d5-ea6207e49db0"
DATALAKE_SOURCE_SPEC_NAME = "activation-datalake"
DESTINATION_PROVIDER_ID = "14e34fac-d307-11e9-bb65-2a2ae2dbcce4"
SPEC_VERSION = "1.0"

ADHOC_DATASET_ACCEPT = "application/vnd.adobe.adhoc.dataset.activation+json; version=1"
NOT_READY_PHRASE = "Following order ID(s) are not ready for dataset export"
NOT_READY_MESSAGE = f"Invalid parameter: {NOT_READY_PHRASE}, please wait for 10 minutes and retry."
NOT_ENABLED_PHRASE = "Adhoc run can not be executed for Flow spec"
ALREADY_RUNNING_PHRASE = "Run already going on for dataset"


class StorageType(enum.StrEnum):
    S3 = "s3"
    AZURE_BLOB = "azure_blob"
    ADLS_GEN2 = "adls_gen2"
    DLZ = "dlz"
    GCS = "gcs"
    SFTP = "sftp"


@dataclass(frozen=True, slots=True)
class StorageSpec:
    """A destination kind: its connection spec, dataset flow spec and where the path goes."""

    storage: StorageType
    name: str
    connection_spec_id: str
    dataset_flow_spec_id: str
    path_param: str  # SFTP names its folder `remotePath`, the others `path`


STORAGE_SPECS: dict[StorageType, StorageSpec] = {
    s.storage: s
    for s in (
        StorageSpec(
            StorageType.S3,
            "Amazon S3",
            "4fce964d-3f37-408f-9778-e597338a21ee",
            "269ba276-16fc-47db-92b0-c1049a3c131f",
            "path",
        ),
        StorageSpec(
            StorageType.AZURE_BLOB,
            "Azure Blob Storage",
            "6d6b59bf-fb58-4107-9064-4d246c0e5bb2",
            "95bd8965-fc8a-4119-b9c3-944c2c2df6d2",
            "path",
        ),
        StorageSpec(
            StorageType.ADLS_GEN2,
            "Azure Data Lake Gen2",
            "be2c3209-53bc-47e7-ab25-145db8b873e1",
            "17be2013-2549-41ce-96e7-a70363bec293",
            "path",
        ),
        StorageSpec(
            StorageType.DLZ,
            "Data Landing Zone",
            "10440537-2a7b-4583-ac39-ed38d4b848e8",
            "cd2fc47e-e838-4f38-a581-8fff2f99b63a",
            "path",
        ),
        StorageSpec(
            StorageType.GCS,
            "Google Cloud Storage",
            "c5d93acb-ea8b-4b14-8f53-02138444ae99",
            "585c15c4-6cbf-4126-8f87-e26bff78b657",
            "path",
        ),
        StorageSpec(
            StorageType.SFTP,
            "SFTP",
            "36965a81-b1c6-401b-99f8-22508f1e6a26",
            "354d6aad-4754-46e4-a576-1b384561c440",
            "remotePath",
        ),
    )
}

SPEC_BY_CONNECTION_ID = {s.connection_spec_id: s for s in STORAGE_SPECS.values()}
SPEC_BY_FLOW_SPEC_ID = {s.dataset_flow_spec_id: s for s in STORAGE_SPECS.values()}


class FileType(enum.StrEnum):
    PARQUET = "PARQUET"
    JSON = "JSON"


class Compression(enum.StrEnum):
    NONE = "NONE"
    GZIP = "GZIP"
