"""`HttpAep` through real HTTP against the emulator, with faults: retries and their limits,
reconciliation of lost answers, token expiry, the ad hoc service's refusals, paging, TLS and
secrets. Client and emulator share the fixture's auto-advancing fake clock, so every backoff
and wait passes in virtual time."""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from exporter.aep.adhoc import TriggerOutcomeUnknown
from exporter.aep.api import Collection, FlowInfo
from exporter.aep.client import HttpAep
from exporter.aep.envelopes import TlsError
from exporter.aep.facts import STORAGE_SPECS, StorageType
from exporter.errors import (
    AdhocError,
    AdhocNotEnabled,
    AepError,
    AuthError,
    FlowDisabled,
    NotReadyError,
    PreconditionFailed,
    RequestError,
    RunInProgress,
    SendWindowMissed,
    ServerError,
    TransportError,
)
from tests import workflow
from tests.aepclient_support import build_flow, config_for, journal
from tests.conftest import EMULATOR_SECRET, Emulator

T = TypeVar("T")
WINDOW = 60.0  # default_knobs: a new flow is "not ready" for this long
RUN_SECONDS = 5.0


async def _gather(aws: Iterable[Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*aws))


def client(emulator: Emulator, **changes: Any) -> HttpAep:
    page_size = changes.pop("page_size", 100)
    return HttpAep.from_config(
        config_for(emulator, **changes),
        clock=emulator.clock,
        rng=random.Random(11),
        page_size=page_size,
    )


@pytest.fixture
async def aep(emulator: Emulator) -> AsyncIterator[HttpAep]:
    async with client(emulator) as api:
        yield api


async def fault(emulator: Emulator, **spec: Any) -> None:
    await emulator.control("POST", "/faults", spec)


async def knobs(emulator: Emulator, **changes: Any) -> None:
    await emulator.control("PATCH", "/config", changes)


async def statuses(emulator: Emulator, op: str) -> list[int]:
    return [e["status"] for e in await journal(emulator, op)]


async def ready_flow(emulator: Emulator, aep: HttpAep, prefix: str = "t") -> tuple[str, str]:
    [dataset] = await emulator.seed(rows=5)
    built = await build_flow(aep, [dataset], prefix=prefix)
    await emulator.clock.advance(WINDOW)
    return built.flow_id, dataset


# -- plain calls ----------------------------------------------------------------------------


async def test_entities_round_trip_in_the_configured_sandbox(emulator: Emulator) -> None:
    [dataset] = await emulator.seed(rows=5, sandbox="dev")
    async with client(emulator, sandbox="dev") as aep:
        built = await build_flow(aep, [dataset])
        flow = await aep.get("flows", built.flow_id)
        assert flow is not None
        assert flow["sandboxName"] == "dev"
        info = FlowInfo.parse(flow)
        assert info.source_connection_ids == (built.source_id,)
        assert info.etag.startswith('"')
        assert info.state == "enabled"
        assert [f["id"] for f in await aep.find_by_name("flows", "t-flow")] == [built.flow_id]
        assert await aep.get("flows", "no-such-flow") is None
    assert (await emulator.fs("GET", f"/flows/{built.flow_id}")).status == 404  # not in prod


async def test_patch_action_and_delete(emulator: Emulator, aep: HttpAep) -> None:
    flow_id, _ = await ready_flow(emulator, aep)
    flow = await aep.get("flows", flow_id)
    assert flow is not None
    etag = await aep.patch_flow(
        flow_id, flow["etag"], [{"op": "replace", "path": "/name", "value": "renamed"}]
    )
    assert etag != flow["etag"]
    with pytest.raises(PreconditionFailed) as stale:
        await aep.patch_flow(
            flow_id, flow["etag"], [{"op": "replace", "path": "/name", "value": "x"}]
        )
    assert stale.value.status == 412
    assert stale.value.retryable
    assert stale.value.code == "FLOW-1404-412"
    assert await statuses(emulator, "flows.patch") == [200, 412]  # a stale etag is not resent
    first = await aep.flow_action(flow_id, "disable")
    assert await aep.flow_action(flow_id, "disable") == first  # already disabled: fine
    assert (await aep.get("flows", flow_id) or {})["state"] == "disabled"
    await aep.delete("flows", flow_id)
    assert await aep.get("flows", flow_id) is None
    await aep.delete("flows", flow_id)  # already gone: fine


