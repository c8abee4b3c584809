"""Where a run's files land: local folders by default, or a storage server over its protocol.

AEP's S3, GCS and ADLS Gen2 connections name no endpoint (AEP writes to the cloud), so the
emulator writes to a server only when its `storage_endpoints` knob maps the storage kind to one
(`s3=http://127.0.0.1:9000`); Azure Blob may instead use the connection string's
`BlobEndpoint=` (`azure_blob=connection`), and SFTP the connection's own `domain` and `port`
(`sftp=connection`). Without a mapping, files go to local folders as before.
docs/aep-notes.md#exports-to-storage-servers says what each local server leaves untested.

Files are written with the credentials of the base connection, as AEP writes them: a server
that refuses them fails the run. S3, Azure Blob and GCS go through obstore (GCS through its
S3-interoperable XML API with the HMAC keys, which is how AEP's GCS destination
authenticates); SFTP through asyncssh.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from aep_emulator.facts import StorageType

# How long one run may spend writing its files to a server before it fails.
UPLOAD_DEADLINE_S = 300.0
CONNECT_DEADLINE_S = 30.0

# The storage kinds the knob can map, and what each accepts.
URL_KINDS = frozenset({StorageType.S3, StorageType.GCS, StorageType.AZURE_BLOB})
CONNECTION_KINDS = frozenset({StorageType.AZURE_BLOB, StorageType.SFTP})
FROM_CONNECTION = "connection"
_URL_RE = re.compile(r"^https?://[^/\s]+(/[^\s]*)?$")


class DestinationError(Exception):
    """Writing to the destination failed; `refused` when the server turned the credentials
    down. The message names the storage and the server's reason, never a secret."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


def parse_endpoints(entries: Sequence[str]) -> dict[StorageType, str]:
    """`KIND=URL` (or `KIND=connection`) entries, checked. Raises ValueError saying which entry
    is wrong and why."""
    found: dict[StorageType, str] = {}
    for entry in entries:
        kind_text, sep, value = entry.partition("=")
        kind_text, value = kind_text.strip().lower(), value.strip()
        if not sep or not value:
            raise ValueError(f"storage endpoint {entry!r} is not KIND=URL")
        try:
            kind = StorageType(kind_text)
        except ValueError:
            kinds = ", ".join(sorted(k.value for k in URL_KINDS | CONNECTION_KINDS))
            raise ValueError(f"storage endpoint {entry!r}: kind must be one of {kinds}") from None
        if kind == StorageType.ADLS_GEN2:
            raise ValueError(
                "storage endpoint for adls_gen2: no local server serves ADLS Gen2's dfs API "
                "(Azurite serves Blob only); ADLS Gen2 exports stay in local folders"
            )
        if kind not in URL_KINDS | CONNECTION_KINDS:
            raise ValueError(f"storage endpoint {entry!r}: {kind.value} exports stay local")
        if kind in found:
            raise ValueError(f"storage endpoint for {kind.value} is given twice")
        if value == FROM_CONNECTION:
            if kind not in CONNECTION_KINDS:
                raise ValueError(
                    f"storage endpoint {entry!r}: {kind.value} connections name no server; "
                    "give its URL"
                )
        elif kind not in URL_KINDS:
            raise ValueError(
                f"storage endpoint {entry!r}: {kind.value} writes to the connection's own "
                f"server: use {kind.value}={FROM_CONNECTION}"
            )
        elif not _URL_RE.match(value):
            raise ValueError(f"storage endpoint {entry!r}: {value!r} is not an http(s) URL")
        found[kind] = value.rstrip("/")
    return found


@dataclass(frozen=True)
class Remote:
    """A run's destination on a storage server: how to reach it and the folder to write."""

    kind: StorageType
    uri: str  # where the export folder is, as a URI (s3://bucket/folder/, sftp://host:port/…)
    folder: str  # the export folder's key or path on the server, without a trailing `/`
    options: dict[str, Any]

    def upload(self, files: Sequence[Path]) -> tuple[str, ...]:
        """Write `files` into the folder; return their keys or paths there. Raises
        DestinationError (a refused credential, an unreachable server, a deadline)."""
        if self.kind == StorageType.SFTP:
            return _sftp_upload(self, files)
        return _object_upload(self, files)


