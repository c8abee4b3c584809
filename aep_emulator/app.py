"""The emulator's aiohttp application and a helper to serve it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from aep_emulator import connections as conn
from aep_emulator import control, flows, landingzone, queryservice, runs
from aep_emulator.clock import Clock, SystemClock
from aep_emulator.facts import ADHOC_PATH, FLOW_SERVICE_PATH, IMS_TOKEN_PATH, LANDING_ZONE_PATH
from aep_emulator.gateway import STATE_KEY, ims_token
from aep_emulator.middleware import MIDDLEWARES
from aep_emulator.settings import Knobs
from aep_emulator.state import EmulatorState


def create_app(knobs: Knobs, data_dir: Path, *, clock: Clock | None = None) -> web.Application:
    """An emulator serving AEP's API paths, with its state kept in `data_dir`."""
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=knobs.max_body_bytes)
    app[STATE_KEY] = EmulatorState(knobs, data_dir, clock or SystemClock())
    r = app.router
    fs = FLOW_SERVICE_PATH
    r.add_post(IMS_TOKEN_PATH, ims_token, name="ims.token")
    r.add_get(f"{fs}/connectionSpecs", conn.list_connection_specs, name="connectionSpecs.list")
    r.add_get(f"{fs}/connectionSpecs/{{id}}", conn.get_connection_spec, name="connectionSpecs.get")
    r.add_get(
        f"{fs}/connectionSpecs/{{id}}/configs",
        conn.exportable_datasets,
        name="connectionSpecs.configs",
    )
    r.add_get(f"{fs}/flowSpecs", conn.list_flow_specs, name="flowSpecs.list")
    r.add_get(f"{fs}/flowSpecs/{{id}}", conn.get_flow_spec, name="flowSpecs.get")
    for path, collection, create in (
        ("connections", conn.CONNECTIONS, conn.create_connection),
        ("sourceConnections", conn.SOURCE_CONNECTIONS, conn.create_source_connection),
        ("targetConnections", conn.TARGET_CONNECTIONS, conn.create_target_connection),
        ("flows", flows.FLOWS, flows.create_flow),
    ):
        r.add_post(f"{fs}/{path}", create, name=f"{path}.create")
        r.add_get(f"{fs}/{path}", collection.list, name=f"{path}.list")
        r.add_get(f"{fs}/{path}/{{id}}", collection.get, name=f"{path}.get")
        r.add_delete(f"{fs}/{path}/{{id}}", collection.delete, name=f"{path}.delete")
    r.add_patch(f"{fs}/flows/{{id}}", flows.patch_flow, name="flows.patch")
    r.add_post(f"{fs}/flows/{{id}}/action", flows.flow_action, name="flows.action")
    r.add_get(f"{fs}/runs", runs.list_runs, name="runs.list")
    r.add_get(f"{fs}/runs/{{id}}", runs.get_run, name="runs.get")
    r.add_post(ADHOC_PATH, runs.adhoc_run, name="adhoc.run")
    r.add_get(
        f"{LANDING_ZONE_PATH}/credentials",
        landingzone.get_credentials,
        name="landingzone.credentials",
    )
    r.add_post(
        f"{LANDING_ZONE_PATH}/credentials",
        landingzone.refresh_credentials,
        name="landingzone.refresh",
    )
    r.add_get(LANDING_ZONE_PATH, landingzone.container_info, name="landingzone.info")
    queryservice.add_routes(app)
    control.add_routes(app)
    return app


@asynccontextmanager
async def serve(
    knobs: Knobs,
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock | None = None,
) -> AsyncIterator[tuple[str, EmulatorState]]:
    """Run the emulator until the block exits; yields its base URL and its state."""
    app = create_app(knobs, data_dir, clock=clock)
    # Held requests (delay and slow faults) are not waited for at shutdown.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        bound = runner.addresses[0][1] if runner.addresses else port
        yield f"http://{host}:{bound}", app[STATE_KEY]
    finally:
        await runner.cleanup()
