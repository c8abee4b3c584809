"""Reading an export folder back through the storage's own protocol.

One small interface, `Store`: list a folder (names and sizes), read a byte range, write a
small file. Back-ends: a local folder (the emulator's default destinations), obstore for the
object stores (S3, Azure Blob and ADLS Gen2, GCS through its S3-compatible XML API with the
HMAC keys AEP's GCS destination takes), asyncssh for SFTP. docs/design.md ("Delivery
verification") says why obstore rather than the fsspec family. Each store counts the
requests it makes, which the outcome and the benchmark report. obstore and asyncssh are
imported where used: they come with the `[delivery]` extra, not with the runtime.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from exporter.delivery.config import EXTRA_HINT, VerifySettings
from exporter.delivery.landing import Landing, azure_parts, blob_base
from exporter.destinations import (
    AdlsGen2Destination,
    AzureBlobDestination,
    Destination,
    DlzDestination,
    GcsDestination,
    S3Destination,
    SftpDestination,
)
from exporter.errors import ConfigError, ExporterError
from exporter.net import is_loopback
from exporter.redaction import SECRETS

GCS_XML_ENDPOINT = "https://storage.googleapis.com"


class StoreError(ExporterError):
    """The store could not be read or written (network, credentials, permissions)."""


def _why(exc: BaseException) -> str:
    """An error's kind and first line, scrubbed of every known secret (a client's error may
    quote a URL with its SAS), at most 300 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = SECRETS.scrub(text)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Entry:
    """One file in the export folder: its name (relative to the folder) and size."""

    name: str
    size: int


class Store(Protocol):
    """A storage's root (bucket, container, SFTP folder), read through its protocol."""

    requests: int

    async def list(self, prefix: str) -> list[Entry]:
        """The files directly under `prefix` (a folder key ending with `/`); none if absent."""
        ...

    async def read(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file `key`."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Write the file `key` whole."""
        ...

    async def aclose(self) -> None: ...


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"delivery verification needs the {module} package, which is not installed: "
            f"{EXTRA_HINT}"
        )


