"""IMS server-to-server tokens: fetched with client credentials, cached, renewed early.

`TokenProvider` keeps one token for the process. However many requests ask at once, one
refresh runs (the others wait for its result); a refresh starts `margin` before expiry so that
no request leaves with a token about to lapse. After a 401 the transport calls
`invalidate(token)` with the token it sent: only the first such call for a token drops it, so
a burst of 401s leads to exactly one re-authentication. Transient IMS failures are retried
with the backoff policy; refused credentials raise `AuthError` at once with IMS's own words.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from exporter.aep.config import AepConfig
from exporter.aep.envelopes import (
    decode_body,
    describe,
    error_for,
    parse_retry_after,
    redirect_refused,
    transport_error,
)
from exporter.aep.facts import IMS_TOKEN_PATH
from exporter.clock import Clock
from exporter.errors import AepError, AuthError, ServerError
from exporter.retry import Backoff, Retrying, retry

log = structlog.get_logger("exporter.aep")
MAX_LIFETIME_S = 86_400.0  # IMS tokens last 24 h; a larger expires_in is not believed
OPERATION = "ims.token"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token and its lifetime in seconds, as IMS issued it."""

    access_token: str = field(repr=False)
    expires_in_s: float


TokenFetcher = Callable[[], Awaitable[IssuedToken]]


async def fetch_ims_token(
    session: aiohttp.ClientSession, config: AepConfig, *, now: Callable[[], float]
) -> IssuedToken:
    """POST the client credentials to `{ims_url}/ims/token/v3` (form-encoded)."""
    secret = config.client_secret.get_secret_value()
    form = {
        "grant_type": "client_credentials",
        "client_id": config.client_id,
        "client_secret": secret,
        "scope": ",".join(config.scopes),
    }
    try:
        async with session.post(
            config.ims_url + IMS_TOKEN_PATH, data=form, allow_redirects=False
        ) as resp:
            raw = await resp.read()
            status, retry_after = resp.status, resp.headers.get("Retry-After")
            if 300 <= status < 400:  # the form carries the client secret: never re-sent
                raise redirect_refused(status, resp.headers, operation=OPERATION, peer="IMS")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transport_error(exc, operation=OPERATION, peer="IMS") from exc
    body = decode_body(raw)
    if status >= 400:
        wait = parse_retry_after(retry_after, now())
        if status in (400, 401, 403):
            message, code = describe(body)
            raise AuthError(
                f"IMS refused the credentials of client {config.client_id}: "
                f"{message.replace(secret, '***')}",
                status=status,
                code=code,
                operation=OPERATION,
            )
        raise error_for(status, body, operation=OPERATION, retry_after=wait)
    token = body.get("access_token") if isinstance(body, dict) else None
    expires_in = body.get("expires_in") if isinstance(body, dict) else None
    if (
        not isinstance(token, str)
        or not token
        or isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or expires_in <= 0
    ):
        raise ServerError(
            "IMS answered without an access_token and a positive expires_in",
            status=status,
            operation=OPERATION,
        )
    return IssuedToken(token, min(float(expires_in), MAX_LIFETIME_S))


class TokenProvider:
    """The process's IMS token: `await token()` for a valid one, `invalidate()` after a 401."""

    def __init__(
        self,
        fetch: TokenFetcher,
        clock: Clock,
        *,
        policy: Backoff,
        rng: random.Random,
        margin_s: float = 300.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._policy = policy
        self._rng = rng
        self._margin = margin_s
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"TokenProvider(refreshes={self.refreshes}, cached={self._token is not None})"

    def _cached(self) -> str | None:
        if self._token is not None and self._clock.monotonic() < self._renew_at:
            return self._token
        return None

    async def token(self) -> str:
        """A token valid for at least the renewal margin (or half its lifetime, if shorter)."""
        cached = self._cached()
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._cached()  # another caller may have refreshed while we waited
            if cached is not None:
                return cached
            return await self._refresh()

    def invalidate(self, token: str) -> None:
        """Forget `token` if it is still the cached one (the gateway refused it)."""
        if token == self._token:
            self._token = None
            log.info("aep_token_invalidated")

    async def _refresh(self) -> str:
        asked = 0.0

        async def fetch() -> IssuedToken:
            nonlocal asked
            asked = self._clock.monotonic()
            return await self._fetch()

        def retrying(r: Retrying) -> None:
            status = r.error.status if isinstance(r.error, AepError) else None
            log.info(
                "aep_token_retry",
                attempt=r.attempt,
                delay_s=round(r.delay, 3),
                error=type(r.error).__name__,
                status=status,
            )

        issued = await retry(
            fetch,
            policy=self._policy,
            clock=self._clock,
            rng=self._rng,
            retryable=lambda exc: isinstance(exc, AepError) and exc.retryable,
            on_retry=retrying,
        )
        lifetime = issued.expires_in_s
        self._token = issued.access_token
        self._renew_at = asked + lifetime - min(self._margin, lifetime / 2)
        self.refreshes += 1
        log.info("aep_token_refreshed", expires_in_s=lifetime, refreshes=self.refreshes)
        return issued.access_token