def connection_string_parts(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.split(";") if "=" in p)


def remote_for(
    endpoints: dict[StorageType, str],
    storage: StorageType,
    params: dict[str, Any],
    secret: dict[str, Any],
    folder: str,
) -> Remote | None:
    """The server a run of this target writes to, or None for a local folder. `folder` is the
    export folder below the target's path (the rendered folder template)."""
    mapped = endpoints.get(storage)
    if mapped is None:
        return None
    base = str(params.get("remotePath", params.get("path", ""))).strip("/")
    key = f"{base}/{folder}" if base else folder
    if storage in (StorageType.S3, StorageType.GCS):
        bucket = params["bucketName"]
        if storage == StorageType.S3 and "s3AccessKey" not in secret:
            raise DestinationError(
                "Amazon S3 connections with an assumed role cannot be written to a server by "
                "the emulator (no STS): use Access Key auth, or no s3 storage endpoint"
            )
        if storage == StorageType.S3:
            access, secret_key, region = secret["s3AccessKey"], secret["s3SecretKey"], "us-east-1"
        else:
            access, secret_key, region = secret["accessKeyId"], secret["secretAccessKey"], "auto"
        scheme = "s3" if storage == StorageType.S3 else "gs"
        return Remote(
            storage,
            f"{scheme}://{bucket}/{key}/",
            key,
            {
                "bucket": bucket,
                "endpoint": mapped,
                "access_key_id": access,
                "secret_access_key": secret_key,
                "region": region,
            },
        )
    if storage == StorageType.AZURE_BLOB:
        parts = connection_string_parts(secret["connectionString"])
        account, container = parts["AccountName"], params["container"]
        if not parts.get("AccountKey"):
            raise DestinationError(
                "the emulator writes to Azure Blob servers with an AccountKey only: this "
                "connection string has none"
            )
        if mapped == FROM_CONNECTION:
            endpoint = parts.get("BlobEndpoint", "").rstrip("/")
            if not endpoint:
                raise DestinationError(
                    "the Azure Blob connection string has no BlobEndpoint to write to"
                )
        else:
            endpoint = f"{mapped}/{account}"  # Azurite's path-style URLs
        return Remote(
            storage,
            f"https://{account}.blob.core.windows.net/{container}/{key}/",
            key,
            {
                "container": container,
                "endpoint": endpoint,
                "account_name": account,
                "account_key": parts["AccountKey"],
            },
        )
    if storage == StorageType.SFTP:
        raw = str(params.get("remotePath", ""))
        path = ("/" if raw.startswith("/") else "") + key
        host, port = secret["domain"], int(secret.get("port", 22))
        return Remote(
            storage,
            f"sftp://{host}:{port}{path if path.startswith('/') else '/' + path}/",
            path,
            {
                "host": host,
                "port": port,
                "username": secret["username"],
                "password": secret.get("password"),
                "ssh_key": secret.get("sshKey"),
            },
        )
    return None


# -- object stores (obstore) ----------------------------------------------------------------


def _object_store(remote: Remote) -> Any:
    from obstore.store import AzureStore, S3Store

    o = remote.options
    client = {"allow_http": True, "connect_timeout": f"{CONNECT_DEADLINE_S:g}s"}
    # One try: a refused credential or an unreachable server is the run's answer, not a
    # reason to spend minutes retrying inside a worker thread.
    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=UPLOAD_DEADLINE_S)}
    if remote.kind == StorageType.AZURE_BLOB:
        return AzureStore(
            o["container"],
            config=cast(
                Any,
                {
                    "account_name": o["account_name"],
                    "account_key": o["account_key"],
                    "endpoint": o["endpoint"],
                },
            ),
            client_options=cast(Any, client),
            retry_config=cast(Any, retry),
        )
    return S3Store(
        o["bucket"],
        config=cast(
            Any,
            {
                "endpoint": o["endpoint"],
                "access_key_id": o["access_key_id"],
                "secret_access_key": o["secret_access_key"],
                "region": o["region"],
                "virtual_hosted_style_request": False,
            },
        ),
        client_options=cast(Any, client),
        retry_config=cast(Any, retry),
    )