class LocalStore:
    """A folder standing for the storage's root: what the emulator writes by default."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests = 0

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StoreError(f"{key!r} leaves the store's root")
        return path

    async def list(self, prefix: str) -> list[Entry]:
        self.requests += 1
        folder = self._path(prefix)

        def scan() -> list[Entry]:
            if not folder.is_dir():
                return []
            return [
                Entry(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()
            ]

        try:
            return await asyncio.to_thread(scan)
        except OSError as exc:
            raise StoreError(f"listing {prefix!r} failed: {_why(exc)}") from None

    async def read(self, key: str, start: int, end: int) -> bytes:
        self.requests += 1
        path = self._path(key)

        def chunk() -> bytes:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(end - start)

        try:
            return await asyncio.to_thread(chunk)
        except OSError as exc:
            raise StoreError(f"reading {key!r} failed: {_why(exc)}") from None

    async def put(self, key: str, data: bytes) -> None:
        self.requests += 1
        path = self._path(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)  # an empty export has no folder
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise StoreError(f"writing {key!r} failed: {_why(exc)}") from None

    async def aclose(self) -> None:
        return None


class ObjectStore:
    """S3, Azure Blob/ADLS Gen2 and GCS through obstore (listing with sizes, ranged gets)."""

    def __init__(self, store: Any, prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix
        self.requests = 0

    async def list(self, prefix: str) -> list[Entry]:
        import obstore

        full = self._prefix + prefix
        listed = 0
        entries: list[Entry] = []
        try:
            async for page in obstore.list(self._store, prefix=full, chunk_size=1000):
                for meta in page:
                    listed += 1
                    name = str(meta["path"]).removeprefix(full)
                    if name and "/" not in name:
                        entries.append(Entry(name, int(meta["size"])))
        except Exception as exc:
            raise StoreError(f"listing {full!r} failed: {_why(exc)}") from None
        # A listing answers up to 1,000 keys a request (S3's ListObjectsV2, Azure's List Blobs).
        self.requests += max(1, -(-listed // 1000))
        return sorted(entries, key=lambda e: e.name)

    async def read(self, key: str, start: int, end: int) -> bytes:
        import obstore

        self.requests += 1
        try:
            data = await obstore.get_range_async(
                self._store, self._prefix + key, start=start, end=end
            )
        except Exception as exc:
            raise StoreError(f"reading {key!r} failed: {_why(exc)}") from None
        return bytes(data)

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        self.requests += 1
        try:
            await obstore.put_async(self._store, self._prefix + key, data)
        except Exception as exc:
            raise StoreError(f"writing {key!r} failed: {_why(exc)}") from None

    async def aclose(self) -> None:
        return None


class SftpStore:
    """An SFTP server's login folder, through asyncssh."""

    def __init__(self, connect: dict[str, Any], timeout_s: float = 30.0) -> None:
        self._connect = {"connect_timeout": timeout_s, **connect}
        self._timeout_s = timeout_s
        self._conn: Any = None
        self._sftp: Any = None
        self.requests = 0

    @property
    def connect_options(self) -> dict[str, Any]:
        """What `asyncssh.connect` is given, but the password and keys (for a reader)."""
        return {k: v for k, v in self._connect.items() if k not in ("password", "client_keys")}

    async def _client(self) -> Any:
        if self._sftp is None:
            import asyncssh

            try:
                async with asyncio.timeout(self._timeout_s):
                    self._conn = await asyncssh.connect(**self._connect)
                    self._sftp = await self._conn.start_sftp_client()
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise StoreError(f"SFTP connection failed: {_why(exc)}") from None
        return self._sftp

    async def list(self, prefix: str) -> list[Entry]:
        import asyncssh

        sftp = await self._client()
        self.requests += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                names = await sftp.readdir(prefix.rstrip("/") or ".")
        except asyncssh.SFTPNoSuchFile:
            return []
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise StoreError(f"listing {prefix!r} failed: {_why(exc)}") from None
        return sorted(
            (
                Entry(n.filename, int(n.attrs.size or 0))
                for n in names
                if n.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR
            ),
            key=lambda e: e.name,
        )

    async def read(self, key: str, start: int, end: int) -> bytes:
        import asyncssh

        sftp = await self._client()
        self.requests += 1
        try:
            async with asyncio.timeout(self._timeout_s), sftp.open(key, "rb") as f:
                await f.seek(start)
                data: bytes = await f.read(end - start)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise StoreError(f"reading {key!r} failed: {_why(exc)}") from None
        return data

    async def put(self, key: str, data: bytes) -> None:
        import asyncssh

        sftp = await self._client()
        self.requests += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                folder = key.rsplit("/", 1)[0] if "/" in key else ""
                if folder:
                    await sftp.makedirs(folder, exist_ok=True)  # an empty export has no folder
                async with sftp.open(key, "wb") as f:
                    await f.write(data)
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise StoreError(f"writing {key!r} failed: {_why(exc)}") from None

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = self._sftp = None


def check_available(destination: Destination) -> None:
    """Raise ConfigError naming the extra when verification is configured without it."""
    verify = destination.verify
    if verify is None or verify.store == "local":
        return
    _need("asyncssh" if isinstance(destination, SftpDestination) else "obstore")


def _client_options(endpoint: str | None, verify: VerifySettings) -> dict[str, Any]:
    """Time-outs on every request; plain HTTP only to a loopback endpoint."""
    options: dict[str, Any] = {
        "timeout": timedelta(seconds=verify.timeout_s),
        "connect_timeout": timedelta(seconds=min(verify.timeout_s, 10.0)),
    }
    if endpoint is not None and is_loopback(urlsplit(endpoint).hostname):
        options["allow_http"] = True
    return options


def _retry(verify: VerifySettings) -> dict[str, Any]:
    return {
        "max_retries": verify.attempts - 1,
        "retry_timeout": timedelta(seconds=verify.timeout_s * verify.attempts),
        "backoff": {
            "init_backoff": timedelta(milliseconds=200),
            "max_backoff": timedelta(seconds=5),
        },
    }


