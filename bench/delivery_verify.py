"""What verifying an export costs: requests to the store and milliseconds, for 100 files.

An export folder of 100 Parquet part files (as the emulator writes them: gzip pages, a few
columns) is put on three stores — a local folder, moto's S3 server and an asyncssh SFTP
server, both on loopback in this process — and verified the way the engine does after a run
(exporter/delivery/verify.py: one listing, one ranged footer read per file, 16 at a time),
then the manifest and `_SUCCESS` are written. Each store is verified `--repeat` times; the
table gives the median and worst wall time, the requests and the bytes read.

    python bench/delivery_verify.py [--files 100] [--rows 20000] [--repeat 7]

Loopback hides network latency: on a real bucket each request adds a round trip (tens of
milliseconds across regions), of which 16 run at once; the request count is what carries
over. docs/benchmarks.md ("Delivery verification") has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.clock import SystemClock
from exporter.delivery.config import VerifySettings
from exporter.delivery.signals import write_markers
from exporter.delivery.stores import Entry, LocalStore, ObjectStore, SftpStore, Store
from exporter.delivery.verify import Expected, verify

PREFIX = "ml/features/ds/exportTime=202601010000/"


class Counting:
    """A store that counts the bytes its reads return (the store counts requests)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.requests = 0

    def _sync(self) -> None:
        self.requests = self.inner.requests

    async def list(self, prefix: str) -> list[Entry]:
        found = await self.inner.list(prefix)
        self._sync()
        return found

    async def read(self, key: str, start: int, end: int) -> bytes:
        data = await self.inner.read(key, start, end)
        self.bytes_read += len(data)
        self._sync()
        return data

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, data)
        self._sync()

    async def aclose(self) -> None:
        await self.inner.aclose()


def part_files(files: int, rows: int) -> list[tuple[str, bytes]]:
    """`files` Parquet part files of `rows` rows each, as an export writes them."""
    out = []
    for index in range(files):
        base = index * rows
        table = pa.table(
            {
                "person_id": [f"p{base + i:09d}" for i in range(rows)],
                "score": [float(i % 97) / 97 for i in range(rows)],
                "segment": [f"s{i % 12}" for i in range(rows)],
                "updated": pa.array([1_700_000_000_000 + i for i in range(rows)], pa.int64()),
            }
        )
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="gzip")
        out.append((f"part-{index:05d}-tid-1-c000.gz.parquet", sink.getvalue()))
    return out


async def measure(
    name: str,
    open_store: Callable[[], Awaitable[Store]],
    expected: Expected,
    repeat: int,
) -> dict[str, Any]:
    settings = VerifySettings(store="auto", grace_s=0)
    clock = SystemClock()
    times, counted = [], []
    for _ in range(repeat):
        store = Counting(await open_store())
        began = time.perf_counter()
        found = await verify(store, PREFIX, expected, settings, clock)
        verified_ms = (time.perf_counter() - began) * 1000
        if found.differences:
            raise RuntimeError(f"{name}: {found.differences}")
        listing_and_footers = store.requests
        await write_markers(store, PREFIX, manifest_bytes=b"{}", success=True)
        times.append(verified_ms)
        counted.append((listing_and_footers, store.requests, store.bytes_read))
        await store.aclose()
    requests, with_markers, read = counted[-1]
    return {
        "store": name,
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "requests": requests,
        "requests_with_markers": with_markers,
        "bytes_read": read,
    }


def moto_server(files: list[tuple[str, bytes]]) -> tuple[Any, Callable[[], Awaitable[Store]]]:
    import boto3
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from obstore.store import S3Store

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Made for this run: no credential is written into the repository.
    keys = {
        "aws_access_key_id": "AKIA" + secrets.token_hex(8).upper(),
        "aws_secret_access_key": secrets.token_urlsafe(30),
    }
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
    s3.create_bucket(Bucket="bench")
    for name, data in files:
        s3.put_object(Bucket="bench", Key=PREFIX + name, Body=data)

    async def open_store() -> Store:
        config: Any = {
            "endpoint": endpoint,
            "access_key_id": keys["aws_access_key_id"],
            "secret_access_key": keys["aws_secret_access_key"],
            "region": "us-east-1",
            "virtual_hosted_style_request": False,
        }
        options: Any = {"allow_http": True}
        return ObjectStore(S3Store("bench", config=config, client_options=options))

    return server, open_store


async def sftp_server(root: Path) -> tuple[Any, Callable[[], Awaitable[Store]]]:
    import asyncssh

    password = secrets.token_urlsafe(16)  # made for this run

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return username == "bench" and secrets.compare_digest(given, password)

    acceptor = await asyncssh.create_server(
        Server,
        "127.0.0.1",
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
    )
    port = acceptor.sockets[0].getsockname()[1]

    async def open_store() -> Store:
        return SftpStore(
            {
                "host": "127.0.0.1",
                "port": port,
                "username": "bench",
                "password": password,
                "known_hosts": None,
                "client_keys": None,
            }
        )

    return acceptor, open_store


async def main(files_n: int, rows: int, repeat: int) -> dict[str, Any]:
    files = part_files(files_n, rows)
    expected = Expected(files_n, sum(len(d) for _, d in files), files_n * rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / PREFIX
        folder.mkdir(parents=True)
        for name, data in files:
            (folder / name).write_bytes(data)

        async def local() -> Store:
            return LocalStore(root)

        results.append(await measure("local folder", local, expected, repeat))
        acceptor, sftp = await sftp_server(root)
        try:
            results.append(await measure("SFTP (asyncssh, loopback)", sftp, expected, repeat))
        finally:
            acceptor.close()
            await acceptor.wait_closed()
    server, s3 = moto_server(files)
    try:
        results.append(await measure("S3 (moto, loopback)", s3, expected, repeat))
    finally:
        server.stop()
    return {
        "files": files_n,
        "rows_per_file": rows,
        "file_bytes": round(expected.bytes / files_n),
        "repeat": repeat,
        "python": platform.python_version(),
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    report = asyncio.run(main(args.files, args.rows, args.repeat))
    json.dump(report, sys.stdout, indent=2)
    print()
