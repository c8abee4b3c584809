"""Export lanes against the emulator: one flow for many datasets, within AEP's guardrails.

Real HTTP, the emulator's own limits (100 destination flows per sandbox, 80 datasets per ad hoc
call, not-ready windows per dataset), virtual time.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr

from exporter.aep.client import HttpAep
from exporter.destinations import Destination, DlzDestination, SftpDestination
from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress
from exporter.jobs import Job, JobState
from tests.aepclient_support import config_for
from tests.conftest import Emulator, default_knobs

ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=30,
    status_unreadable_s=120,
    lane_idle_s=300,
    budget_wait_s=600,
    budget_recheck_s=30,
)
LAKE = {"lake": DlzDestination(type="dlz")}


def job(dataset: str, **changes: Any) -> Job:
    return Job.model_validate(
        {"dataset_id": dataset, "destination": "lake", "path": "ml/features", **changes}
    )


def sftp(host: str) -> SftpDestination:
    return SftpDestination(type="sftp", host=host, username="ml", password=SecretStr("pw-" + host))


async def ops(emulator: Emulator) -> dict[str, Counter[int]]:
    out: dict[str, Counter[int]] = {}
    for entry in (await emulator.control("GET", "/journal"))["entries"]:
        out.setdefault(entry["op"], Counter())[entry["status"]] += 1
    return out


async def listed(emulator: Emulator, collection: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, str] | None = {"limit": "100"}
    path = f"/{collection}"
    while True:
        answer = await emulator.fs("GET", path, params=params)
        assert answer.status == 200, answer.body
        items.extend(answer.body["items"])
        href = answer.body.get("_links", {}).get("next", {}).get("href")
        if not href:
            return items
        path, params = href, None


def exported(emulator: Emulator) -> Counter[str]:
    """Runs started per dataset."""
    return Counter(run.dataset_id for run in emulator.state.all_runs())


class Engines:
    """Engines on the emulator, closed at the end of the test."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.apis: list[HttpAep] = []
        self.engines: list[Engine] = []

    async def make(
        self,
        destinations: Mapping[str, Destination] = LAKE,
        config: EngineConfig = ENGINE,
        seed: int = 6,
        api_class: type[HttpAep] = HttpAep,
    ) -> Engine:
        cfg = config_for(self.emulator, rate_limit_rps=500, max_concurrency=32)
        api = api_class.from_config(cfg, clock=self.emulator.clock, rng=random.Random(seed))
        engine = Engine(
            api,
            destinations,
            config,
            org_id=cfg.org_id,
            sandbox=cfg.sandbox,
            clock=self.emulator.clock,
            identity_key=b"test-key",
            rng=random.Random(seed),
        )
        engine.start(renew=False)
        self.apis.append(api)
        self.engines.append(engine)
        return engine

    async def close(self) -> None:
        for engine in self.engines:
            await engine.stop()
        for api in self.apis:
            await api.aclose()


@pytest.fixture
async def engines(emulator: Emulator) -> AsyncIterator[Engines]:
    made = Engines(emulator)
    yield made
    await made.close()


