"""The admin API against its own OpenAPI document, with schemathesis: generated requests
(valid and invalid) never get a 5xx nor an answer the document does not describe, and a
protected operation never answers without the token.

Schemathesis is synchronous, so the emulator and the daemon (real clock, fast emulated
runs) run for the whole module in a thread with an event loop of its own.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from aep_emulator.app import serve
from exporter.clock import SystemClock
from exporter.daemon.assemble import build_daemon
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.ops.admin import OPENAPI_FILE, AdminServer, document
from exporter.settings import load_settings
from tests.conftest import default_knobs
from tests.daemon_support import write_config

DEADLINE = 30.0
TOKEN = "schema-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCUMENT = Path(__file__).parents[1] / "exporter" / "ops" / OPENAPI_FILE
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
    ignored_auth,
    negative_data_rejection,
    unsupported_method,
]

schema = schemathesis.openapi.from_path(DOCUMENT)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
)


@dataclass
class Live:
    url: str
    daemon: Daemon
    loop: asyncio.AbstractEventLoop
    dataset: str


async def _serve(folder: Path, started: threading.Event, box: dict[str, Any]) -> None:
    knobs = default_knobs(time_scale=0.001, not_ready_window_s=1)
    try:
        async with serve(knobs, folder / "emulator", clock=SystemClock()) as (url, state):
            (folder / "admin_token").write_text(TOKEN)
            config = write_config(folder, url, admin={"port": 0, "token_file": "admin_token"})
            daemon = build_daemon(load_settings(config), clock=SystemClock())
            (server,) = [s for s in daemon.services if isinstance(s, AdminServer)]
            task = asyncio.create_task(daemon.run())
            async with asyncio.timeout(DEADLINE):
                await daemon.ready.wait()
            made = await asyncio.to_thread(
                state.lake.create_dataset,
                "prod",
                "features",
                20,
                rng=random.Random(3),
                now_ms=state.clock.now_ms(),
            )
            box["live"] = Live(server.url, daemon, asyncio.get_running_loop(), made.id)
            started.set()
            box["exit"] = await task
    except BaseException as exc:
        box["error"] = exc
        raise
    finally:
        started.set()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("admin-schema")
    started = threading.Event()
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: asyncio.run(_serve(folder, started, box)), name="admin-live", daemon=True
    )
    thread.start()
    assert started.wait(DEADLINE), "the daemon did not start"
    if "error" in box:
        raise box["error"]
    running: Live = box["live"]
    try:
        yield running
    finally:
        running.loop.call_soon_threadsafe(running.daemon.stop)
        thread.join(DEADLINE)
    assert not thread.is_alive()
    assert box.get("exit") == EXIT_OK


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_the_api_keeps_to_its_document(case: schemathesis.Case[Any], live: Live) -> None:
    case.call_and_validate(base_url=live.url, headers=AUTH, checks=CHECKS)


def test_a_job_through_its_life_keeps_to_the_document(live: Live) -> None:
    """The answers random data rarely reach: accepted, duplicate, found, cancelled."""
    jobs = schema["/v1/jobs"]
    one = schema["/v1/jobs/{job_id}"]
    spec: dict[str, Any] = {
        "id": "life-1",
        "dataset_id": live.dataset,
        "destination": "lake",
        "path": "ml/life",
    }

    def call(case: schemathesis.Case[Any]) -> schemathesis.Response:
        return case.call_and_validate(base_url=live.url, headers=AUTH, checks=CHECKS)

    accepted = call(jobs["POST"].Case(body=spec, media_type="application/json"))
    assert accepted.status_code == 202
    assert call(jobs["POST"].Case(body=spec, media_type="application/json")).status_code == 409
    assert call(one["GET"].Case(path_parameters={"job_id": "life-1"})).status_code == 200
    listed = call(jobs["GET"].Case(query={"source": "http", "limit": 1}))
    assert listed.status_code == 200
    cancelled = call(one["DELETE"].Case(path_parameters={"job_id": "life-1"}))
    assert cancelled.status_code in (200, 409)  # 409: it finished first (runs are fast)
    assert call(one["DELETE"].Case(path_parameters={"job_id": "life-1"})).status_code == 409


def test_the_served_document_is_the_file_and_valid_openapi(live: Live) -> None:
    served = requests.get(f"{live.url}/v1/openapi.json", headers=AUTH, timeout=DEADLINE)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.content == DOCUMENT.read_bytes()
    assert json.loads(served.content) == document()
    loaded = schemathesis.openapi.from_dict(served.json())
    operations = set()
    for result in loaded.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation schemathesis cannot read
        operations.add((result.ok().method.upper(), result.ok().path))
    assert operations == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/v1/openapi.json"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("DELETE", "/v1/jobs/{job_id}"),
        ("GET", "/v1/lanes"),
        ("POST", "/v1/lanes/prune"),
    }
