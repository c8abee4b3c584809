"""The admin server's listening socket, with a cap on the connections open at once.

aiohttp accepts every connection it is offered, and an idle one holds a file descriptor until
its keep-alive timeout. A few hundred idle clients would exhaust the process's descriptors,
and then the journal, the spool and AEP calls fail too (EMFILE). Past `limit` open
connections, a new one is answered 503 at once and closed; the others still close when idle
for `admin.idle_timeout_s` (aiohttp's keep-alive timeout), so the server recovers by itself.
"""

from __future__ import annotations

import asyncio
import json
import time

import structlog
from aiohttp import web

log = structlog.get_logger("exporter.admin")

FULL_LOG_EVERY_S = 10.0  # one warning per this many seconds while connections are refused


def _full_response(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": "too_many_connections",
            "message": f"the admin server has {limit} connections open (admin.max_connections); "
            "try again when one closes",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Counted(asyncio.Protocol):
    """Forwards a connection to aiohttp's handler while it is counted, or refuses it."""

    def __init__(self, inner: asyncio.Protocol, site: CappedSite) -> None:
        self.inner = inner
        self.site = site
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.site.open >= self.site.limit:
            self.site.refused(transport)
            return
        self.site.open += 1
        self.counted = True
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.site.open -= 1
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.counted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        if self.counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
            self.inner.resume_writing()


class CappedSite(web.BaseSite):
    """A TCP site (like aiohttp's `TCPSite`) serving at most `limit` connections at once."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limit: int) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port
        self.limit = limit
        self.open = 0
        """Connections being served now."""
        self.refusals = 0
        """Connections refused since the last warning."""
        self._warned = -FULL_LOG_EVERY_S

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Counted(server(), self), self.host, self.port, reuse_address=True
        )

    def refused(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_full_response(self.limit))
        transport.close()  # after the answer is written
        self.refusals += 1
        now = time.monotonic()  # a log throttle, in real time like the event loop's own
        if now - self._warned >= FULL_LOG_EVERY_S:
            self._warned = now
            log.warning("admin_connections_full", limit=self.limit, refused=self.refusals)
            self.refusals = 0
