"""Completion signals: `_SUCCESS` and `_manifest.json` in the export folder, and a webhook.

The markers are written only once the folder is verified, so a reader that waits for
`_SUCCESS` never reads a partial or wrong export. Their names start with `_`, which Spark,
Hadoop and pandas readers skip when they read a folder of part files.

The webhook is a POST of a JSON body, signed so a receiver can tell it from a forgery or a
replay: header `X-Exporter-Timestamp` (Unix seconds) and `X-Exporter-Signature:
sha256=<hex HMAC-SHA256 under the shared secret of "<timestamp>.<body>">`. A receiver checks
the signature over the exact bytes it got and refuses a timestamp too far from its clock.
Redirects are not followed and TLS is verified. It is sent in the background, retried with
backoff (5xx, 429, network errors, time-outs) within bounds, and never changes the job's
outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from exporter.clock import Clock
from exporter.delivery.config import WebhookSettings
from exporter.delivery.stores import Store
from exporter.delivery.verify import Found
from exporter.errors import ExporterError
from exporter.redaction import SECRETS
from exporter.retry import Backoff, retry

log = structlog.get_logger("exporter.delivery")

SUCCESS_MARKER = "_SUCCESS"
MANIFEST = "_manifest.json"
MANIFEST_VERSION = 1
TIMESTAMP_HEADER = "X-Exporter-Timestamp"
SIGNATURE_HEADER = "X-Exporter-Signature"


def manifest(
    found: Found,
    *,
    dataset_id: str,
    run_id: str,
    flow_id: str | None,
    export_time_ms: int,
    landing_uri: str,
    file_format: str,
    compression: str,
) -> bytes:
    """The manifest's bytes: every file with its size and rows, and what the export is."""
    body = {
        "version": MANIFEST_VERSION,
        "dataset_id": dataset_id,
        "run_id": run_id,
        "flow_id": flow_id,
        "export_time": datetime.fromtimestamp(export_time_ms / 1000, UTC).isoformat(),
        "landing_uri": landing_uri,
        "format": file_format,
        "compression": compression,
        "files": [{"name": f.name, "size": f.size, "rows": f.rows} for f in found.files],
        "bytes": found.bytes,
        "rows": found.rows,
        "schema": [{"name": n, "type": t} for n, t in found.columns],
    }
    return (json.dumps(body, indent=2) + "\n").encode()


async def write_markers(
    store: Store, prefix: str, *, manifest_bytes: bytes | None, success: bool
) -> None:
    """The manifest first, then `_SUCCESS`: a reader that sees `_SUCCESS` finds both."""
    if manifest_bytes is not None:
        await store.put(prefix + MANIFEST, manifest_bytes)
    if success:
        await store.put(prefix + SUCCESS_MARKER, b"")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookFailed(ExporterError):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


async def send_webhook(
    session: aiohttp.ClientSession,
    settings: WebhookSettings,
    event: Mapping[str, Any],
    *,
    clock: Clock,
    rng: random.Random,
) -> bool:
    """POST `event` to the webhook, retried as `settings` allow; True once a 2xx came back.
    Never raises for the receiver's failures: they are logged (the URL's secrets scrubbed)."""
    body = json.dumps(event, sort_keys=True).encode()
    secret = settings.secret.get_secret_value()
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)

    async def attempt() -> None:
        stamp = int(clock.time())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(secret, stamp, body),
        }
        try:
            async with session.post(
                settings.url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as resp:
                if 200 <= resp.status < 300:
                    return
                again = resp.status >= 500 or resp.status in (408, 429)
                raise WebhookFailed(f"the receiver answered {resp.status}", retryable=again)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WebhookFailed(f"{type(exc).__name__}", retryable=True) from None

    policy = Backoff(
        max_attempts=settings.attempts,
        base_delay_s=1.0,
        max_delay_s=60.0,
        max_elapsed_s=settings.max_elapsed_s,
    )
    try:
        await retry(
            attempt,
            policy=policy,
            clock=clock,
            rng=rng,
            on_retry=lambda r: log.info(
                "webhook_retrying", attempt=r.attempt, delay_s=round(r.delay, 3), error=str(r.error)
            ),
        )
    except WebhookFailed as exc:
        log.warning(
            "webhook_failed", url=SECRETS.scrub(settings.url), error=str(exc), kind=event["event"]
        )
        return False
    log.info("webhook_sent", url=SECRETS.scrub(settings.url), kind=event["event"])
    return True