def with_knobs(**values: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("knobs", [default_knobs(**values)], ids=["knobs"])


async def test_250_datasets_share_one_flow_and_land_in_their_own_folders(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make()
    datasets = await emulator.seed(rows=3, count=250)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes[:3]
    assert len({o.flow_id for o in outcomes}) == 1
    assert len({o.run_id for o in outcomes}) == 250
    counted = await ops(emulator)
    assert counted["flows.create"] == Counter({201: 1})
    # They arrived together: a handful of source connections (the first batch's, then the
    # rest in one change: virtual time lets the coalescing window close early), one left.
    assert counted["sourceConnections.create"].total() <= 3
    assert counted["flows.patch"].total() <= 2
    assert len(await listed(emulator, "sourceConnections")) == 1
    # 250 datasets at most 80 per call: four ad hoc calls.
    assert counted["adhoc.run"] == Counter({200: 4})
    assert exported(emulator) == Counter(dict.fromkeys(datasets, 1))
    for outcome, dataset in zip(outcomes, datasets, strict=True):
        files = (await emulator.control("GET", f"/runs/{outcome.run_id}"))["files"]
        assert files
        assert all(f"/ml/features/{dataset}/exportTime=" in f for f in files), files


async def test_a_dataset_joining_a_busy_lane_waits_its_own_window(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make()
    first, late = await emulator.seed(rows=3, count=2)
    began = emulator.clock.time()
    early = asyncio.ensure_future(engine.run(job(first)))
    await emulator.clock.sleep(40)  # the lane is 40 s into its not-ready window
    joined_at = emulator.clock.time()
    second = await engine.run(job(late))
    assert (await early).state == second.state == JobState.SUCCEEDED
    assert (await early).flow_id == second.flow_id
    runs = {r.dataset_id: r for r in emulator.state.all_runs()}
    # Each ran once, each after its own window: the first from the flow's creation, the late
    # one from when it joined, not from the flow's creation.
    assert runs[first].created - began >= 60
    assert runs[late].created - joined_at >= 60
    assert runs[first].created < runs[late].created
    counted = await ops(emulator)
    assert counted["adhoc.run"][400] == 0  # waited, never refused as not ready
    assert counted["flows.patch"] == Counter({200: 1})  # the late one joined by one change


async def test_two_daemons_adding_different_datasets_to_one_lane_lose_none(
    emulator: Emulator, engines: Engines
) -> None:
    a, b = await engines.make(seed=1), await engines.make(seed=2)
    datasets = await emulator.seed(rows=2, count=40)
    (seed_job,) = datasets[:1]
    assert (await a.run(job(seed_job))).state == JobState.SUCCEEDED  # the lane exists
    rest = datasets[1:]
    outcomes = await asyncio.gather(
        *(a.run(job(d)) for d in rest[::2]), *(b.run(job(d)) for d in rest[1::2])
    )
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    (flow,) = await listed(emulator, "flows")
    source = await emulator.fs("GET", f"/sourceConnections/{flow['sourceConnectionIds'][0]}")
    members = {d["dataSetId"] for d in source.body["items"][0]["params"]["datasets"]}
    assert members == set(datasets)
    counted = await ops(emulator)
    assert counted["flows.patch"][412] >= 1  # they did collide, and merged
    assert exported(emulator) == Counter(dict.fromkeys(datasets, 1))
    # No source connection is left that the flow does not use.
    sources = await listed(emulator, "sourceConnections")
    assert [s["id"] for s in sources] == flow["sourceConnectionIds"]


async def test_a_writer_that_keeps_losing_the_race_waits_and_gets_its_turn(
    emulator: Emulator, engines: Engines
) -> None:
    # Another daemon changes the flow just before each of seven PATCHes (AEP answers 412):
    # re-reading at once each time would give up after a few; a jittered wait lets it through.
    engine = await engines.make()
    first, late = await emulator.seed(rows=2, count=2)
    assert (await engine.run(job(first))).state == JobState.SUCCEEDED
    fault = {"action": "status", "op": "flows.patch", "status": 412, "count": 7}
    await emulator.control("POST", "/faults", fault)
    outcome = await engine.run(job(late))
    assert outcome.state == JobState.SUCCEEDED, outcome
    counted = await ops(emulator)
    assert counted["flows.patch"] == Counter({412: 7, 200: 1})
    assert exported(emulator) == Counter({first: 1, late: 1})


class TidiedUnderfoot(HttpAep):
    """AEP as another daemon's tidy leaves it: the source connection a PATCH is about to name
    is deleted just before the first one goes out."""

    tidied: ClassVar[list[str]] = []

    async def patch_flow(self, flow_id: str, etag: str, ops: Sequence[Mapping[str, Any]]) -> str:
        if not self.tidied:
            (source,) = ops[0]["value"]
            self.tidied.append(source)
            await self.delete("sourceConnections", source)
        return await super().patch_flow(flow_id, etag, ops)


async def test_a_source_connection_deleted_before_its_patch_is_made_again(
    emulator: Emulator, engines: Engines
) -> None:
    TidiedUnderfoot.tidied = []
    engine = await engines.make(api_class=TidiedUnderfoot)
    first, late = await emulator.seed(rows=2, count=2)
    assert (await engine.run(job(first))).state == JobState.SUCCEEDED
    outcome = await engine.run(job(late))
    assert outcome.state == JobState.SUCCEEDED, outcome
    assert len(TidiedUnderfoot.tidied) == 1
    counted = await ops(emulator)
    assert counted["flows.patch"] == Counter({400: 1, 200: 1})
    (flow,) = await listed(emulator, "flows")
    assert flow["sourceConnectionIds"] != TidiedUnderfoot.tidied
    assert exported(emulator) == Counter({first: 1, late: 1})


async def test_a_lane_over_its_dataset_limit_gets_a_second_flow(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make(config=ENGINE.model_copy(update={"max_datasets_per_flow": 5}))
    datasets = await emulator.seed(rows=2, count=12)
    outcomes = await asyncio.gather(*(engine.run(job(d)) for d in datasets))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}
    flows = await listed(emulator, "flows")
    assert sorted(f["name"][-3:] for f in flows if "#" in f["name"]) == [" #2", " #3"]
    assert sorted(Counter(o.flow_id for o in outcomes).values()) == [2, 5, 5]


@with_knobs(max_destination_flows=100)
async def test_150_lanes_within_a_limit_of_100_retire_idle_lanes(
    emulator: Emulator, engines: Engines
) -> None:
    config = ENGINE.model_copy(update={"lane_idle_s": 0, "join_coalesce_s": 0})
    engine = await engines.make(config=config)
    datasets = await emulator.seed(rows=2, count=150)
    outcomes = []
    for i, dataset in enumerate(datasets):  # 150 paths: 150 lanes, one after the other
        outcomes.append(await engine.run(job(dataset, path=f"ml/lane{i}")))
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}
    counted = await ops(emulator)
    assert counted["flows.create"] == Counter({201: 150})  # never refused by AEP
    assert counted["flows.delete"][202] == 50
    assert len(await listed(emulator, "flows")) == 100
    # What a retired lane leaves: nothing but the base connection.
    assert len(await listed(emulator, "sourceConnections")) == 100
    assert len(await listed(emulator, "targetConnections")) == 100


@with_knobs(max_destination_flows=100, run_duration_s={"min": 50_000, "max": 50_000})
async def test_no_idle_lane_means_a_clear_refusal_not_an_aep_error(
    emulator: Emulator, engines: Engines
) -> None:
    config = ENGINE.model_copy(
        update={"max_flows": 3, "lane_idle_s": 0, "join_coalesce_s": 0, "budget_wait_s": 120}
    )
    engine = await engines.make(config=config)
    datasets = await emulator.seed(rows=2, count=4)
    busy = [
        asyncio.ensure_future(engine.run(job(d, path=f"ml/busy{i}"), wait=True))
        for i, d in enumerate(datasets[:3])
    ]
    while len(list(emulator.state.all_runs())) < 3:  # three lanes, each running for hours
        await emulator.clock.sleep(1)
    refused = await engine.run(job(datasets[3], path="ml/fourth"))
    assert refused.state == JobState.REJECTED
    assert "max_flows=3" in refused.message
    assert "100 destination dataflows" in refused.message
    assert (await ops(emulator))["flows.create"] == Counter({201: 3})
    for task in busy:
        task.cancel()
    await asyncio.gather(*busy, return_exceptions=True)


async def test_an_edited_destination_gets_a_new_lane_and_the_old_one_gets_nothing_more(
    emulator: Emulator, engines: Engines, tmp_path: Path
) -> None:
    engine = await engines.make(destinations={"lake": sftp("old.example.com")})
    (dataset,) = await emulator.seed(rows=4)
    before = await engine.run(job(dataset))
    assert before.state == JobState.SUCCEEDED
    engine.use_destinations({"lake": sftp("new.example.com")})
    after = await engine.run(job(dataset, id="after-edit"))
    assert after.state == JobState.SUCCEEDED
    assert after.flow_id != before.flow_id
    root = emulator.data_dir / "destinations" / "sftp"
    old = sorted(p.name for p in (root / "old.example.com").rglob("*.parquet"))
    new = sorted(p.name for p in (root / "new.example.com").rglob("*.parquet"))
    assert len(old) == 1
    assert len(new) == 1
    bases = {c["name"] for c in await listed(emulator, "connections")}
    assert len(bases) == 2  # a base connection per identity: AEP holds the new host
    # The dataset left the old lane (its last member: the lane is gone).
    flows = await listed(emulator, "flows")
    assert [f["id"] for f in flows] == [after.flow_id]


async def test_a_shared_flow_is_not_disabled_under_other_jobs(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make()
    quick, slow = await emulator.seed(rows=2, count=2)
    first = asyncio.ensure_future(engine.run(job(quick)))
    second = asyncio.ensure_future(engine.run(job(slow, timeout=3600)))
    results = await asyncio.gather(first, second)
    assert {r.state for r in results} == {JobState.SUCCEEDED}
    counted = await ops(emulator)
    # Both ran on one flow; it was disabled once, after the last of them.
    assert counted["flows.action"] == Counter({200: 1})
    flow = (await listed(emulator, "flows"))[0]
    assert flow["state"] == "disabled"
    # The next job enables it again and exports.
    third = await engine.run(job(quick, id="again"))
    assert third.state == JobState.SUCCEEDED


async def test_a_repeat_export_of_a_member_costs_few_requests(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make()
    (dataset,) = await emulator.seed(rows=2)
    assert (await engine.run(job(dataset, after_run="keep"))).state == JobState.SUCCEEDED
    before = await ops(emulator)
    again = await engine.run(job(dataset, id="repeat", after_run="keep"))
    assert again.state == JobState.SUCCEEDED
    after = await ops(emulator)
    spent = {k: n for k in after if (n := (after[k] - before.get(k, Counter())).total())}
    # One call and the runs list (the marks, then the polls of the run): no look-ups, no
    # connections, no flow reads.
    assert set(spent) == {"adhoc.run", "runs.list"}, spent
    assert spent["adhoc.run"] == 1


async def test_progress_journals_the_mark_before_the_call(
    emulator: Emulator, engines: Engines
) -> None:
    engine = await engines.make()
    first, dataset = await emulator.seed(rows=2, count=2)
    # Another dataset of the lane exported first: its run is the flow's newest.
    assert (await engine.run(job(first, id="first"))).state == JobState.SUCCEEDED
    (newest,) = [int(r.created * 1000) for r in emulator.state.all_runs()]
    seen: list[Progress] = []
    calls_then: list[int] = []

    async def on_state(progress: Progress) -> None:
        seen.append(progress)
        if progress.state == JobState.TRIGGERING:
            calls_then.append((await ops(emulator)).get("adhoc.run", Counter()).total())

    outcome = await engine.run(job(dataset), on_state)
    assert outcome.state == JobState.SUCCEEDED
    assert [p.state for p in seen] == [JobState.FLOW_READY, JobState.TRIGGERING, JobState.RUNNING]
    assert calls_then == [1]  # the first dataset's call only
    # The mark is the flow's newest run, whatever its dataset: one short read.
    assert seen[1].intent_ms == newest
    (mine,) = [r for r in emulator.state.all_runs() if r.dataset_id == dataset]
    assert int(mine.created * 1000) > newest


async def test_two_daemons_making_one_lane_at_once_end_with_one_flow(
    emulator: Emulator, engines: Engines
) -> None:
    config = ENGINE.model_copy(update={"join_coalesce_s": 0})
    a, b = await engines.make(config=config, seed=1), await engines.make(config=config, seed=2)
    datasets = await emulator.seed(rows=2, count=6)
    outcomes = await asyncio.gather(
        *(a.run(job(d)) for d in datasets[:3]), *(b.run(job(d)) for d in datasets[3:])
    )
    assert {o.state for o in outcomes} == {JobState.SUCCEEDED}, outcomes
    (flow,) = await listed(emulator, "flows")
    assert {o.flow_id for o in outcomes} == {flow["id"]}
    source = await emulator.fs("GET", f"/sourceConnections/{flow['sourceConnectionIds'][0]}")
    members = {d["dataSetId"] for d in source.body["items"][0]["params"]["datasets"]}
    assert members == set(datasets)
    assert exported(emulator) == Counter(dict.fromkeys(datasets, 1))
    counted = await ops(emulator)
    # Both made the flow (neither could see the other's yet); the younger was deleted unused.
    assert counted["flows.create"] == Counter({201: 2})
    assert counted["flows.delete"] == Counter({202: 1})
    assert [t["id"] for t in await listed(emulator, "targetConnections")] == flow[
        "targetConnectionIds"
    ]


class SkewedClock:
    """The emulator's clock, read `skew_s` ahead: a host whose clock disagrees with AEP's."""

    def __init__(self, base: Any, skew_s: float) -> None:
        self.base, self.skew_s = base, skew_s

    def time(self) -> float:
        return float(self.base.time()) + self.skew_s

    def monotonic(self) -> float:
        return float(self.base.monotonic())

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    def busy(self) -> AbstractContextManager[None]:
        return self.base.busy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("skew_s", [-600.0, 600.0])
async def test_a_lost_trigger_answer_is_adopted_whatever_the_clocks_say(
    emulator: Emulator, skew_s: float
) -> None:
    clock = SkewedClock(emulator.clock, skew_s)
    cfg = config_for(emulator, rate_limit_rps=500)
    (dataset,) = await emulator.seed(rows=2)
    # An earlier export of the dataset on the lane: the new run must be told from it.
    async with HttpAep.from_config(cfg, clock=clock) as api:
        engine = Engine(
            api,
            LAKE,
            ENGINE,
            org_id=cfg.org_id,
            sandbox=cfg.sandbox,
            clock=clock,
            identity_key=b"k",
        )
        async with engine:
            first = await engine.run(job(dataset, after_run="keep"))
            await emulator.control("POST", "/faults", {"action": "drop_after", "op": "adhoc.run"})
            second = await engine.run(job(dataset, id="again", after_run="keep"))
    assert first.state == second.state == JobState.SUCCEEDED
    assert second.run_id != first.run_id
    assert exported(emulator) == Counter({dataset: 2})  # no third: the lost one was adopted
    calls = (await ops(emulator))["adhoc.run"]
    # One call started the first run, one (whose answer was lost) the second; a clock ahead
    # of AEP's also meets "not ready" answers first, which start nothing.
    assert (calls[200], calls[599]) == (1, 1)