def _object_upload(remote: Remote, files: Sequence[Path]) -> tuple[str, ...]:
    import obstore
    from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

    try:
        store = _object_store(remote)
    except (BaseError, ValueError) as exc:
        raise DestinationError(f"{_name(remote)}: {_first_line(exc)}") from None
    keys = []
    for path in files:
        key = f"{remote.folder}/{path.name}"
        try:
            obstore.put(store, key, path)
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise _refused(remote, exc) from None
        except BaseError as exc:
            if re.search(r"\b(401|403)\b", str(exc)):
                raise _refused(remote, exc) from None
            raise DestinationError(f"{_name(remote)}: {_first_line(exc)}") from None
        keys.append(key)
    return tuple(keys)


# -- SFTP (asyncssh) ------------------------------------------------------------------------


def _sftp_upload(remote: Remote, files: Sequence[Path]) -> tuple[str, ...]:
    """Runs in the run's worker thread, on an event loop of its own."""
    return asyncio.run(_sftp_upload_async(remote, files))


async def _sftp_upload_async(remote: Remote, files: Sequence[Path]) -> tuple[str, ...]:
    import asyncssh

    o = remote.options
    keys: list[Any] = []
    if o["ssh_key"]:
        try:
            keys = [asyncssh.import_private_key(base64.b64decode(o["ssh_key"], validate=True))]
        except (binascii.Error, ValueError, asyncssh.KeyImportError):
            raise DestinationError(
                "SFTP: the connection's sshKey is not a base64-encoded private key", refused=True
            ) from None
    try:
        async with asyncio.timeout(UPLOAD_DEADLINE_S):
            async with (
                asyncssh.connect(
                    o["host"],
                    o["port"],
                    username=o["username"],
                    password=o["password"],
                    # Only what the connection holds: no ~/.ssh keys or config, no agent.
                    client_keys=keys or None,
                    preferred_auth="publickey" if keys else "password,keyboard-interactive",
                    config=None,
                    agent_path=None,
                    # AEP's SFTP connection carries no host key to check against.
                    known_hosts=None,
                    connect_timeout=CONNECT_DEADLINE_S,
                ) as conn,
                conn.start_sftp_client() as sftp,
            ):
                await sftp.makedirs(remote.folder, exist_ok=True)
                written = []
                for path in files:
                    target = f"{remote.folder}/{path.name}"
                    await sftp.put(str(path), target)
                    written.append(target)
                return tuple(written)
    except asyncssh.PermissionDenied:
        raise DestinationError(
            f"SFTP: {o['host']}:{o['port']} refused the credentials of user {o['username']!r}",
            refused=True,
        ) from None
    except TimeoutError:
        raise DestinationError(
            f"SFTP: {o['host']}:{o['port']} did not take the files within {UPLOAD_DEADLINE_S:g} s"
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise DestinationError(f"SFTP: {o['host']}:{o['port']}: {_first_line(exc)}") from None


# -- messages ---------------------------------------------------------------------------------


def _name(remote: Remote) -> str:
    return {
        StorageType.S3: "Amazon S3",
        StorageType.GCS: "Google Cloud Storage",
        StorageType.AZURE_BLOB: "Azure Blob Storage",
    }.get(remote.kind, remote.kind.value)


def _refused(remote: Remote, exc: BaseException) -> DestinationError:
    text = str(exc)
    status = re.search(r"\b(401|403)\b", text)
    code = re.search(r"<Code>([A-Za-z0-9]{1,100})</Code>", text)  # S3's and Azure's error code
    found = [m.group(1) for m in (status, code) if m]
    detail = f" ({' '.join(found)})" if found else ""
    return DestinationError(
        f"{_name(remote)} refused the base connection's credentials{detail}", refused=True
    )


def _first_line(exc: BaseException) -> str:
    return _clip(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
