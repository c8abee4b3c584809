"""The client's policies without HTTP: settings, backoff, the rate limiter and the token
provider, on a fake clock (no test sleeps for real)."""

from __future__ import annotations

import asyncio
import random

import pytest
from pydantic import ValidationError

from exporter.aep.auth import IssuedToken, TokenProvider
from exporter.aep.config import DEFAULT_SCOPES, AepConfig
from exporter.aep.ratelimit import RateLimiter
from exporter.clock import FakeClock
from exporter.errors import AuthError, ServerError, TransportError
from exporter.retry import Backoff

SECRET = "s3cr3t-value-never-shown"


def config(**changes: object) -> AepConfig:
    base: dict[str, object] = {
        "client_id": "cid",
        "client_secret": SECRET,
        "org_id": "ORG@AdobeOrg",
    }
    return AepConfig.model_validate({**base, **changes})


# -- settings -------------------------------------------------------------------------------


def test_config_defaults_are_adobes() -> None:
    cfg = config()
    assert cfg.platform_url == "https://platform.adobe.io"
    assert cfg.ims_url == "https://ims-na1.adobelogin.com"
    assert cfg.sandbox == "prod"
    assert cfg.scopes == DEFAULT_SCOPES
    assert "AdobeID" in cfg.scopes
    assert "additional_info.projectedProductContext" in cfg.scopes
    assert cfg.backoff() == Backoff(
        cfg.max_attempts, cfg.base_delay_s, cfg.max_delay_s, cfg.max_elapsed_s
    )


@pytest.mark.parametrize(
    "url",
    ["http://platform.adobe.io", "http://10.0.0.1:8080", "ftp://x", "https://u:p@host", "nohost"],
)
def test_config_refuses_plain_http_off_loopback_and_odd_urls(url: str) -> None:
    with pytest.raises(ValidationError):
        config(platform_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "http://localhost:1/", "http://[::1]:9"])
def test_config_allows_http_on_loopback(url: str) -> None:
    assert config(ims_url=url).ims_url == url.rstrip("/")


def test_config_hides_the_secret_and_forbids_unknown_fields() -> None:
    cfg = config()
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)
    assert SECRET not in cfg.model_dump_json()
    with pytest.raises(ValidationError):
        config(verify_ssl=False)
    with pytest.raises(ValidationError):
        config(rate_limit_rps=1, rate_limit_min_rps=2)


# -- backoff --------------------------------------------------------------------------------


def test_backoff_full_jitter_grows_exponentially_and_is_capped() -> None:
    policy = Backoff(max_attempts=100, base_delay_s=1, max_delay_s=20, max_elapsed_s=1e9)
    rng = random.Random(1)
    assert [policy.ceiling(a) for a in (1, 2, 3, 4, 5, 6, 50)] == [1, 2, 4, 8, 16, 20, 20]
    for attempt in range(1, 60):
        draws = [policy.next_delay(attempt, rng) for _ in range(200)]
        assert all(d is not None and 0 <= d <= policy.ceiling(attempt) for d in draws)
    late = [policy.next_delay(10, rng) for _ in range(500)]
    assert min(d for d in late if d is not None) < 2  # full jitter reaches near zero
    assert policy.ceiling(10**6) == 20  # no overflow


def test_backoff_is_deterministic_for_a_seed() -> None:
    policy = Backoff()
    first = [policy.next_delay(a, random.Random(42)) for a in range(1, 5)]
    assert first == [policy.next_delay(a, random.Random(42)) for a in range(1, 5)]


def test_backoff_gives_up_after_max_attempts_and_total_time() -> None:
    policy = Backoff(max_attempts=3, base_delay_s=1, max_delay_s=10, max_elapsed_s=30)
    rng = random.Random(0)
    assert policy.next_delay(2, rng) is not None
    assert policy.next_delay(3, rng) is None
    assert policy.next_delay(1, rng, elapsed=29.99, retry_after=0.5) is None
    assert policy.next_delay(1, rng, elapsed=30.0) in (None, 0.0)


def test_backoff_honours_retry_after_as_a_floor_within_the_total_cap() -> None:
    policy = Backoff(max_attempts=5, base_delay_s=0.1, max_delay_s=1, max_elapsed_s=60)
    rng = random.Random(3)
    assert policy.next_delay(1, rng, retry_after=7) == 7  # above max_delay_s: still honoured
    assert policy.next_delay(1, rng, retry_after=50, elapsed=20) is None  # past the total cap
    assert policy.next_delay(1, rng, retry_after=-5) is not None


# -- rate limiter ---------------------------------------------------------------------------


def limiter(clock: FakeClock, **changes: float) -> RateLimiter:
    args: dict[str, float] = {"rate_rps": 10.0, "min_rate_rps": 1.0, "max_concurrency": 4}
    args.update(changes)
    return RateLimiter(
        clock,
        rate_rps=args.pop("rate_rps"),
        min_rate_rps=args.pop("min_rate_rps"),
        max_concurrency=int(args.pop("max_concurrency")),
        burst=args.pop("burst", 1.0),
        decrease=args.pop("decrease", 0.5),
        increase_rps=args.pop("increase_rps", 1.0),
        cut_window_s=args.pop("cut_window_s", 2.0),
    )


async def test_limiter_paces_requests_at_its_rate_on_the_clock() -> None:
    clock = FakeClock(auto_advance=True)
    lim = limiter(clock, rate_rps=5)
    for _ in range(11):
        await lim.acquire()
    assert clock.monotonic() == pytest.approx(2.0)  # 10 gaps of 0.2 s
    assert lim.stats.waits == 10
    assert lim.stats.waited_s == pytest.approx(2.0)