@pytest.mark.parametrize("name", ["a,b", "a", "a,b,c", ",lead", "=eq", "x+y &z=1#%/?", "ü n"])
async def test_find_by_name_is_exact_for_names_the_filter_language_cannot_say(
    emulator: Emulator, name: str
) -> None:
    async with client(emulator, page_size=2) as aep:
        others = ["a", "a,b", "a,bc", "b", "x+y", "=eq2", "ü"]
        for other in [*others, name]:
            body = workflow.base_connection(StorageType.DLZ, other)
            await aep.create("connections", body)
        found = await aep.find_by_name("connections", name)
        assert [f["name"] for f in found] == [name] * (1 + others.count(name))


# -- retries --------------------------------------------------------------------------------


async def test_5xx_and_dropped_connections_on_get_are_retried(
    emulator: Emulator, aep: HttpAep
) -> None:
    base = await aep.create("connections", workflow.base_connection(StorageType.DLZ, "b"))
    await fault(emulator, action="status", status=503, op="connections.get", count=2)
    await fault(emulator, action="drop", op="connections.get", count=2)
    assert (await aep.get("connections", base) or {})["id"] == base
    assert await statuses(emulator, "connections.get") == [503, 503, 599, 599, 200]


@pytest.mark.parametrize("retry_after", ["always", "never"])
async def test_a_429_storm_is_ridden_out_and_slows_the_limiter(
    emulator: Emulator, retry_after: str
) -> None:
    await knobs(emulator, rate_limit_rps=2, rate_limit_burst=2, retry_after=retry_after)
    async with client(emulator, max_attempts=30, rate_limit_rps=50, max_concurrency=16) as aep:
        results = await _gather(aep.find_by_name("flows", f"f{i}") for i in range(30))
        stats = aep.transport.limiter.stats
    assert results == [[] for _ in range(30)]
    throttled = (await statuses(emulator, "flows.list")).count(429)
    assert throttled > 0
    assert stats.throttled == throttled
    assert stats.rate_rps < 50
    assert stats.cuts >= 1


async def test_retries_are_bounded_and_errors_say_whether_to_retry(
    emulator: Emulator, aep: HttpAep
) -> None:
    await fault(emulator, action="status", status=500, op="flows.list", count=100)
    with pytest.raises(ServerError) as server:
        await aep.find_by_name("flows", "x")
    assert server.value.retryable
    assert server.value.status == 500
    assert server.value.operation == "flows.list"
    assert server.value.code == "FLOW-1102-500"
    assert len(await journal(emulator, "flows.list")) == 8  # max_attempts
    await emulator.control("DELETE", "/faults")
    await fault(emulator, action="drop", op="flows.get", count=100)
    with pytest.raises(TransportError) as dropped:
        await aep.get("flows", "f")
    assert dropped.value.retryable
    assert dropped.value.__cause__ is not None
    with pytest.raises(RequestError) as bad:
        await aep.create("flows", {"name": "broken", "flowSpec": {"id": "nope"}})
    assert not bad.value.retryable
    assert bad.value.status == 400
    assert bad.value.code is not None
    assert bad.value.code.startswith("FLOW-")
    assert await statuses(emulator, "flows.create") == [400]


# -- lost answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("collection", ["connections", "flows"])
async def test_a_lost_create_answer_is_reconciled_by_name(
    emulator: Emulator, aep: HttpAep, collection: Collection
) -> None:
    await fault(emulator, action="drop_after", op=f"{collection}.create")
    [dataset] = await emulator.seed(rows=5)
    built = await build_flow(aep, [dataset], prefix="lost")
    name = f"lost-{'base' if collection == 'connections' else 'flow'}"
    made = built.base_id if collection == "connections" else built.flow_id
    assert [e["id"] for e in await aep.find_by_name(collection, name)] == [made]
    assert await statuses(emulator, f"{collection}.create") == [599]  # one POST, it took effect


