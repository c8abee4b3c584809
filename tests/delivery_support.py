"""Shared by the delivery tests: the engine's settings, destinations from dicts, and a
webhook receiver on loopback that checks nothing itself (the tests check what it got)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from exporter.delivery.signals import SIGNATURE_HEADER, TIMESTAMP_HEADER
from exporter.destinations import Destination
from exporter.engine.config import EngineConfig

ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=30,
    status_unreadable_s=120,
)
DESTINATION = TypeAdapter[Destination](Destination)
KEY_ID = "AKIAABCDEFGHIJKLMNOP"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKY"
WEBHOOK_SECRET = "whsec-delivery-test-0123456789"


def destination(kind: str, **fields: Any) -> Destination:
    return DESTINATION.validate_python({"type": kind, **fields})


@dataclass
class Receiver:
    url: str
    answers: list[int]
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback: answers with `answers` in turn (then 204)."""
    box: list[Receiver] = []

    async def hook(request: web.Request) -> web.Response:
        rec = box[0]
        rec.got.append((dict(request.headers), await request.read()))
        rec.arrived.set()
        return web.Response(status=rec.answers.pop(0) if rec.answers else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    box.append(Receiver(f"http://127.0.0.1:{port}/hook", []))
    try:
        yield box[0]
    finally:
        await runner.cleanup()


def check_signature(headers: dict[str, str], body: bytes, now: float) -> None:
    """What a receiver does: the HMAC over "<timestamp>.<body>", and a fresh timestamp."""
    stamp = headers[TIMESTAMP_HEADER]
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], f"sha256={expected}")
    assert abs(now - int(stamp)) < 300
