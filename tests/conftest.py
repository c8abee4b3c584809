"""Shared fixtures: a real emulator on a loopback port, and a small client for it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from aep_emulator.app import serve
from aep_emulator.settings import DEFAULT_CLIENT_ID, Knobs
from aep_emulator.state import EmulatorState
from exporter.aep.facts import FLOW_SERVICE_PATH
from exporter.clock import FakeClock

# Storage servers on loopback (S3, Azure Blob, GCS, SFTP) and a GnuPG key pair, session-scoped,
# made on demand.
pytest_plugins = ["tests.storage_servers", "tests.pgp_support"]

EMULATOR_SECRET = "emulator-test-secret"
"""The client secret every test's emulator accepts (`Knobs` makes a random one otherwise, as
`aep-exporter emulator` does): a test credential, never a real one."""


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Emulator:
    """A running emulator, its state, its fake clock, and a client session."""

    url: str
    state: EmulatorState
    clock: FakeClock
    session: aiohttp.ClientSession
    data_dir: Path
    sandbox: str = "prod"
    _token: str | None = field(default=None, repr=False)

    @property
    def knobs(self) -> Knobs:
        return self.state.knobs

    async def token(self) -> str:
        if self._token is None:
            answer = await self.request(
                "POST",
                "/ims/token/v3",
                form={
                    "grant_type": "client_credentials",
                    "client_id": DEFAULT_CLIENT_ID,
                    "client_secret": EMULATOR_SECRET,
                    "scope": "openid,AdobeID",
                },
                auth=False,
            )
            assert answer.status == 200, answer.body
            self._token = answer.body["access_token"]
        return self._token

    async def headers(self, sandbox: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {await self.token()}",
            "x-api-key": DEFAULT_CLIENT_ID,
            "x-gw-ims-org-id": self.knobs.org_id,
            "x-sandbox-name": sandbox or self.sandbox,
        }

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: dict[str, str] | None = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        sandbox: str | None = None,
    ) -> Answer:
        sent = dict(await self.headers(sandbox)) if auth else {}
        sent.update(headers or {})
        async with self.session.request(
            method, self.url + path, json=json_body, data=form, params=params, headers=sent
        ) as resp:
            raw = await resp.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return Answer(resp.status, body, dict(resp.headers))

    async def fs(self, method: str, path: str, **kwargs: Any) -> Answer:
        """A Flow Service call: `path` is relative to /data/foundation/flowservice."""
        return await self.request(method, FLOW_SERVICE_PATH + path, **kwargs)

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.url}/_emulator{path}", json=body) as resp:
            payload = await resp.json()
            assert resp.status < 300, payload
            return payload

    async def seed(self, rows: int = 50, count: int = 1, sandbox: str = "prod") -> list[str]:
        made = await self.control(
            "POST", "/datasets", {"rows": rows, "count": count, "sandbox": sandbox, "seed": 7}
        )
        return [d["id"] for d in made["datasets"]]


def emulator_knobs(**changes: Any) -> Knobs:
    """`Knobs(**changes)` that accept the tests' `EMULATOR_SECRET` (a bare `Knobs()` makes a
    random secret, as `aep-exporter emulator` does)."""
    return Knobs(client_secret=EMULATOR_SECRET, **changes)


def default_knobs(**changes: Any) -> Knobs:
    """Test defaults: no latency, a short not-ready window and short runs (emulated)."""
    base: dict[str, Any] = {
        "client_secret": EMULATOR_SECRET,
        "not_ready_window_s": 60,
        "run_duration_s": {"min": 5, "max": 5},
        "seed": 1234,
    }
    return Knobs.model_validate({**base, **changes})


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in-process (`check`, `status`, …) configures structlog for the whole
    process, as a CLI's edge does: its level and its stream (the test's captured stderr,
    closed afterwards) must not reach the tests after it."""
    saved = structlog.get_config()
    saved["processors"] = list(saved["processors"])
    yield
    structlog.configure(**saved)


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs()


@pytest.fixture
async def emulator(tmp_path: Path, knobs: Knobs) -> AsyncIterator[Emulator]:
    clock = FakeClock(auto_advance=True)
    async with (
        serve(knobs, tmp_path / "emulator", clock=clock) as (url, state),
        aiohttp.ClientSession() as session,
    ):
        yield Emulator(url, state, clock, session, tmp_path / "emulator")