async def test_a_create_dropped_before_it_took_effect_is_sent_again(
    emulator: Emulator, aep: HttpAep
) -> None:
    await fault(emulator, action="drop", op="connections.create")
    made = await aep.create("connections", workflow.base_connection(StorageType.DLZ, "again"))
    assert [e["id"] for e in await aep.find_by_name("connections", "again")] == [made]
    assert await statuses(emulator, "connections.create") == [599, 201]


async def test_a_trigger_whose_answer_was_lost_is_not_sent_again(
    emulator: Emulator, aep: HttpAep
) -> None:
    flow_id, dataset = await ready_flow(emulator, aep)
    await fault(emulator, action="drop_after", op="adhoc.run")
    with pytest.raises(TriggerOutcomeUnknown) as lost:
        await aep.trigger(flow_id, dataset)
    assert not lost.value.retryable
    assert isinstance(lost.value, TransportError)
    assert await statuses(emulator, "adhoc.run") == [599]
    [run] = await aep.runs_of_flow(flow_id, lost.value.sent_at_ms)  # how the engine reconciles
    assert run.status == "processing"
    await fault(emulator, action="status", status=503, op="adhoc.run")
    await emulator.clock.advance(RUN_SECONDS)
    with pytest.raises(TriggerOutcomeUnknown):
        await aep.trigger(flow_id, dataset)
    assert await statuses(emulator, "adhoc.run") == [599, 503]


# -- tokens ---------------------------------------------------------------------------------


async def test_a_short_lived_token_is_renewed_before_it_expires(
    emulator: Emulator, aep: HttpAep
) -> None:
    await knobs(emulator, token_lifetime_s=120)
    await aep.find_by_name("flows", "x")
    await emulator.clock.advance(100)
    await aep.find_by_name("flows", "x")
    assert len(await journal(emulator, "ims.token")) == 2
    assert 401 not in await statuses(emulator, "flows.list")


async def test_a_token_expired_at_the_gateway_means_one_reauthentication(
    emulator: Emulator, aep: HttpAep
) -> None:
    await knobs(emulator, token_lifetime_s=300)
    await aep.find_by_name("flows", "x")
    await emulator.control("POST", "/clock", {"advance": 400})  # the server's clock only
    results = await _gather(aep.find_by_name("flows", f"f{i}") for i in range(10))
    assert results == [[] for _ in range(10)]
    assert len(await journal(emulator, "ims.token")) == 2
    assert aep.transport.tokens.refreshes == 2
    assert 401 in await statuses(emulator, "flows.list")


async def test_a_reauthentication_does_not_use_up_an_attempt_of_the_backoff(
    emulator: Emulator,
) -> None:
    """With two attempts allowed, a 401 (a new token, at once) and then a 503 still leave
    the second attempt: the re-authentication belongs to the attempt that met it."""
    await fault(emulator, action="status", status=401, op="flows.list")
    await fault(emulator, action="status", status=503, op="flows.list")
    async with client(emulator, max_attempts=2) as api:
        assert await api.find_by_name("flows", "x") == []
    assert await statuses(emulator, "flows.list") == [401, 503, 200]


# -- the ad hoc service ---------------------------------------------------------------------


async def test_trigger_refusals_map_to_the_engines_errors(emulator: Emulator, aep: HttpAep) -> None:
    [dataset] = await emulator.seed(rows=5)
    built = await build_flow(aep, [dataset])
    with pytest.raises(NotReadyError) as young:
        await aep.trigger(built.flow_id, dataset)
    assert young.value.retryable
    assert young.value.status == 400
    await emulator.clock.advance(WINDOW)
    run_id = await aep.trigger(built.flow_id, dataset)
    with pytest.raises(RunInProgress) as busy:
        await aep.trigger(built.flow_id, dataset)
    assert busy.value.run_id == run_id
    assert not busy.value.retryable
    spec = STORAGE_SPECS[StorageType.DLZ].dataset_flow_spec_id
    await knobs(emulator, adhoc_disabled_flow_specs=[spec])
    with pytest.raises(AdhocNotEnabled) as off:
        await aep.trigger(built.flow_id, dataset)
    assert "dataset export is not enabled" in str(off.value)
    assert spec in str(off.value)
    await knobs(emulator, adhoc_disabled_flow_specs=[])
    await aep.flow_action(built.flow_id, "disable")
    with pytest.raises(AdhocError) as disabled:
        await aep.trigger(built.flow_id, dataset)
    assert type(disabled.value) is FlowDisabled
    assert await statuses(emulator, "adhoc.run") == [400, 200, 400, 400, 400]


