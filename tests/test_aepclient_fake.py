"""`FakeAep` behaves like `HttpAep` talking to the emulator: one script runs against both.
Then what only the fake offers: scripted failures, call counts, run outcomes."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from exporter.aep.adhoc import TriggerOutcomeUnknown
from exporter.aep.api import AepApi, FlowInfo
from exporter.aep.client import HttpAep
from exporter.aep.facts import STORAGE_SPECS, StorageType
from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.errors import (
    AdhocError,
    AdhocNotEnabled,
    FlowDisabled,
    NotReadyError,
    PreconditionFailed,
    RequestError,
    RunInProgress,
    ServerError,
)
from tests.aepclient_support import build_flow, config_for
from tests.conftest import Emulator

WINDOW = 60.0  # the emulator fixture's not-ready window; the fake is set up alike
RUN_SECONDS = 5.0
DLZ_SPEC = STORAGE_SPECS[StorageType.DLZ].dataset_flow_spec_id


@dataclass
class World:
    """An `AepApi` with the clock it runs on and a dataset it can export."""

    api: AepApi
    clock: FakeClock
    dataset_id: str
    emulator: Emulator | None = None
    fake: FakeAep | None = None

    async def disable_adhoc(self, spec_ids: list[str]) -> None:
        if self.emulator is not None:
            await self.emulator.control("PATCH", "/config", {"adhoc_disabled_flow_specs": spec_ids})
        if self.fake is not None:
            self.fake.adhoc_disabled_flow_specs = set(spec_ids)


@pytest.fixture(params=["fake", "emulator"])
def backend(request: pytest.FixtureRequest) -> Emulator | None:
    """None for the fake; the emulator is started only for its half of the parametrization."""
    if request.param == "fake":
        return None
    emulator: Emulator = request.getfixturevalue("emulator")
    return emulator


@pytest.fixture
async def world(backend: Emulator | None) -> AsyncIterator[World]:
    if backend is None:
        clock = FakeClock(auto_advance=True)
        async with FakeAep(clock, ready_after_s=WINDOW, run_duration_s=RUN_SECONDS) as fake:
            yield World(fake, clock, "dataset-1", fake=fake)
        return
    [dataset] = await backend.seed(rows=5)
    config = config_for(backend)
    async with HttpAep.from_config(config, clock=backend.clock, rng=random.Random(3)) as aep:
        yield World(aep, backend.clock, dataset, emulator=backend)


async def test_the_export_script_runs_the_same_on_fake_and_emulator(world: World) -> None:
    api, clock = world.api, world.clock
    built = await build_flow(api, [world.dataset_id], prefix="parity")
    [found] = await api.find_by_name("flows", "parity-flow")
    flow = FlowInfo.parse(found)
    assert (flow.id, flow.state, flow.flow_spec_id) == (built.flow_id, "enabled", DLZ_SPEC)
    assert flow.source_connection_ids == (built.source_id,)
    assert flow.etag.startswith('"')
    assert await api.find_by_name("flows", "parity") == []
    assert await api.get("flows", "00000000-0000-0000-0000-000000000000") is None

    with pytest.raises(NotReadyError) as young:
        await api.trigger(built.flow_id, world.dataset_id)
    assert young.value.retryable
    await clock.advance(WINDOW)
    run_id = await api.trigger(built.flow_id, world.dataset_id)
    with pytest.raises(RunInProgress) as busy:
        await api.trigger(built.flow_id, world.dataset_id)
    assert busy.value.run_id == run_id

    runs = await api.get_runs([run_id, "00000000-0000-0000-0000-000000000001"])
    assert list(runs) == [run_id]
    assert runs[run_id].status == "processing"
    assert not runs[run_id].terminal
    await clock.advance(RUN_SECONDS)
    done = (await api.get_runs([run_id]))[run_id]
    assert done.succeeded
    assert done.output_files >= 1
    assert done.flow_id == built.flow_id
    assert [r.id for r in await api.runs_of_flow(built.flow_id, 0)] == [run_id]
    assert await api.runs_of_flow(built.flow_id, done.created_at_ms + 1) == []

    await world.disable_adhoc([DLZ_SPEC])
    with pytest.raises(AdhocNotEnabled):
        await api.trigger(built.flow_id, world.dataset_id)
    await world.disable_adhoc([])

    etag = await api.patch_flow(
        flow.id, flow.etag, [{"op": "replace", "path": "/description", "value": "d"}]
    )
    assert etag != flow.etag
    with pytest.raises(PreconditionFailed):
        await api.patch_flow(flow.id, flow.etag, [{"op": "replace", "path": "/name", "value": "x"}])
    disabled = await api.flow_action(flow.id, "disable")
    assert await api.flow_action(flow.id, "disable") == disabled
    with pytest.raises(AdhocError) as off:
        await api.trigger(built.flow_id, world.dataset_id)
    assert type(off.value) is FlowDisabled

    with pytest.raises(RequestError):  # in use by the flow
        await api.delete("sourceConnections", built.source_id)
    await api.delete("flows", flow.id)
    assert await api.get("flows", flow.id) is None
    await api.delete("flows", flow.id)
    await api.delete("sourceConnections", built.source_id)
    assert await api.get("sourceConnections", built.source_id) is None


# -- the fake's own knobs -------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeAep:
    return FakeAep(FakeClock(auto_advance=True), ready_after_s=0, run_duration_s=10)


async def test_calls_are_counted_per_operation(fake: FakeAep) -> None:
    built = await build_flow(fake, ["d"])
    await fake.find_by_name("flows", "t-flow")
    assert fake.calls["flows.create"] == 1
    assert fake.calls["connections.create"] == 1
    assert fake.calls["flows.list"] == 1
    assert len(fake.entities["flows"]) == 1
    assert built.flow_id in fake.entities["flows"]


async def test_scripted_failures_before_and_after_the_effect(fake: FakeAep) -> None:
    fake.fail_next("flows.list", ServerError("busy", status=503), times=2)
    for _ in range(2):
        with pytest.raises(ServerError):
            await fake.find_by_name("flows", "x")
    assert await fake.find_by_name("flows", "x") == []

    built = await build_flow(fake, ["d"])
    lost = TriggerOutcomeUnknown("lost", flow_id=built.flow_id, dataset_id="d", sent_at_ms=0)
    fake.fail_next("adhoc.run", lost, after=True)
    with pytest.raises(TriggerOutcomeUnknown):
        await fake.trigger(built.flow_id, "d")
    [run] = await fake.runs_of_flow(built.flow_id, 0)  # it started all the same
    assert run.status == "processing"
    assert fake.calls["adhoc.run"] == 1


@pytest.mark.parametrize(
    ("outcome", "status", "files", "errors"),
    [("success", "success", 1, 0), ("failed", "failed", 0, 1), ("partial", "success", 1, 1)],
)
async def test_runs_end_with_the_configured_outcome(
    fake: FakeAep, outcome: str, status: str, files: int, errors: int
) -> None:
    fake.run_outcome = outcome  # type: ignore[assignment]
    built = await build_flow(fake, ["d"])
    run_id = await fake.trigger(built.flow_id, "d")
    await fake.clock.sleep(10)
    run = (await fake.get_runs([run_id]))[run_id]
    assert run.terminal
    assert (run.status, run.output_files, len(run.errors)) == (status, files, errors)


async def test_a_run_set_to_never_finish_stays_processing(fake: FakeAep) -> None:
    fake.run_outcome = "never"
    built = await build_flow(fake, ["d"])
    run_id = await fake.trigger(built.flow_id, "d")
    await fake.clock.sleep(86_400)
    assert (await fake.get_runs([run_id]))[run_id].status == "processing"
    with pytest.raises(RunInProgress):
        await fake.trigger(built.flow_id, "d")


async def test_flows_must_link_existing_connections(fake: FakeAep) -> None:
    with pytest.raises(RequestError):
        await fake.create(
            "flows", {"name": "f", "sourceConnectionIds": ["x"], "targetConnectionIds": ["y"]}
        )
    assert fake.entities["flows"] == {}
