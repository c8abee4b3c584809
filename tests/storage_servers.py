"""Real storage servers on loopback for the tests: S3, Azure Blob, GCS and SFTP.

Each fixture starts its server once per test session on 127.0.0.1, on a port the system picks
at run time, and yields what a test needs: the endpoint, credentials that the server checks,
and helpers that list and read objects *through the server* (never from the emulator's memory
or the server's own files). tests/conftest.py loads this module with `pytest_plugins`, so a
test only names the fixture.

Fixtures (names are stable: other branches reuse them):

- `s3_server` -> `S3Server`: moto's S3 server (`moto[server]`, ThreadedMotoServer) with
  request signatures checked. `access_key` / `secret_key` are an IAM user's keys in the forms
  AEP's Amazon S3 connection spec accepts; `bucket` exists. `store(bucket)` is an obstore
  `S3Store`; `make_bucket(name)` adds one.
- `azurite_blob` -> `AzuriteBlob`: Azurite's Blob service (npm `azurite`, run with node from
  `.tools/node_modules`, `make tools` installs it) with its own account name and key.
  `connection_string` carries `BlobEndpoint=`, as AEP's Azure Blob connection does;
  `container` exists; `make_container(name)` adds one. Azurite serves no `dfs` (ADLS Gen2)
  endpoint: docs/aep-notes.md says what that leaves untested.
- `gcs_server` -> `GcsServer`: `gcp-storage-emulator`: the JSON API, and of the XML API only
  `PUT /bucket/object` (answered with an ETag by this fixture, as Google does). It checks no
  credentials at all; `hmac_access_id` / `hmac_secret` are only in the shape AEP's GCS
  connection spec asks for. `s3_store()` writes as AEP does (S3-style, HMAC keys); `list` and
  `read` go through the JSON API, since neither obstore's `GCSStore` nor an `S3Store` can list
  here (both list with the XML API's `list-type=2`). `bucket` exists; `make_bucket(name)`.
- `sftp_server` -> `SftpServer`: an asyncssh SFTP server in its own thread and event loop,
  chrooted to a temporary folder, with a password user (`password_user`, `password`) and a
  key user (`key_user`; `private_key_b64` is the OpenSSH private key, base64-encoded as AEP's
  `sshKey` parameter is). Other users and wrong secrets are refused.

Every store fixture has `list(prefix) -> dict[str, int]` (object key -> size) and
`read(key) -> bytes`, keys relative to its default bucket or container (`list_in` / `read_in`
take another). Starting and every helper call have deadlines (`START_DEADLINE_S`,
`CALL_DEADLINE_S`); a server that does not come up fails the test with its own output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

START_DEADLINE_S = 30.0
CALL_DEADLINE_S = 15.0
REPO = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
MOTO_ACCOUNT = "123456789012"  # moto's default account

T = TypeVar("T")


def _aep_s3_key() -> tuple[str, str]:
    """An access key id and secret in the forms AEP's S3 auth spec checks
    (`^[A-Z2-7]{20}$`, 40 characters of `[A-Za-z0-9/+]`)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    return key_id, secret


# -- S3 (moto) ------------------------------------------------------------------------------