async def test_a_trigger_held_past_its_send_by_time_is_not_sent(
    emulator: Emulator, aep: HttpAep
) -> None:
    """A fenced trigger must be on the wire while the job's lease still holds: when the rate
    limit holds it longer (here a 429's Retry-After of 30 s), it is not sent at all."""
    datasets = await emulator.seed(rows=1)
    built = await build_flow(aep, datasets)
    await emulator.clock.advance(WINDOW)
    clock = emulator.clock
    aep.transport.limiter.on_throttled(30)
    with pytest.raises(SendWindowMissed) as missed:
        await aep.trigger_many(built.flow_id, datasets, send_by=clock.monotonic() + 10)
    assert missed.value.retryable
    assert "20.0 s after" in str(missed.value)
    assert await statuses(emulator, "adhoc.run") == []  # nothing reached AEP
    assert not list(emulator.state.all_runs())
    # Asked again within its window, it goes.
    runs = await aep.trigger_many(built.flow_id, datasets, send_by=clock.monotonic() + 10)
    assert set(runs) == set(datasets)
    assert await statuses(emulator, "adhoc.run") == [200]


async def test_get_runs_asks_in_batches_and_follows_pages(emulator: Emulator) -> None:
    await knobs(emulator, run_failure_rate=1.0)  # failed runs write no files: fast
    datasets = await emulator.seed(rows=1, count=12)
    async with client(emulator, page_size=30) as aep:
        built = await build_flow(aep, datasets)
        await emulator.clock.advance(WINDOW)
        made: list[str] = []
        for _ in range(10):
            body = {
                "activationInfo": {
                    "destinations": [
                        {"flowId": built.flow_id, "datasets": [{"id": d} for d in datasets]}
                    ]
                }
            }
            answer = await emulator.request(
                "POST",
                "/data/core/activation/disflowprovider/adhocrun",
                json_body=body,
                headers={
                    "Accept": "application/vnd.adobe.adhoc.dataset.activation+json; version=1"
                },
            )
            assert answer.status == 200, answer.body
            made += [
                d["statusURL"].rsplit("/", 1)[-1]
                for d in answer.body["destinations"][0]["datasets"]
            ]
            await emulator.clock.advance(RUN_SECONDS)
        unknown = [f"00000000-0000-0000-0000-{i:012d}" for i in range(130)]
        asked = [x for pair in zip(made, unknown[:120], strict=True) for x in pair] + unknown[120:]
        assert len(asked) == 250
        found = await aep.get_runs(asked)
        assert set(found) == set(made)
        assert all(r.terminal and r.status == "failed" for r in found.values())
        lists = len(await journal(emulator, "runs.list"))
        assert lists > 3  # three batches of at most 100 ids, each more than one page
        runs = await aep.runs_of_flow(built.flow_id, 0)
        assert sorted(r.id for r in runs) == sorted(made)
        assert [r.created_at_ms for r in runs] == sorted(
            (r.created_at_ms for r in runs), reverse=True
        )
        later = await aep.runs_of_flow(built.flow_id, runs[0].created_at_ms)
        assert {r.id for r in later} == {
            r.id for r in runs if r.created_at_ms == runs[0].created_at_ms
        }
        # The engine's mark: the newest run of the flow, in one answer of one run.
        before = len(await journal(emulator, "runs.list"))
        newest = await aep.newest_run(built.flow_id, 0)
        assert newest is not None
        assert newest.id in {r.id for r in later}
        assert len(await journal(emulator, "runs.list")) == before + 1
        assert await aep.newest_run(built.flow_id, runs[0].created_at_ms + 1) is None


# -- TLS and secrets ------------------------------------------------------------------------


async def test_tls_verification_is_always_on(emulator: Emulator) -> None:
    async with client(emulator) as aep:
        context = aep.transport.ssl_context
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert aep.transport.session.connector is not None


