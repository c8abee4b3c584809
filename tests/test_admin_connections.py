"""The admin server's connections: capped, and closed when idle or too slow, so that idle
clients cannot take every file descriptor of the daemon (raw sockets against a real server on
a free port; aiohttp's own timers, set small, instead of sleeps)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import Emulator
from tests.daemon_support import kill, start_daemon, write_config
from tests.test_admin import DEADLINE, TOKEN, admin_daemon

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, count: int) -> list[Connection]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def answer_then_eof(connection: Connection) -> bytes:
    """Everything the server sends until it closes the connection, within the deadline."""
    async with asyncio.timeout(DEADLINE):
        return await connection[0].read()


async def close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in connections), return_exceptions=True)


async def get(port: int, path: str = "/healthz") -> bytes:
    """One request on a connection of its own; the answer's head and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(DEADLINE):
            return await reader.read()
    finally:
        writer.close()


async def test_past_the_cap_a_connection_is_answered_503_and_closed(
    emulator: Emulator, tmp_path: Path
) -> None:
    settings = {"max_connections": 4, "idle_timeout_s": 3600}  # idle ones stay for this test
    with capture_logs() as logs:
        async with (
            admin_daemon(emulator, tmp_path, admin=settings) as admin,
            AsyncExitStack() as stack,
        ):
            port = admin.server.port or 0
            held = await connect(port, 4)
            over = await connect(port, 6)
            stack.push_async_callback(close, held + over)
            for connection in over:  # accepted in order: the last six are past the cap
                refused = await answer_then_eof(connection)
                assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused
                assert b'"error": "too_many_connections"' in refused
                assert b"admin.max_connections" in refused
            # A real request is answered at once (503 too) instead of waiting in the backlog.
            assert (await get(port)).startswith(b"HTTP/1.1 503 ")
            # When a held connection goes, a request is served again.
            await close(held[:1])
            async with asyncio.timeout(DEADLINE):
                while (answer := await get(port)).startswith(b"HTTP/1.1 503 "):
                    pass
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert b'{"status": "ok"}' in answer
    full = [e for e in logs if e["event"] == "admin_connections_full"]
    assert full[0] == {
        "event": "admin_connections_full",
        "limit": 4,
        "refused": 1,
        "log_level": "warning",
    }
    assert len(full) == 1  # one warning per 10 s, not one per connection


async def test_idle_and_slow_connections_are_closed(emulator: Emulator, tmp_path: Path) -> None:
    # Idle long enough for a loaded machine to read a request sent at once.
    settings = {"idle_timeout_s": 0.5, "read_timeout_s": 0.2}
    async with admin_daemon(emulator, tmp_path, admin=settings) as admin:
        port = admin.server.port or 0
        connections = await connect(port, 4)
        idle, slow_headers, slow_body, kept = connections
        try:
            slow_headers[1].write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
            slow_body[1].write(
                f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                'Content-Length: 100\r\n\r\n{"dataset_id": '.encode()
            )
            kept[1].write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            # Nothing sent, or headers that never end: closed without an answer.
            assert await answer_then_eof(idle) == b""
            assert await answer_then_eof(slow_headers) == b""
            # A body that never comes whole: 408, then closed.
            answer = await answer_then_eof(slow_body)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
            assert b'"error": "request_timeout"' in answer
            assert b"within 0.2 s (admin.read_timeout_s)" in answer
            # A connection kept alive after its answer is closed once idle, too.
            answer = await answer_then_eof(kept)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert answer.endswith(b'\r\n\r\n{"status": "ok"}')  # the answer, then the close
            assert b"Connection: close" not in answer
        finally:
            await close(connections)
        listed = await admin.call("GET", "/v1/jobs")
    assert listed.body == {"jobs": [], "next_cursor": None}  # the cut-off body was not a job


def open_files(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


@pytest.mark.slow
async def test_300_idle_connections_leave_a_daemon_with_256_files_answering(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The default cap (64) under `ulimit -n 256`; idle connections are not timed out here.
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = write_config(
        tmp_path, emulator.url, admin={"token_file": str(token), "idle_timeout_s": 3600}
    )
    running = await start_daemon(config, tmp_path / "daemon.log", max_files=256)
    connections: list[Connection] = []
    try:
        await running.until("daemon_ready", deadline_s=DEADLINE)
        (listening,) = [e for e in running.lines if e.get("event") == "admin_listening"]
        port = listening["port"]
        assert listening["max_connections"] == 64
        before = open_files(running.proc.pid)
        connections = await connect(port, 300)
        refused = await asyncio.gather(*(answer_then_eof(c) for c in connections[64:]))
        assert all(r.startswith(b"HTTP/1.1 503 ") for r in refused)
        held = open_files(running.proc.pid) - before
        # The 64 held connections, give or take a connection to AEP: the refused are closed.
        assert 64 - 4 <= held <= 64 + 4, held
        await close(connections[:64])
        async with asyncio.timeout(DEADLINE):
            while (answer := await get(port, "/readyz")).startswith(b"HTTP/1.1 503 "):
                assert b"too_many_connections" in answer, answer  # not "not ready"
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert running.proc.returncode is None
    finally:
        await close(connections)
        code = await kill(running, 15)
    assert code == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "Too many open files" not in log
    assert "out of system resource" not in log
