"""The HTTP transport to AEP: one aiohttp session, AEP's headers, pacing, retries, errors.

Every platform request carries the token, API key, org and sandbox headers; goes through the
process's `RateLimiter` (rate and concurrency); and has a timeout. Answers >= 400 and
aiohttp's own failures come back as `exporter.errors` types, raised `from` the original.

Retries: idempotent requests (GET, DELETE, PUT, PATCH under If-Match, and calls the caller
declares idempotent, such as flow actions) are retried on 429, 5xx and transport errors under
the backoff policy, honouring `Retry-After`. A 401 means the gateway refused the token before
the request reached the service, so any request is retried once with a fresh token. Anything
else that is not idempotent is never retried here: the caller knows how to reconcile.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from exporter.aep.auth import OPERATION as IMS_OPERATION
from exporter.aep.auth import OPERATION as TOKEN_OPERATION
from exporter.aep.auth import IssuedToken, TokenProvider, fetch_ims_token
from exporter.aep.config import AepConfig
from exporter.aep.envelopes import (
    decode_body,
    error_for,
    parse_retry_after,
    redirect_refused,
    transport_error,
)
from exporter.aep.ratelimit import RateLimiter
from exporter.clock import Clock, SystemClock, wait_within
from exporter.errors import (
    AepError,
    ClientClosed,
    PreconditionFailed,
    SendWindowMissed,
    ServerError,
)
from exporter.metrics import Metrics
from exporter.retry import Backoff, Retrying, retry

log = structlog.get_logger("exporter.aep")
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class Response:
    """A successful answer: status, headers and the decoded JSON body (None when empty)."""

    status: int
    headers: Mapping[str, str]
    body: Any


def encode_query(pairs: Sequence[tuple[str, str]]) -> str:
    """A query string in which every reserved character of a value is percent-encoded, except
    the `=` and `,` of the filter language (the server decodes before it parses anyway)."""
    return urlencode(list(pairs), quote_via=quote, safe="=,")


class Transport:
    """Authenticated, paced, retrying requests to one AEP org and sandbox."""

    def __init__(
        self,
        config: AepConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        limiter: RateLimiter | None = None,
        policy: Backoff | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.policy = policy or config.backoff()
        self.metrics = metrics
        self.limiter = limiter or RateLimiter(
            self.clock,
            rate_rps=config.rate_limit_rps,
            min_rate_rps=config.rate_limit_min_rps,
            max_concurrency=config.max_concurrency,
            metrics=metrics,
        )
        self.ssl_context = ssl.create_default_context()  # verification on; no switch to turn it off
        self.tokens = TokenProvider(
            self._fetch_token,
            self.clock,
            policy=self.policy,
            rng=self.rng,
            margin_s=config.token_refresh_margin_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._base = config.platform_url
        self._closed = False
        self._exchanges: set[asyncio.Future[tuple[int, CIMultiDict[str], bytes]]] = set()

    def __repr__(self) -> str:
        return f"Transport({self.config.platform_url}, sandbox={self.config.sandbox!r})"

    async def _fetch_token(self) -> IssuedToken:
        with self.clock.busy():
            return await self._fetch_token_on_wire()

    async def _fetch_token_on_wire(self) -> IssuedToken:
        if self.metrics is None:
            return await fetch_ims_token(self.session, self.config, now=self.clock.time)
        began = time.perf_counter()
        try:
            issued = await fetch_ims_token(self.session, self.config, now=self.clock.time)
        except AepError as exc:  # its status is IMS's answer; None when none came
            self.metrics.api_request(IMS_OPERATION, exc.status, time.perf_counter() - began)
            raise
        # IMS issues tokens with a 200 (fetch_ims_token does not return the status).
        self.metrics.api_request(IMS_OPERATION, 200, time.perf_counter() - began)
        return issued

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one session, created on first use (it needs a running event loop)."""
        if self._closed:
            # A request after the close is a task that outlived its owner: refuse it rather
            # than open a session nobody will close.
            raise ClientClosed("the AEP client is closed: no more requests")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self.ssl_context,
                limit=self.config.max_concurrency + 2,  # + IMS, which the limiter does not pace
                ttl_dns_cache=300,
            )
            timeout = aiohttp.ClientTimeout(
                total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                raise_for_status=False,
                trust_env=False,
                trace_configs=[_count_sends()] if self.metrics is not None else None,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the session; safe to call more than once. Requests after it are refused."""
        self._closed = True
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def url(self, target: str) -> URL:
        """An absolute URL on the platform host for a path (with an encoded query, if any).
        A foreign origin is dropped: the token is only ever sent to the platform host."""
        given = URL(target)
        query = f"?{given.raw_query_string}" if given.raw_query_string else ""
        return URL(f"{self._base}{given.raw_path}{query}", encoded=True)

    def _headers(
        self, token: str, extra: Mapping[str, str] | None, has_body: bool
    ) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {token}",
            "x-api-key": self.config.client_id,
            "x-gw-ims-org-id": self.config.org_id,
            "x-sandbox-name": self.config.sandbox,
            "Accept": "application/json",
        }
        if has_body:
            headers["Content-Type"] = "application/json"
        job_id = structlog.contextvars.get_contextvars().get("job_id")
        # Lets AEP support (or the emulator's journal) tie a request to the job that sent it.
        suffix = secrets.token_hex(4)
        headers["x-request-id"] = f"{job_id}.{suffix}" if job_id else suffix
        headers.update(extra or {})
        return headers

    async def request(
        self,
        method: str,
        target: str,
        *,
        operation: str,
        query: Sequence[tuple[str, str]] = (),
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        send_by: float | None = None,
    ) -> Response:
        """Send one logical request (several attempts when allowed); raise `AepError`s.

        `target` is a path on the platform host, possibly with an already-encoded query (a
        `_links.next.href`); `query` pairs are encoded and appended. With `send_by` (this
        transport's monotonic clock), an attempt that could go out only later, once it has
        its token and its place in the rate limit, is not sent: `SendWindowMissed`.
        """
        method = method.upper()
        if idempotent is None:
            idempotent = method in _IDEMPOTENT or (
                method == "PATCH" and "If-Match" in (headers or {})
            )
        if query:
            target += ("&" if "?" in target else "?") + encode_query(query)
        url = self.url(target)
        data = None if json_body is None else json.dumps(json_body).encode()
        reauthenticated = False

        async def attempt(token: str) -> Response:
            return await self._send(
                method,
                url,
                self._headers(token, headers, data is not None),
                data,
                operation,
                send_by,
            )

        async def send() -> Response:
            nonlocal reauthenticated
            token = await self.tokens.token()
            try:
                return await attempt(token)
            except AepError as exc:
                if exc.status != 401 or reauthenticated:
                    raise
            # The gateway refused a token IMS still calls valid (revoked, rotated): once, a
            # new one, at once; not an attempt of the backoff.
            reauthenticated = True
            self.tokens.invalidate(token)
            log.info("aep_request_reauth", operation=operation, method=method)
            if self.metrics is not None:
                self.metrics.api_retry(operation)
            return await attempt(await self.tokens.token())

        def retryable(exc: Exception) -> bool:
            # A 412 is retryable only by the caller, after re-reading the etag: the same
            # If-Match sent again is refused again. A token that could not be had was already
            # retried by the token provider's own backoff: again here, the attempts would
            # multiply (6 x 6 against an unreachable IMS).
            return (
                idempotent
                and isinstance(exc, AepError)
                and exc.retryable
                and not isinstance(exc, (PreconditionFailed, SendWindowMissed))
                and exc.operation != TOKEN_OPERATION
            )

        def retrying(r: Retrying) -> None:
            error = r.error
            assert isinstance(error, AepError)  # (only those are retryable)
            log.info(
                "aep_request_retry",
                operation=operation,
                method=method,
                path=url.path,
                attempt=r.attempt,
                delay_s=round(r.delay, 3),
                error=type(error).__name__,
                status=error.status,
                retry_after=error.retry_after,
            )
            if self.metrics is not None:
                self.metrics.api_retry(operation)

        return await retry(
            send,
            policy=self.policy,
            clock=self.clock,
            rng=self.rng,
            retryable=retryable,
            on_retry=retrying,
        )

    async def _exchange(
        self, method: str, url: URL, headers: dict[str, str], data: bytes | None, operation: str
    ) -> tuple[int, CIMultiDict[str], bytes]:
        # Measured here, in the task that outlives a cancelled caller, so that every request
        # AEP saw is counted once; in real time: the wire does not run on a fake clock.
        began, status, sends = time.perf_counter(), None, _Sends()
        try:
            with self.clock.busy():
                async with self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    trace_request_ctx=sends,
                    allow_redirects=False,  # a body with secrets never goes to another origin
                ) as resp:
                    answer = resp.status, resp.headers.copy(), await resp.read()
            status = answer[0]
            return answer
        finally:
            if self.metrics is not None:
                self.metrics.api_request(
                    operation, status, time.perf_counter() - began, unanswered=sends.resent
                )

    async def drain(self, within_s: float) -> int:
        """Wait up to `within_s` for requests already on the wire; returns how many are left."""
        pending = set(self._exchanges)
        if pending and within_s > 0:
            await wait_within(self.clock, within_s, asyncio.wait(pending))
        return sum(1 for t in self._exchanges if not t.done())

    async def _send(
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        data: bytes | None,
        operation: str,
        send_by: float | None = None,
    ) -> Response:
        try:
            async with self.limiter.slot():
                if send_by is not None and (late := self.clock.monotonic() - send_by) > 0:
                    raise SendWindowMissed(
                        f"not sent: its place in the rate limit came {late:.1f} s after the "
                        "time it had to be on the wire by",
                        operation=operation,
                    )
                # A request on the wire finishes even if its caller is cancelled (a shutdown):
                # AEP then acts on it as sent, and `drain()` waits for it before closing.
                exchange = asyncio.ensure_future(
                    self._exchange(method, url, headers, data, operation)
                )
                self._exchanges.add(exchange)
                exchange.add_done_callback(self._exchanges.discard)
                exchange.add_done_callback(_forget)
                status, answer_headers, raw = await asyncio.shield(exchange)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise transport_error(exc, operation=operation, peer=f"AEP ({url.host})") from exc
        body = decode_body(raw)
        log.debug("aep_request", operation=operation, method=method, status=status)
        if status == 429:
            retry_after = parse_retry_after(answer_headers.get("Retry-After"), self.clock.time())
            self.limiter.on_throttled(retry_after)
            raise error_for(status, body, operation=operation, retry_after=retry_after)
        if status < 500:
            self.limiter.on_success()
        if 300 <= status < 400:
            raise redirect_refused(status, answer_headers, operation=operation, peer="AEP")
        if status >= 400:
            retry_after = parse_retry_after(answer_headers.get("Retry-After"), self.clock.time())
            raise error_for(status, body, operation=operation, retry_after=retry_after)
        if isinstance(body, str):
            raise ServerError(
                f"AEP answered {status} with a body that is not JSON",
                status=status,
                operation=operation,
            )
        return Response(status, answer_headers, body)


class _Sends:
    """How many times aiohttp put one request on the wire: it sends an idempotent request
    again by itself, once, when a kept-alive connection is found closed."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def resent(self) -> int:
        """Sends beyond the last, each of which got no answer."""
        return max(0, self.count - 1)


def _count_sends() -> aiohttp.TraceConfig:
    async def sent(_: aiohttp.ClientSession, context: Any, __: Any) -> None:
        if isinstance(context.trace_request_ctx, _Sends):
            context.trace_request_ctx.count += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(sent)
    return trace


def _forget(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of an exchange whose caller has gone, so it is not reported."""
    if not task.cancelled():
        task.exception()