@asynccontextmanager
async def stub_server(
    app: web.Application, context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield f"{'https' if context else 'http'}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a freshly made self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(  # noqa: S603 - fixed arguments
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("where", ["ims_url", "platform_url"])
async def test_a_self_signed_certificate_is_refused_without_retrying(
    emulator: Emulator, self_signed: ssl.SSLContext, where: str
) -> None:
    hits = 0

    async def anything(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"items": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    async with stub_server(app, self_signed) as url:
        with capture_logs() as logs:
            async with client(emulator, **{where: url}) as aep:
                with pytest.raises(TlsError) as refused:
                    await aep.find_by_name("flows", "x")
    assert not refused.value.retryable
    assert "certificate" in str(refused.value).lower()
    assert hits == 0
    assert not [e for e in logs if e["event"] in ("aep_request_retry", "aep_token_retry")]


def _texts(error: BaseException) -> list[str]:
    out: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        out += [str(seen), repr(seen), repr(seen.args), repr(vars(seen))]
        seen = seen.__cause__ or seen.__context__
    return out


async def test_no_secret_in_logs_errors_or_reprs(emulator: Emulator) -> None:
    wrong = "wrong-secret-4711"
    errors: list[AepError] = []
    await knobs(emulator, token_lifetime_s=300)
    with capture_logs() as logs:
        async with client(emulator) as aep:
            await fault(emulator, action="status", status=503, op="flows.list", count=2)
            await aep.find_by_name("flows", "x")
            await emulator.control("POST", "/clock", {"advance": 400})
            await aep.find_by_name("flows", "y")  # 401, then a fresh token
            await fault(emulator, action="drop", op="flows.get", count=100)
            with pytest.raises(TransportError) as dropped:
                await aep.get("flows", "z")
            errors.append(dropped.value)
            reprs = [repr(aep), repr(aep.transport), repr(aep.transport.tokens)]
            reprs += [repr(aep.transport.config), str(aep.transport.config)]
        async with client(emulator, client_secret=wrong) as bad:
            with pytest.raises(AuthError) as refused:
                await bad.find_by_name("flows", "x")
            errors.append(refused.value)
    assert "invalid client_secret parameter" in refused.value.message
    assert not refused.value.retryable
    assert refused.value.status == 401
    assert (await statuses(emulator, "ims.token")).count(401) == 1  # not retried
    events = {e["event"] for e in logs}
    assert {"aep_request_retry", "aep_request_reauth", "aep_token_refreshed"} <= events
    texts = [repr(e) for e in logs] + reprs + [t for e in errors for t in _texts(e)]
    for secret in [EMULATOR_SECRET, wrong, *emulator.state.tokens]:
        assert not [t for t in texts if secret in t]


async def test_against_a_stub_aep_headers_relative_links_and_an_unnamed_running_run(
    emulator: Emulator,
) -> None:
    """A server that answers as AEP's documents show where the emulator does not: a
    `_links.next.href` relative to Flow Service, and "already going on" without a run id."""
    seen: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "stub-token", "expires_in": 86399})

    async def adhoc(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"message": "Run already going on for dataset d1"}, status=400)

    async def runs(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if "continuationToken" not in request.query:
            # (a server that ignores the status filter: the client still skips a finished run)
            done = {
                "statusSummary": {"status": "success"},
                "durationSummary": {"completedAtUTC": 1},
            }
            page = {"id": "old", "flowId": "f1", "createdAt": 1, "metrics": done}
            links = {"next": {"href": "/runs?continuationToken=p2"}}
            return web.json_response({"items": [page], "_links": links})
        running = {"id": "r-9", "flowId": "f1", "createdAt": 2, "metrics": {}}
        return web.json_response({"items": [running]})

    app = web.Application()
    app.router.add_post("/ims/token/v3", token)
    app.router.add_post("/data/core/activation/disflowprovider/adhocrun", adhoc)
    app.router.add_get("/data/foundation/flowservice/runs", runs)
    async with (
        stub_server(app) as url,
        client(emulator, platform_url=url, ims_url=url, sandbox="dev") as aep,
    ):
        with pytest.raises(RunInProgress) as busy:
            await aep.trigger("f1", "d1")
    assert busy.value.run_id == "r-9"
    posted, *listed = seen
    assert len(listed) == 2
    assert posted["Authorization"] == "Bearer stub-token"
    assert posted["x-api-key"] == "emulator-client"
    assert posted["x-gw-ims-org-id"] == emulator.knobs.org_id
    assert posted["x-sandbox-name"] == "dev"
    assert posted["Content-Type"] == "application/json"
    assert posted["Accept"] == "application/vnd.adobe.adhoc.dataset.activation+json; version=1"
    assert "Content-Type" not in listed[0]


@pytest.mark.parametrize("call", ["trigger", "read"])
async def test_a_call_that_could_not_get_a_token_was_not_sent_nor_retried_again(
    emulator: Emulator, call: str
) -> None:
    """A trigger without a token is never sent. And the token provider retries IMS with its
    own backoff: the call that asked for the token must not retry that again (3 x 3 calls;
    an unreachable host kept `export` silent for 14 s)."""
    ims_calls = 0

    async def unavailable(request: web.Request) -> web.Response:
        nonlocal ims_calls
        ims_calls += 1
        return web.json_response({"error": "server_error"}, status=503)

    app = web.Application()
    app.router.add_post("/ims/token/v3", unavailable)
    async with stub_server(app) as url, client(emulator, ims_url=url, max_attempts=3) as aep:
        attempt: Awaitable[object] = (
            aep.trigger("f1", "d1") if call == "trigger" else aep.get("flows", "f1")
        )
        with pytest.raises(ServerError) as failed:
            await attempt
    assert not isinstance(failed.value, TriggerOutcomeUnknown)
    assert failed.value.operation == "ims.token"
    assert failed.value.retryable
    assert ims_calls == 3
    assert await journal(emulator, "adhoc.run") == []


async def test_a_refused_name_range_falls_back_to_comparing_every_entity(
    emulator: Emulator,
) -> None:
    asked: list[list[str]] = []

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "stub-token", "expires_in": 86399})

    async def connections(request: web.Request) -> web.Response:
        asked.append(request.query.getall("property", []))
        if any(">=" in p for p in request.query.getall("property", [])):
            return web.json_response({"message": "Invalid operator >= for name"}, status=400)
        names = ["a,b", "a", "b", "a,b"]
        items = [{"id": f"c{i}", "name": n, "createdAt": i} for i, n in enumerate(names)]
        return web.json_response({"items": items})

    app = web.Application()
    app.router.add_post("/ims/token/v3", token)
    app.router.add_get("/data/foundation/flowservice/connections", connections)
    async with stub_server(app) as url, client(emulator, platform_url=url, ims_url=url) as aep:
        found = await aep.find_by_name("connections", "a,b")
    assert [c["id"] for c in found] == ["c3", "c0"]
    assert asked == [["name>=a", "name<=a\U0010ffff"], []]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("where", ["ims", "platform"])
async def test_a_redirect_is_refused_and_nothing_goes_to_the_other_origin(
    emulator: Emulator, status: int, where: str
) -> None:
    """A 3xx is an error, never followed: the IMS form (the client secret) and Flow Service
    bodies (a base connection's credentials) must not be re-sent to another origin."""
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(f"{request.method} {request.path} {await request.text()}")
        return web.json_response({"access_token": "stolen", "expires_in": 3600, "id": "x"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    async with stub_server(other) as other_url:

        async def redirect(request: web.Request) -> web.Response:
            location = f"{other_url}{request.path_qs}"
            return web.Response(status=status, headers={"Location": location})

        redirector = web.Application()
        redirector.router.add_route("*", "/{tail:.*}", redirect)
        async with stub_server(redirector) as redirect_url:
            config = config_for(emulator, **{f"{where}_url": redirect_url})
            async with HttpAep.from_config(config, clock=emulator.clock) as api:
                with pytest.raises(AepError) as refused:
                    await api.create("connections", workflow.base_connection(StorageType.SFTP))
    assert reached == []
    assert f"HTTP {status}" in str(refused.value)
    assert "redirects are not followed" in str(refused.value)
    assert EMULATOR_SECRET not in str(refused.value)
    assert not refused.value.retryable