def open_store(
    destination: Destination, place: Landing, *, dlz_sas: dict[str, str] | None = None
) -> Store:
    """The store to read `place` through, with the `verify` section's read credentials or
    else the destination's own. Raises ConfigError when the extra is missing or nothing
    to read with is configured."""
    verify = destination.verify
    assert verify is not None
    if verify.store == "local":
        assert verify.root is not None
        return LocalStore(verify.root)
    check_available(destination)
    if isinstance(destination, SftpDestination):
        return SftpStore(_sftp_connect(destination, verify), verify.timeout_s)
    from obstore import store as obstores

    # obstore's stubs type the options as TypedDicts; here they are built from settings.
    S3Store: Any = obstores.S3Store
    AzureStore: Any = obstores.AzureStore

    options = _client_options(verify.endpoint, verify)
    retry = _retry(verify)
    if isinstance(destination, S3Destination | GcsDestination):
        key_id = verify.access_key_id or destination.access_key_id
        secret = verify.secret_access_key or destination.secret_access_key
        if key_id is None or secret is None:
            raise ConfigError(
                "verify: an S3 destination with role_arn needs verify.access_key_id and "
                "verify.secret_access_key to read the export back"
            )
        default = GCS_XML_ENDPOINT if isinstance(destination, GcsDestination) else None
        endpoint = verify.endpoint or default
        s3 = S3Store(
            destination.bucket,
            access_key_id=key_id,
            secret_access_key=secret.get_secret_value(),
            region=verify.region,
            client_options=options,
            retry_config=retry,
            **({"endpoint": endpoint, "virtual_hosted_style_request": False} if endpoint else {}),
        )
        return ObjectStore(s3)
    if isinstance(destination, AzureBlobDestination):
        text = destination.connection_string.get_secret_value()
        parts = azure_parts(text)
        key = verify.account_key.get_secret_value() if verify.account_key else _account_key(text)
        azure = AzureStore(
            destination.container,
            account_name=parts["AccountName"],
            endpoint=verify.endpoint or blob_base(text),
            client_options=_client_options(verify.endpoint or blob_base(text), verify),
            retry_config=retry,
            **_azure_auth(key, verify),
        )
        return ObjectStore(azure)
    if isinstance(destination, AdlsGen2Destination):
        account = destination.url.removeprefix("https://").split(".", 1)[0]
        if verify.account_key is None and verify.sas_token is None:
            raise ConfigError(
                "verify: an ADLS Gen2 destination needs verify.account_key or verify.sas_token "
                "(the service principal AEP writes with is not used for reading)"
            )
        key = verify.account_key.get_secret_value() if verify.account_key else None
        adls = AzureStore(
            place.container,
            account_name=account,
            client_options=options,
            retry_config=retry,
            **({"endpoint": verify.endpoint} if verify.endpoint else {}),
            **_azure_auth(key, verify),
        )
        return ObjectStore(adls)
    if isinstance(destination, DlzDestination):
        if dlz_sas is None:
            raise ConfigError("verify: the landing zone's credentials could not be read")
        endpoint = (
            verify.endpoint or f"https://{dlz_sas['storageAccountName']}.blob.core.windows.net"
        )
        dlz = AzureStore(
            dlz_sas["containerName"],
            account_name=dlz_sas["storageAccountName"],
            sas_key=dlz_sas["SASToken"],
            endpoint=endpoint,
            client_options=_client_options(endpoint, verify),
            retry_config=retry,
        )
        return ObjectStore(dlz)
    raise ConfigError(f"verify: no reader for {destination.describe()}")


def _account_key(connection_string: str) -> str | None:
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name == "AccountKey":
            return value
    return None


def _azure_auth(account_key: str | None, verify: VerifySettings) -> dict[str, Any]:
    if verify.sas_token is not None:
        return {"sas_key": verify.sas_token.get_secret_value()}
    if account_key is not None:
        return {"account_key": account_key}
    raise ConfigError("verify: give verify.account_key or verify.sas_token to read Azure")


def _sftp_connect(destination: SftpDestination, verify: VerifySettings) -> dict[str, Any]:
    import asyncssh

    connect: dict[str, Any] = {
        "host": destination.host,
        "port": verify.port or getattr(destination, "port", None) or 22,
        "username": verify.username or destination.username,
    }
    # The server's key is checked, as TLS checks a certificate: against `known_hosts`, else
    # the daemon user's ~/.ssh/known_hosts (asyncssh's default). Only a server on this
    # machine (a test server) goes unchecked without a file.
    if verify.known_hosts is not None:
        connect["known_hosts"] = str(verify.known_hosts)
    elif is_loopback(destination.host):
        connect["known_hosts"] = None
    if verify.password is not None or verify.ssh_key is not None:
        password, key = verify.password, verify.ssh_key
        key_text = key.get_secret_value() if key else None
    else:
        password, key = destination.password, destination.ssh_key
        # The destination's key is Base64 of the key file (what AEP takes).
        key_text = base64.b64decode(key.get_secret_value()).decode() if key else None
    if password is not None:
        connect["password"] = password.get_secret_value()
        connect["client_keys"] = None
    if key_text is not None:
        connect["client_keys"] = [asyncssh.import_private_key(key_text)]
    return connect