async def test_limiter_serves_concurrent_waiters_in_arrival_order() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate_rps=2)
    order: list[int] = []

    async def one(i: int) -> None:
        await lim.acquire()
        order.append(i)

    tasks = [asyncio.create_task(one(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert order == [0]
    await clock.advance(1.0)
    assert order == [0, 1, 2]
    await clock.advance(1.0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_burst_of_429s_is_one_cut_and_the_rate_has_a_floor() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate_rps=16, min_rate_rps=3, cut_window_s=2)
    for _ in range(10):
        lim.on_throttled()
    assert lim.rate == 8
    assert lim.stats.cuts == 1
    assert lim.stats.throttled == 10
    await clock.advance(2)
    lim.on_throttled()
    assert lim.rate == 4
    for _ in range(3):
        await clock.advance(2)
        lim.on_throttled()
    assert lim.rate == 3  # the floor
    assert lim.stats.cuts == 3


async def test_successes_raise_the_rate_slowly_up_to_the_ceiling() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate_rps=10, min_rate_rps=1, increase_rps=1)
    lim.on_throttled()
    assert lim.rate == 5
    for _ in range(5):  # one second's worth of successes at 5 rps
        lim.on_success()
    assert 5.9 < lim.rate < 6.1
    for _ in range(1000):
        lim.on_success()
    assert lim.rate == 10


async def test_retry_after_holds_back_every_new_request() -> None:
    clock = FakeClock(auto_advance=True)
    lim = limiter(clock, rate_rps=100)
    lim.on_throttled(retry_after=5)
    await lim.acquire()
    assert clock.monotonic() >= 5


async def test_slot_caps_concurrency() -> None:
    clock = FakeClock(auto_advance=True)
    lim = limiter(clock, rate_rps=1000, max_concurrency=2, burst=10)
    gate = asyncio.Event()
    peak = 0

    async def request() -> None:
        nonlocal peak
        async with lim.slot():
            peak = max(peak, lim.stats.in_flight)
            await gate.wait()

    tasks = [asyncio.create_task(request()) for _ in range(6)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert lim.stats.in_flight == 2
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 2
    assert lim.stats.in_flight == 0


# -- tokens ---------------------------------------------------------------------------------


class FakeIms:
    """Counts fetches; can hold them at a gate or fail a number of times first."""

    def __init__(self, lifetime: float = 1000.0) -> None:
        self.lifetime = lifetime
        self.fetches = 0
        self.gate: asyncio.Event | None = None
        self.failures: list[Exception] = []

    async def __call__(self) -> IssuedToken:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        return IssuedToken(f"token-{self.fetches}", self.lifetime)


def provider(ims: FakeIms, clock: FakeClock, margin: float = 300) -> TokenProvider:
    policy = Backoff(max_attempts=4, base_delay_s=1, max_delay_s=10, max_elapsed_s=60)
    return TokenProvider(ims, clock, policy=policy, rng=random.Random(5), margin_s=margin)


async def test_concurrent_callers_share_one_refresh() -> None:
    ims, clock = FakeIms(), FakeClock()
    tokens = provider(ims, clock)
    ims.gate = asyncio.Event()
    waiters = [asyncio.create_task(tokens.token()) for _ in range(25)]
    await asyncio.sleep(0)
    ims.gate.set()
    assert set(await asyncio.gather(*waiters)) == {"token-1"}
    assert ims.fetches == 1
    assert tokens.refreshes == 1


async def test_token_is_renewed_a_margin_before_expiry() -> None:
    ims, clock = FakeIms(lifetime=1000), FakeClock()
    tokens = provider(ims, clock, margin=300)
    assert await tokens.token() == "token-1"
    await clock.advance(699)
    assert await tokens.token() == "token-1"
    await clock.advance(2)
    assert await tokens.token() == "token-2"


async def test_a_short_lived_token_is_renewed_at_half_its_life() -> None:
    ims, clock = FakeIms(lifetime=100), FakeClock()
    tokens = provider(ims, clock, margin=300)
    await tokens.token()
    await clock.advance(49)
    assert await tokens.token() == "token-1"
    await clock.advance(2)
    assert await tokens.token() == "token-2"


async def test_invalidate_after_401s_leads_to_exactly_one_reauthentication() -> None:
    ims, clock = FakeIms(), FakeClock()
    tokens = provider(ims, clock)
    old = await tokens.token()
    for _ in range(5):  # five requests came back 401 with the same token
        tokens.invalidate(old)
    fresh = await asyncio.gather(*(tokens.token() for _ in range(5)))
    assert set(fresh) == {"token-2"}
    tokens.invalidate(old)  # a late 401 for the old token changes nothing
    assert await tokens.token() == "token-2"
    assert ims.fetches == 2
    assert "token-" not in repr(tokens)


async def test_transient_ims_failures_are_retried_with_backoff() -> None:
    ims, clock = FakeIms(), FakeClock(auto_advance=True)
    ims.failures = [ServerError("busy", status=503), TransportError("reset")]
    tokens = provider(ims, clock)
    assert await tokens.token() == "token-3"
    assert ims.fetches == 3
    assert clock.monotonic() > 0


async def test_refused_credentials_are_not_retried() -> None:
    ims, clock = FakeIms(), FakeClock(auto_advance=True)
    ims.failures = [AuthError("invalid_client: invalid client_secret parameter", status=401)]
    with pytest.raises(AuthError):
        await provider(ims, clock).token()
    assert ims.fetches == 1


async def test_ims_failures_give_up_under_the_policy() -> None:
    ims, clock = FakeIms(), FakeClock(auto_advance=True)
    ims.failures = [ServerError("down", status=500) for _ in range(10)]
    with pytest.raises(ServerError):
        await provider(ims, clock).token()
    assert ims.fetches == 4