@dataclass
class S3Server:
    """moto's S3 server: `endpoint` (http://127.0.0.1:PORT), an IAM user's keys, a bucket."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def store(self, bucket: str | None = None, **overrides: Any) -> Any:
        from obstore.store import S3Store

        config: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "virtual_hosted_style_request": False,
            **overrides,
        }
        return S3Store(
            bucket or self.bucket, config=cast(Any, config), client_options={"allow_http": True}
        )

    def make_bucket(self, name: str) -> None:
        self._boto().create_bucket(Bucket=name)

    def _boto(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def list(self, prefix: str = "") -> dict[str, int]:
        return self.list_in(self.bucket, prefix)

    def list_in(self, bucket: str, prefix: str = "") -> dict[str, int]:
        return _obstore_list(self.store(bucket), prefix)

    def read(self, key: str) -> bytes:
        return self.read_in(self.bucket, key)

    def read_in(self, bucket: str, key: str) -> bytes:
        return _obstore_read(self.store(bucket), key)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server with signatures and IAM permissions checked (see the module doc)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.models import iam_backends
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    key_id, secret = _aep_s3_key()
    iam = iam_backends[MOTO_ACCOUNT]["aws"]
    iam.create_user("us-east-1", "aep-exporter")
    key = iam.create_access_key("aep-exporter")
    # moto draws keys from [A-Z0-9]; AEP's spec wants base32 ids: give the user ours.
    key.access_key_id, key.secret_access_key = key_id, secret
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
    )
    iam.put_user_policy("aep-exporter", "s3-all", policy)
    found = S3Server(f"http://{host}:{port}", key_id, secret, "us-east-1", "aep-exports")
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    # From here every request must be signed by a known key with a policy that allows it.
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    try:
        found.make_bucket(found.bucket)
        yield found
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        server.stop()


# -- Azure Blob (Azurite) -------------------------------------------------------------------


@dataclass
class AzuriteBlob:
    """Azurite's Blob service under its own account (path-style URLs: `endpoint` ends with
    `/<account>`)."""

    endpoint: str
    account: str
    key: str
    container: str
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};"
            f"AccountKey={self.key};BlobEndpoint={self.endpoint};"
        )

    def store(self, container: str | None = None, **overrides: Any) -> Any:
        from obstore.store import AzureStore

        config: dict[str, Any] = {
            "account_name": self.account,
            "account_key": self.key,
            "endpoint": self.endpoint,
            **overrides,
        }
        return AzureStore(
            container or self.container,
            config=cast(Any, config),
            client_options={"allow_http": True},
        )

    def make_container(self, name: str) -> None:
        """`PUT ?restype=container` signed with the account key (obstore creates none)."""
        date = formatdate(usegmt=True)
        headers = {"x-ms-date": date, "x-ms-version": "2021-08-06"}
        canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        resource = f"/{self.account}/{self.account}/{name}\nrestype:container"
        to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
        digest = hmac.new(base64.b64decode(self.key), to_sign.encode(), hashlib.sha256)
        signature = base64.b64encode(digest.digest()).decode()
        request = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{self.endpoint}/{name}?restype=container",
            method="PUT",
            headers={**headers, "Authorization": f"SharedKey {self.account}:{signature}"},
        )
        with urllib.request.urlopen(request, timeout=CALL_DEADLINE_S) as answer:  # noqa: S310
            if answer.status != 201:
                raise RuntimeError(f"Azurite refused container {name!r}: {answer.status}")

    def list(self, prefix: str = "") -> dict[str, int]:
        return self.list_in(self.container, prefix)

    def list_in(self, container: str, prefix: str = "") -> dict[str, int]:
        return _obstore_list(self.store(container), prefix)

    def read(self, key: str) -> bytes:
        return self.read_in(self.container, key)

    def read_in(self, container: str, key: str) -> bytes:
        return _obstore_read(self.store(container), key)


@pytest.fixture(scope="session")
def azurite_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteBlob]:
    """Azurite's Blob service in memory, with an account of its own (see the module doc)."""
    node = shutil.which("node")
    if node is None or not AZURITE_BIN.exists():
        pytest.fail("Azurite is not installed: run `make tools` (needs node and npm)")
    account, key = "aepexports", base64.b64encode(secrets.token_bytes(32)).decode()
    workdir = tmp_path_factory.mktemp("azurite")
    process = subprocess.Popen(  # noqa: S603 - a fixed command line
        [
            str(AZURITE_BIN),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ],
        cwd=workdir,
        env={**os.environ, "AZURITE_ACCOUNTS": f"{account}:{key}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        line = _wait_for_line(process, re.compile(rb"listens on (http://\S+)"))
        endpoint = f"{line.decode().rstrip('/')}/{account}"
        found = AzuriteBlob(endpoint, account, key, "aep-exports", process)
        found.make_container(found.container)
        yield found
    finally:
        process.terminate()
        try:
            process.wait(timeout=CALL_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=CALL_DEADLINE_S)
        if process.stdout is not None:
            process.stdout.close()


def _wait_for_line(process: subprocess.Popen[bytes], pattern: re.Pattern[bytes]) -> bytes:
    """The first group of the first output line matching `pattern`, within the deadline."""
    assert process.stdout is not None
    seen: list[bytes] = []
    found: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            match = pattern.search(line)
            if match:
                found.append(match.group(1))
                break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not done.wait(START_DEADLINE_S) or not found:
        process.kill()
        output = b"".join(seen).decode(errors="replace")
        pytest.fail(f"server did not start within {START_DEADLINE_S} s:\n{output}")
    # Keep draining, so a chatty server never blocks on a full pipe.
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    return found[0]


def _drain(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ValueError, OSError):
        assert process.stdout is not None
        for _ in process.stdout:
            pass


# -- GCS (gcp-storage-emulator) -------------------------------------------------------------


@dataclass
class GcsServer:
    """gcp-storage-emulator: `endpoint` serves the JSON API and XML-API object PUT/GET."""

    endpoint: str
    hmac_access_id: str
    hmac_secret: str
    bucket: str

    def s3_store(self, bucket: str | None = None, **overrides: Any) -> Any:
        """An obstore `S3Store` on the XML API with the HMAC keys, as AEP writes to GCS.
        Only its PUT works here: the emulator serves no XML listing (`list-type=2`)."""
        from obstore.store import S3Store

        config: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key_id": self.hmac_access_id,
            "secret_access_key": self.hmac_secret,
            "region": "auto",
            "virtual_hosted_style_request": False,
            **overrides,
        }
        return S3Store(
            bucket or self.bucket, config=cast(Any, config), client_options={"allow_http": True}
        )

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{self.endpoint}/storage/v1/b?project=aep-exporter",
            method="POST",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=CALL_DEADLINE_S) as answer:  # noqa: S310
            if answer.status != 200:
                raise RuntimeError(f"the GCS emulator refused bucket {name!r}: {answer.status}")

    def list(self, prefix: str = "") -> dict[str, int]:
        return self.list_in(self.bucket, prefix)

    def list_in(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Through the JSON API (`objects.list`), page by page."""
        listed: dict[str, int] = {}
        token = ""
        while True:
            query = urllib.parse.urlencode(
                {"prefix": prefix.lstrip("/"), **({"pageToken": token} if token else {})}
            )
            page = self._get_json(f"/storage/v1/b/{bucket}/o?{query}")
            for item in page.get("items", []):
                listed[item["name"]] = int(item["size"])
            token = page.get("nextPageToken", "")
            if not token:
                return listed

    def read(self, key: str) -> bytes:
        return self.read_in(self.bucket, key)

    def read_in(self, bucket: str, key: str) -> bytes:
        """Through the JSON API's media download."""
        name = urllib.parse.quote(key.lstrip("/"), safe="")
        return self._get(f"/download/storage/v1/b/{bucket}/o/{name}?alt=media")

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(self.endpoint + path)  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=CALL_DEADLINE_S) as answer:  # noqa: S310
            data: bytes = answer.read()
            return data

    def _get_json(self, path: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self._get(path))
        return found


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """gcp-storage-emulator in memory (see the module doc: it checks no credentials)."""
    from gcp_storage_emulator import server as emulator

    handlers = emulator.HANDLERS
    emulator.HANDLERS = tuple(_with_etag(route) for route in handlers)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        port = server._api._httpd.socket.getsockname()[1]
        _wait_for_port("127.0.0.1", port)
        access_id = "GOOG1E" + secrets.token_hex(20).upper()[:55]
        secret = base64.b64encode(secrets.token_bytes(30)).decode()
        found = GcsServer(f"http://127.0.0.1:{port}", access_id, secret, "aep-exports")
        found.make_bucket(found.bucket)
        yield found
    finally:
        server.stop()
        emulator.HANDLERS = handlers


def _with_etag(route: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The XML API's object PUT answering with an ETag, as Google's does (the emulator sends
    none, and S3-style clients such as obstore refuse an upload answered without one)."""
    pattern, methods = route
    upload = methods.get("PUT")
    if upload is None or upload.__name__ != "xml_upload":
        return route

    def xml_upload(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        result = upload(request, response, storage, *args, **kwargs)
        response["ETag"] = '"' + hashlib.md5(request.data, usedforsecurity=False).hexdigest() + '"'
        return result

    return pattern, {**methods, "PUT": xml_upload}


def _wait_for_port(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=START_DEADLINE_S):
        pass


# -- SFTP (asyncssh) ------------------------------------------------------------------------


@dataclass
class SftpServer:
    """An asyncssh SFTP server chrooted to `root`; paths in the helpers are relative to it."""

    host: str
    port: int
    root: Path
    password_user: str
    password: str
    key_user: str
    private_key_b64: str
    loop: asyncio.AbstractEventLoop = field(repr=False)
    host_public_key: str = ""  # the server's host key, as a known_hosts line carries it

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_public_key}\n"

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the server's loop and wait for it, within the deadline."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_DEADLINE_S)

    async def _client(self) -> Any:
        import asyncssh

        return await asyncssh.connect(
            self.host,
            self.port,
            username=self.password_user,
            password=self.password,
            known_hosts=None,
            client_keys=None,
        )

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every file under `prefix` (recursively), by path relative to the root."""

        async def walk() -> dict[str, int]:
            async with await self._client() as conn, conn.start_sftp_client() as sftp:
                found: dict[str, int] = {}
                pending = [prefix.strip("/") or "."]
                while pending:
                    folder = pending.pop()
                    if not await sftp.exists(folder):
                        continue
                    for entry in await sftp.readdir(folder):
                        if entry.filename in (".", ".."):
                            continue
                        path = entry.filename if folder == "." else f"{folder}/{entry.filename}"
                        if entry.attrs.type == 2:  # FILEXFER_TYPE_DIRECTORY
                            pending.append(path)
                        else:
                            found[path] = entry.attrs.size or 0
                return found

        return self.call(walk())

    def read(self, path: str) -> bytes:
        async def fetch() -> bytes:
            async with (
                await self._client() as conn,
                conn.start_sftp_client() as sftp,
                sftp.open(path.lstrip("/"), "rb") as handle,
            ):
                data: bytes = await handle.read()
                return data

        return self.call(fetch())


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    """An asyncssh SFTP server with a password user and a key user (see the module doc)."""
    import asyncssh

    root = tmp_path_factory.mktemp("sftp-root")
    password = secrets.token_urlsafe(16)
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    accepted_key = user_key.export_public_key().decode()

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return username == "exporter" and hmac.compare_digest(given, password)

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return username == "exporter-key" and key.export_public_key().decode() == accepted_key

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sftp-server", daemon=True)
    thread.start()

    async def start() -> Any:
        return await asyncssh.create_server(
            Server,
            "127.0.0.1",
            0,
            server_host_keys=[host_key],
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
            allow_scp=False,
        )

    try:
        acceptor = asyncio.run_coroutine_threadsafe(start(), loop).result(START_DEADLINE_S)
        port = acceptor.sockets[0].getsockname()[1]
        key_b64 = base64.b64encode(user_key.export_private_key("openssh")).decode()
        found = SftpServer(
            "127.0.0.1",
            port,
            root,
            "exporter",
            password,
            "exporter-key",
            key_b64,
            loop,
            host_key.export_public_key().decode().strip(),
        )
        try:
            yield found
        finally:

            async def stop() -> None:
                acceptor.close()
                await acceptor.wait_closed()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(CALL_DEADLINE_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_DEADLINE_S)
        loop.close()


# -- shared helpers -------------------------------------------------------------------------


def _obstore_list(store: Any, prefix: str) -> dict[str, int]:
    import obstore

    listed: dict[str, int] = {}
    for chunk in obstore.list(store, prefix=prefix.strip("/") or None):
        for meta in chunk:
            listed[meta["path"]] = meta["size"]
    return listed


def _obstore_read(store: Any, key: str) -> bytes:
    import obstore

    return bytes(obstore.get(store, key.lstrip("/")).bytes())
