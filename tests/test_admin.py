"""The admin server, over HTTP with a real aiohttp client, in front of an in-process daemon
that exports through the real emulator: jobs submitted, listed, cancelled (and their flows
disabled in AEP); liveness after a blocked loop or a dead task; readiness without a token
or a writable journal; and the token wherever the server is bound beyond loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from aep_emulator.settings import DEFAULT_CLIENT_ID, Span
from exporter.clock import FakeClock
from exporter.daemon.admission import Service
from exporter.daemon.assemble import build_daemon
from exporter.daemon.config import AdminConfig
from exporter.daemon.core import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, Daemon
from exporter.daemon.journal import JobRecord
from exporter.engine.config import EngineConfig
from exporter.errors import ConfigError
from exporter.jobs import TERMINAL, Rejected, parse_job
from exporter.net import is_loopback
from exporter.ops.admin import AdminServer
from exporter.ops.admin_token import ensure_token, read_token
from exporter.redaction import SECRETS
from exporter.settings import load_settings
from tests.bad_jobs import DESTINATIONS
from tests.conftest import Answer, Emulator
from tests.daemon_support import daemon_process, kill, write_config
from tests.test_daemon_intake import settings_for

DEADLINE = 20.0  # real seconds: a bound on a wait, never a sleep
TOKEN = "admin-token-for-tests-0123456789"
ENGINE = EngineConfig(
    not_ready_wait_s=60,
    not_ready_retry_s=5,
    not_ready_retry_max_s=20,
    poll_min_s=1,
    poll_max_s=3600,  # long runs are polled rarely, even as fake time races ahead
    status_unreadable_s=120,
)
LONG_RUN = Span(min=10**6, max=10**6)  # emulated seconds: runs until cancelled
WEEK_S = 7 * 86400
# How far fake time may run by itself while a test acts on a job that must stay in flight: far
# short of its week-long deadline, and room for any wait the client may need meanwhile (its
# rate limiter, a retry's backoff).
HOUR_S = 3600
CURSOR_HUGE = base64.urlsafe_b64encode(json.dumps([10**400, "x"]).encode()).decode()
CURSOR_NAN = base64.urlsafe_b64encode(b'[NaN, "x"]').decode()


@dataclass
class Admin:
    """A running daemon with its admin server, and a client for it."""

    daemon: Daemon
    server: AdminServer
    task: asyncio.Task[int]
    session: aiohttp.ClientSession
    clock: FakeClock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        params: Any = None,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        sent.update(headers or {})
        async with self.session.request(
            method, self.url + path, json=body, data=data, params=params, headers=sent
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode()
            return Answer(resp.status, parsed, dict(resp.headers))

    async def submit(self, job: dict[str, Any]) -> Answer:
        return await self.call("POST", "/v1/jobs", body=job)

    async def until_state(self, job_id: str, states: Iterable[str]) -> dict[str, Any]:
        """Poll the job until it is in one of `states`; pauses pass on the fake clock."""
        wanted = set(states)
        async with asyncio.timeout(DEADLINE):
            while True:
                answer = await self.call("GET", f"/v1/jobs/{job_id}")
                assert answer.status == 200, answer.body
                if answer.body["state"] in wanted:
                    job: dict[str, Any] = answer.body
                    return job
                await self.clock.sleep(0.5)

    async def filed(self, count: int) -> None:
        daemon = self.daemon
        async with asyncio.timeout(DEADLINE), daemon.filed:
            await daemon.filed.wait_for(lambda: daemon.counts.filed >= count)


@asynccontextmanager
async def admin_daemon(
    emulator: Emulator,
    tmp_path: Path,
    *,
    admin: dict[str, Any] | None = None,
    aep: dict[str, Any] | None = None,
    services: Iterable[Service] = (),
    engine: EngineConfig = ENGINE,
    **daemon: Any,
) -> AsyncIterator[Admin]:
    settings = settings_for(emulator, tmp_path, **daemon)
    update: dict[str, Any] = {
        "engine": engine,
        "admin": AdminConfig.model_validate({"port": 0, "token": TOKEN, **(admin or {})}),
    }
    if aep:
        update["aep"] = settings.aep.model_copy(update=aep)
    made = build_daemon(settings.model_copy(update=update), clock=emulator.clock)
    for service in services:
        made.add_service(service)
    (server,) = [s for s in made.services if isinstance(s, AdminServer)]
    task = asyncio.create_task(made.run(), name="daemon")
    ready = asyncio.ensure_future(made.ready.wait())
    await asyncio.wait({ready, task}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
    assert ready.done(), "the daemon did not become ready"
    async with aiohttp.ClientSession() as session:
        try:
            yield Admin(made, server, task, session, emulator.clock)
        finally:
            made.stop()
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)


def job(dataset: str, n: int, **changes: Any) -> dict[str, Any]:
    spec = {"id": f"job-{n}", "dataset_id": dataset, "destination": "lake", "path": f"ml/{n}"}
    return {**spec, **changes}


# -- jobs ------------------------------------------------------------------------------------


async def test_a_submitted_job_runs_to_success_in_aep(emulator: Emulator, tmp_path: Path) -> None:
    (dataset,) = await emulator.seed(rows=20)
    async with admin_daemon(emulator, tmp_path) as admin, ticking(admin.clock):
        spec = {"dataset_id": dataset, "destination": "lake", "path": "ml/http", "id": "http-1"}
        answer = await admin.submit(spec)
        assert answer.status == 202, answer.body
        assert answer.headers["Location"] == "/v1/jobs/http-1"
        accepted = answer.body
        assert accepted["job_id"] == "http-1"
        assert accepted["source"] == "http"
        assert accepted["name"] == "http-1"
        assert accepted["state"] == "received"
        assert accepted["outcome"] is None
        assert accepted["spec"] == spec
        done = await admin.until_state("http-1", TERMINAL)
    assert done["state"] == "succeeded", done
    assert done["outcome"]["records"] == 20
    assert done["outcome"]["files"] >= 1
    assert done["run_id"] == done["outcome"]["run_id"]
    (run,) = list(emulator.state.all_runs())
    assert run.id == done["run_id"]
    assert run.request_id.startswith("http-1.")  # AEP saw the trigger come from this job


async def test_the_same_job_id_again_is_409_with_the_existing_job(
    emulator: Emulator, tmp_path: Path
) -> None:
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path) as admin:
        first = await admin.submit(job(dataset, 1))
        assert first.status == 202
        # A different export under the same id, and the same content without an id twice.
        again = await admin.submit({**job(dataset, 1), "path": "ml/other"})
        assert again.status == 409
        assert again.body["error"] == "duplicate"
        assert "'job-1' was already submitted (from http" in again.body["message"]
        assert again.body["job"]["job_id"] == "job-1"
        assert again.body["job"]["spec"]["path"] == "ml/1"
        anonymous = {"dataset_id": dataset, "destination": "lake", "path": "ml/anon"}
        assert (await admin.submit(anonymous)).status == 202
        twice = await admin.submit(anonymous)
        assert twice.status == 409
        assert twice.body["job"]["job_id"].startswith("job-")
        await admin.filed(2)
    assert admin.daemon.counts.filed == 2  # nothing else was started


INVALID = {
    "not json": b'{"dataset_id": "x",',
    "a list": b"[1, 2]",
    "unknown field": b'{"dataset_id": "d1", "destination": "lake", "path": "p", "colour": 1}',
    "unknown destination": b'{"dataset_id": "d1", "destination": "nowhere", "path": "p"}',
    "json uncompressed": (
        b'{"dataset_id": "d1", "destination": "lake", "path": "p", "format": "json", '
        b'"compression": "none"}'
    ),
    "bad path": b'{"dataset_id": "d1", "destination": "lake", "path": "../etc"}',
    "not utf-8": b'{"dataset_id": "\xff"}',
}


async def test_an_invalid_job_is_422_with_the_spool_reason_and_nothing_is_journaled(
    emulator: Emulator, tmp_path: Path
) -> None:
    destinations = dict.fromkeys(DESTINATIONS)
    async with admin_daemon(emulator, tmp_path) as admin:
        for case, raw in INVALID.items():
            with pytest.raises(Rejected) as expected:
                parse_job("job.json", raw, destinations)
            answer = await admin.call(
                "POST", "/v1/jobs", data=raw, headers={"Content-Type": "application/json"}
            )
            assert answer.status == 422, case
            assert answer.body == {"error": "invalid_job", "message": str(expected.value)}, case
        listed = await admin.call("GET", "/v1/jobs")
    assert listed.body == {"jobs": [], "next_cursor": None}


async def test_body_type_and_size_are_checked(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path, admin={"max_body_bytes": 2048}) as admin:
        as_text = await admin.call(
            "POST", "/v1/jobs", data=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert as_text.status == 415
        assert "application/json" in as_text.body["message"]
        big = json.dumps({"dataset_id": "d", "destination": "lake", "path": "p" * 3000})
        too_big = await admin.call(
            "POST", "/v1/jobs", data=big.encode(), headers={"Content-Type": "application/json"}
        )
        assert too_big.status == 413
        assert too_big.body["error"] == "request_entity_too_large"
        assert "2048" in too_big.body["message"]


async def test_a_full_daemon_answers_503_with_retry_after(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.knobs.run_duration_s = LONG_RUN
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path, max_in_flight=1) as admin:
        with admin.clock.within(HOUR_S):  # job-1 stays in flight, whatever the machine's load
            assert (await admin.submit(job(dataset, 1, timeout=WEEK_S))).status == 202
            full = await admin.submit(job(dataset, 2))
            assert full.status == 503
            assert full.body["error"] == "full"
            assert int(full.headers["Retry-After"]) > 0
            assert (await admin.call("GET", "/v1/jobs/job-2")).status == 404  # not taken
            # A known id is still answered for what it is, full or not.
            assert (await admin.submit(job(dataset, 1))).status == 409


async def test_list_filters_and_pages_newest_first(emulator: Emulator, tmp_path: Path) -> None:
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path) as admin, ticking(admin.clock):
        for n in range(5):
            assert (await admin.submit(job(dataset, n))).status == 202
        await admin.filed(5)
        incoming = tmp_path / "spool" / "incoming"
        (incoming / ".bad.tmp").write_text("[]")
        (incoming / ".bad.tmp").rename(incoming / "bad.json")
        await admin.filed(6)

        pages, cursor = [], None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            answer = await admin.call("GET", "/v1/jobs", params=params)
            assert answer.status == 200, answer.body
            pages.append([j["job_id"] for j in answer.body["jobs"]])
            cursor = answer.body["next_cursor"]
            if cursor is None:
                break
        listed = [job_id for page in pages for job_id in page]
        assert [len(p) for p in pages] == [2, 2, 2]
        assert listed[0].startswith("rejected:bad.json:")
        assert listed[1:] == ["job-4", "job-3", "job-2", "job-1", "job-0"]

        async def ids(**params: Any) -> list[str]:
            answer = await admin.call("GET", "/v1/jobs", params=params)
            assert answer.status == 200, answer.body
            return [j["job_id"] for j in answer.body["jobs"]]

        assert await ids(source="http") == listed[1:]
        assert await ids(source="spool") == listed[:1]
        assert await ids(state="rejected") == listed[:1]
        assert await ids(state="succeeded") == listed[1:]
        assert await ids(state="succeeded,rejected") == listed
        both = await admin.call(
            "GET", "/v1/jobs", params=[("state", "rejected"), ("state", "succeeded")]
        )
        assert [j["job_id"] for j in both.body["jobs"]] == listed
        assert await ids(state="running") == []
        assert await ids(source="http", limit="3") == listed[1:4]
        one = (await admin.call("GET", "/v1/jobs/job-3")).body
        assert one["state"] == "succeeded"
        assert one["created"].endswith("Z")
        assert one["created"] <= one["updated"]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"limit": "0"}, "limit: must be between 1 and 1000"),
        ({"limit": "1001"}, "limit: must be between 1 and 1000"),
        ({"limit": "ten"}, "limit: 'ten' is not a whole number"),
        ({"state": "done"}, "state: 'done' is not a job state"),
        ({"cursor": "not-a-cursor"}, "cursor: not a cursor this API returned"),
        # [10**400, "x"] and [NaN, "x"]: well-formed, but no time a job was created
        ({"cursor": f"{CURSOR_HUGE}"}, "cursor: not a cursor this API returned"),
        ({"cursor": f"{CURSOR_NAN}"}, "cursor: not a cursor this API returned"),
        ({"states": "failed"}, "unknown query parameter 'states'"),
    ],
)
async def test_list_refuses_bad_parameters(
    emulator: Emulator, tmp_path: Path, params: dict[str, str], says: str
) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        answer = await admin.call("GET", "/v1/jobs", params=params)
    assert answer.status == 400
    assert answer.body["error"] == "bad_request"
    assert says in answer.body["message"]


async def test_unknown_jobs_routes_and_methods_answer_json(
    emulator: Emulator, tmp_path: Path
) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        missing = await admin.call("GET", "/v1/jobs/nope")
        assert (missing.status, missing.body["error"]) == (404, "not_found")
        route = await admin.call("GET", "/v2/things")
        assert (route.status, route.body["error"]) == (404, "not_found")
        assert route.body["message"] == "no such resource: /v2/things"
        method = await admin.call("PUT", "/v1/jobs")
        assert (method.status, method.body["error"]) == (405, "method_not_allowed")
        assert set(method.headers["Allow"].split(",")) == {"GET", "POST"}
        assert "PUT is not allowed on /v1/jobs" in method.body["message"]


# -- cancel ----------------------------------------------------------------------------------


async def flow_state(emulator: Emulator, flow_id: str) -> str:
    answer = await emulator.fs("GET", f"/flows/{flow_id}")
    assert answer.status == 200, answer.body
    state: str = answer.body["items"][0]["state"]
    return state


async def test_cancel_a_running_job_disables_its_flow_when_alone(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.knobs.run_duration_s = LONG_RUN
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path) as admin:
        assert (await admin.submit(job(dataset, 1, timeout=WEEK_S))).status == 202
        running = await admin.until_state("job-1", ["running"])
        flow_id = running["flow_id"]
        assert await flow_state(emulator, flow_id) == "enabled"

        with admin.clock.within(HOUR_S):  # no deadline passes while the cancel is on its way
            answer = await admin.call(
                "DELETE", "/v1/jobs/job-1", params={"reason": "the operator said stop"}
            )
        assert answer.status == 200, answer.body
        assert answer.body["flow"] == {"flow_id": flow_id, "disabled": True, "detail": "disabled"}
        cancelled = answer.body["job"]
        assert cancelled["state"] == "cancelled"
        assert cancelled["outcome"]["message"] == "the operator said stop"
        assert cancelled["outcome"]["run_id"] == running["run_id"]
        assert await flow_state(emulator, flow_id) == "disabled"
        assert "job-1" not in admin.daemon.jobs
        assert (await admin.call("GET", "/v1/jobs/job-1")).body["state"] == "cancelled"

        again = await admin.call("DELETE", "/v1/jobs/job-1")
        assert (again.status, again.body["error"]) == (409, "finished")
        assert again.body["job"]["state"] == "cancelled"
        assert (await admin.call("DELETE", "/v1/jobs/unknown")).status == 404


async def test_cancel_keeps_a_flow_another_job_still_uses(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.knobs.run_duration_s = LONG_RUN
    (dataset,) = await emulator.seed(rows=5)
    same = {"dataset_id": dataset, "destination": "lake", "path": "ml/shared", "timeout": WEEK_S}
    async with admin_daemon(emulator, tmp_path) as admin:
        for name in ("a", "b"):
            assert (await admin.submit({**same, "id": f"share-{name}"})).status == 202
        first = await admin.until_state("share-a", ["running"])
        second = await admin.until_state("share-b", ["running"])
        assert first["flow_id"] == second["flow_id"]
        flow_id = first["flow_id"]

        with admin.clock.within(HOUR_S):  # share-b must still be running when share-a is cancelled
            answer = await admin.call("DELETE", "/v1/jobs/share-a")
            assert answer.status == 200, answer.body
            assert answer.body["flow"] == {
                "flow_id": flow_id,
                "disabled": False,
                "detail": "kept enabled: job 'share-b' uses it too",
            }
            assert await flow_state(emulator, flow_id) == "enabled"
            assert (await admin.call("GET", "/v1/jobs/share-b")).body["state"] == "running"

            last = await admin.call("DELETE", "/v1/jobs/share-b")
        assert last.status == 200, last.body
        assert last.body["flow"]["disabled"] is True
        assert await flow_state(emulator, flow_id) == "disabled"


@pytest.mark.parametrize("case", ["already disabled", "refused"])
async def test_cancel_reports_what_became_of_the_flow(
    emulator: Emulator, tmp_path: Path, case: str
) -> None:
    emulator.knobs.run_duration_s = LONG_RUN
    (dataset,) = await emulator.seed(rows=5)
    async with admin_daemon(emulator, tmp_path) as admin:
        assert (await admin.submit(job(dataset, 1, timeout=WEEK_S))).status == 202
        flow_id = (await admin.until_state("job-1", ["running"]))["flow_id"]
        with admin.clock.within(HOUR_S):  # no deadline passes while the cancel is on its way
            if case == "already disabled":  # someone else disabled it meanwhile
                done = await emulator.fs(
                    "POST", f"/flows/{flow_id}/action", params={"op": "disable"}
                )
                assert done.status == 200, done.body
            else:
                fault = {"action": "status", "op": "flows.action", "status": 400, "count": 1}
                await emulator.control("POST", "/faults", fault)
            answer = await admin.call("DELETE", "/v1/jobs/job-1")
    assert answer.status == 200, answer.body
    assert answer.body["job"]["state"] == "cancelled"
    flow = answer.body["flow"]
    assert flow["flow_id"] == flow_id
    if case == "already disabled":
        assert (flow["disabled"], flow["detail"]) == (True, "already disabled")
        assert await flow_state(emulator, flow_id) == "disabled"
    else:
        assert flow["disabled"] is False
        assert flow["detail"].startswith("AEP refused: ")
        assert await flow_state(emulator, flow_id) == "enabled"


async def test_cancel_checks_its_parameters(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        long = await admin.call("DELETE", "/v1/jobs/x", params={"reason": "r" * 501})
        assert (long.status, long.body["message"]) == (400, "reason: at most 500 characters")
        odd = await admin.call("DELETE", "/v1/jobs/x", params={"why": "r"})
        assert (odd.status, odd.body["error"]) == (400, "bad_request")


async def test_cancel_before_a_flow_exists_touches_nothing_in_aep(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A flow lookup that does not answer keeps the job in `received`, waiting on AEP.
    await emulator.control(
        "POST", "/faults", {"action": "delay", "op": "flows.list", "delay_ms": 60_000, "count": 1}
    )
    async with admin_daemon(emulator, tmp_path) as admin:
        assert (await admin.submit(job("d1", 1))).status == 202
        answer = await admin.call("DELETE", "/v1/jobs/job-1")
        assert answer.status == 200, answer.body
        assert answer.body["job"]["state"] == "cancelled"
        assert answer.body["flow"] == {
            "flow_id": None,
            "disabled": False,
            "detail": "no flow known yet: nothing to disable",
        }
    await emulator.control("DELETE", "/faults")
    actions = await emulator.control("GET", "/journal?op=flows.action")
    assert actions["entries"] == []


# -- lanes -----------------------------------------------------------------------------------


@asynccontextmanager
async def ticking(clock: FakeClock, step: float = 1.0) -> AsyncIterator[None]:
    """Fake time moves in steps of `step` s while jobs run: the clock jumps to the earliest
    sleeper, and between two polls that may be a job's deadline hours away."""

    async def tick() -> None:
        while True:
            await clock.sleep(step)

    task = asyncio.create_task(tick(), name="ticker")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def flow_exists(emulator: Emulator, flow_id: str) -> bool:
    answer = await emulator.fs("GET", f"/flows/{flow_id}")
    assert answer.status in (200, 404), answer.body
    return answer.status == 200


async def test_lanes_are_listed_and_an_idle_one_off_lane_is_pruned(
    emulator: Emulator, tmp_path: Path
) -> None:
    engine = ENGINE.model_copy(update={"lane_idle_s": 0, "join_coalesce_s": 0})
    datasets = await emulator.seed(rows=3, count=2)
    async with admin_daemon(emulator, tmp_path, engine=engine) as admin, ticking(admin.clock):
        done = []
        for n, dataset in enumerate(datasets):  # two datasets, one place: one lane
            assert (await admin.submit(job(dataset, n, path="ml/lane"))).status == 202
            done.append(await admin.until_state(f"job-{n}", TERMINAL))
        assert {d["state"] for d in done} == {"succeeded"}, done
        (flow_id,) = {d["flow_id"] for d in done}

        listed = await admin.call("GET", "/v1/lanes")
        assert listed.status == 200, listed.body
        (lane,) = listed.body["lanes"]
        assert lane["flow_id"] == flow_id
        assert lane["datasets"] == 2
        assert (lane["destination"], lane["path"], lane["mode"]) == ("lake", "ml/lane", "once")
        assert (lane["format"], lane["compression"]) == ("PARQUET", "GZIP")
        assert lane["jobs_here"] == 0
        assert len(lane["lane"]) == 16

        for how in ({"body": {"dry_run": True}}, {"params": {"dry_run": "true"}}):
            dry = await admin.call("POST", "/v1/lanes/prune", **how)
            assert dry.status == 200, dry.body
            assert dry.body["dry_run"] is True
            assert [v["flow_id"] for v in dry.body["retired"]] == [flow_id]
            assert await flow_exists(emulator, flow_id)

        pruned = await admin.call("POST", "/v1/lanes/prune")
        assert pruned.status == 200, pruned.body
        assert pruned.body["dry_run"] is False
        assert [v["flow_id"] for v in pruned.body["retired"]] == [flow_id]
        assert not await flow_exists(emulator, flow_id)
        assert (await admin.call("GET", "/v1/lanes")).body == {"lanes": []}
        again = await admin.call("POST", "/v1/lanes/prune", body={"dry_run": False})
        assert (again.status, again.body) == (200, {"retired": [], "dry_run": False})


async def test_prune_keeps_a_lane_with_a_recent_run(emulator: Emulator, tmp_path: Path) -> None:
    (dataset,) = await emulator.seed(rows=3)
    # lane_idle_s: an hour
    async with admin_daemon(emulator, tmp_path) as admin, ticking(admin.clock):
        assert (await admin.submit(job(dataset, 1))).status == 202
        flow_id = (await admin.until_state("job-1", ["succeeded"]))["flow_id"]
        pruned = await admin.call("POST", "/v1/lanes/prune")
        assert (pruned.status, pruned.body) == (200, {"retired": [], "dry_run": False})
        assert await flow_exists(emulator, flow_id)


@pytest.mark.parametrize(
    ("how", "status"),
    [
        ({"params": {"dry_run": "maybe"}}, 400),
        ({"params": {"dry_run": "1"}}, 400),
        ({"params": [("dry_run", "true"), ("dry_run", "true")]}, 400),
        ({"params": {"dry_run": "true"}, "body": {"dry_run": False}}, 400),
        ({"params": {"force": "true"}}, 400),
        ({"body": {"dry_run": "yes"}}, 400),
        ({"body": {"dry_run": True, "force": True}}, 400),
        ({"body": [True]}, 400),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"data": b"dry_run=true", "headers": {"Content-Type": "text/plain"}}, 415),
    ],
)
async def test_lanes_routes_refuse_bad_parameters(
    emulator: Emulator, tmp_path: Path, how: dict[str, Any], status: int
) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        answer = await admin.call("POST", "/v1/lanes/prune", **how)
        assert answer.status == status, answer.body
        assert set(answer.body) == {"error", "message"}
        unknown = await admin.call("GET", "/v1/lanes", params={"dry_run": "true"})
        assert (unknown.status, unknown.body["error"]) == (400, "bad_request")


async def test_an_aep_error_is_a_502_naming_it(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        fault = {"action": "status", "op": "flows.list", "status": 400, "count": 1000}
        await emulator.control("POST", "/faults", fault)
        for method, path in (("GET", "/v1/lanes"), ("POST", "/v1/lanes/prune")):
            answer = await admin.call(method, path)
            assert answer.status == 502, (path, answer.body)
            assert answer.body["error"] == "aep_error"
            assert answer.body["message"].startswith(("listing the lanes: AEP: ", "pruning"))
        await emulator.control("DELETE", "/faults")
        assert (await admin.call("GET", "/v1/lanes")).body == {"lanes": []}


# -- liveness and readiness ------------------------------------------------------------------


async def test_healthz_fails_after_the_loop_was_blocked_and_remembers_it(
    emulator: Emulator, tmp_path: Path
) -> None:
    window = 0.6
    stalls = {"loop_stall_s": 0.1, "loop_stall_window_s": window}
    async with admin_daemon(emulator, tmp_path, admin=stalls) as admin:
        healthy = await admin.call("GET", "/healthz")
        assert (healthy.status, healthy.body) == (200, {"status": "ok"})

        time.sleep(0.4)  # noqa: ASYNC251 - blocking the event loop on purpose: it is under test
        unblocked = time.monotonic()
        right_after = await admin.call("GET", "/healthz")
        assert right_after.status == 503
        assert right_after.body["status"] == "unhealthy"
        (reason,) = right_after.body["reasons"]
        assert reason.startswith("the event loop was blocked for ")
        assert float(reason.split()[6]) >= 0.35
        assert reason.endswith(f"within the last {window:g} s (limit 0.1 s)")
        # The lag histogram saw the block too: one wake at least 0.35 s late.
        (family,) = admin.daemon.metrics.event_loop_lag.collect()
        lag = family.samples
        slow = [s.value for s in lag if s.name.endswith("_bucket") and s.labels["le"] == "0.25"]
        count = [s.value for s in lag if s.name.endswith("_count")]
        assert count[0] - slow[0] >= 1

        # It stays remembered for the window (the monitor has long caught up by then),
        # then liveness comes back.
        statuses = []
        async with asyncio.timeout(DEADLINE):
            while (answer := await admin.call("GET", "/healthz")).status != 200:
                statuses.append((answer.status, time.monotonic() - unblocked))
                await asyncio.sleep(0.05)
        recovered_after = time.monotonic() - unblocked
    assert all(status == 503 for status, _ in statuses)
    # The monitor ticks every 25 ms: 503s this long after the block come from its memory.
    assert recovered_after >= window * 0.9


class Doomed:
    """A supervised service that dies when told, and holds the shutdown until released."""

    name = "doomed"
    sources: Iterable[str] = ()

    def __init__(self) -> None:
        self.die = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self) -> None:
        return None

    async def recover(self, records: list[JobRecord]) -> None:
        return None

    async def run(self) -> None:
        await self.die.wait()
        raise RuntimeError("dying on purpose")

    async def close(self) -> None:
        await self.release.wait()


async def test_healthz_fails_when_a_supervised_task_died(
    emulator: Emulator, tmp_path: Path
) -> None:
    doomed = Doomed()
    async with admin_daemon(emulator, tmp_path, services=[doomed]) as admin:
        assert (await admin.call("GET", "/healthz")).status == 200
        doomed.die.set()
        async with asyncio.timeout(DEADLINE):
            await admin.daemon.wait_stopping()
        dead = await admin.call("GET", "/healthz")
        ready = await admin.call("GET", "/readyz")
        refused = await admin.submit(job("d1", 1))
        doomed.release.set()
    assert dead.status == 503
    assert dead.body == {"status": "unhealthy", "reasons": ["supervised task died: doomed"]}
    assert ready.status == 503
    assert ready.body["checks"]["recovered"] == "stopping"
    assert admin.task.result() == EXIT_SOFTWARE
    assert refused.status == 503  # a stopping daemon takes no new job
    assert refused.body == {"error": "unavailable", "message": "the daemon is stopping"}
    assert refused.headers["Retry-After"] == "30"


async def test_readyz_and_a_read_only_journal(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        ready = await admin.call("GET", "/readyz", token=None)
        assert ready.status == 200
        assert ready.body == {
            "status": "ready",
            "checks": {"recovered": "ok", "aep_token": "ok", "journal": "ok"},
        }
        journal = admin.daemon.journal
        assert journal is not None

        def read_only(on: bool) -> None:
            journal._db().execute(f"PRAGMA query_only = {int(on)}")

        await journal._run(lambda: read_only(True))
        refused = await admin.call("GET", "/readyz")
        await journal._run(lambda: read_only(False))
        again = await admin.call("GET", "/readyz")
    assert refused.status == 503
    assert refused.body["status"] == "not_ready"
    checks = refused.body["checks"]
    assert (checks["recovered"], checks["aep_token"]) == ("ok", "ok")
    assert checks["journal"] == "failed (OperationalError; see the daemon's log)"
    assert again.status == 200


async def test_readyz_checks_have_a_deadline(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path, admin={"check_timeout_s": 0.2}) as admin:
        journal = admin.daemon.journal
        assert journal is not None
        gate = threading.Event()
        stuck = asyncio.ensure_future(journal._run(gate.wait))  # the journal's thread hangs
        try:
            started = time.monotonic()
            answer = await admin.call("GET", "/readyz")
            took = time.monotonic() - started
        finally:
            gate.set()
            await stuck
    assert answer.status == 503
    assert answer.body["checks"]["journal"] == "no answer within 0.2 s"
    assert took < 2


async def test_readyz_fails_when_no_aep_token_can_be_had(
    emulator: Emulator, tmp_path: Path
) -> None:
    wrong = "not-the-emulator-secret"
    with capture_logs() as logs:
        async with admin_daemon(
            emulator, tmp_path, aep={"client_secret": SecretStr(wrong)}
        ) as admin:
            answer = await admin.call("GET", "/readyz")
            alive = await admin.call("GET", "/healthz")
    assert answer.status == 503
    checks = answer.body["checks"]
    assert checks["recovered"] == "ok"
    assert checks["journal"] == "ok"
    # The probe is open to anyone who can reach it: the kind of failure, not IMS's words
    # (which name the client id); those are in the log.
    assert checks["aep_token"] == "failed (AuthError; see the daemon's log)"
    assert DEFAULT_CLIENT_ID not in json.dumps(answer.body)
    (failure,) = {e["error"] for e in logs if e["event"] == "admin_readiness_check_failed"}
    assert failure.startswith("AuthError: ims.token: IMS refused the credentials")
    assert alive.status == 200  # alive, just not ready
    assert wrong not in json.dumps(answer.body)
    assert wrong not in repr(logs)
    (change,) = [e for e in logs if e["event"] == "admin_readiness"]
    assert change["ready"] is False


async def test_metrics_are_prometheus_text(emulator: Emulator, tmp_path: Path) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        answer = await admin.call("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = list(text_string_to_metric_families(answer.body))
    assert families, "the registry exposes something"


# -- binding and the token -------------------------------------------------------------------


async def test_beyond_loopback_everything_but_the_probes_needs_the_token(
    emulator: Emulator, tmp_path: Path
) -> None:
    with capture_logs() as logs:
        async with admin_daemon(emulator, tmp_path, admin={"host": "0.0.0.0"}) as admin:  # noqa: S104
            assert admin.server.url == f"http://0.0.0.0:{admin.server.port}"
            protected = [
                ("GET", "/metrics"),
                ("GET", "/v1/openapi.json"),
                ("GET", "/v1/jobs"),
                ("POST", "/v1/jobs"),
                ("GET", "/v1/jobs/job-1"),
                ("DELETE", "/v1/jobs/job-1"),
                ("GET", "/v1/lanes"),
                ("POST", "/v1/lanes/prune"),
                ("GET", "/anything"),
            ]
            for method, path in protected:
                missing = await admin.call(method, path, token=None)
                assert missing.status == 401, (method, path)
                assert missing.body["error"] == "unauthorized"
                assert missing.headers["WWW-Authenticate"] == 'Bearer realm="aep-exporter"'
                wrong = await admin.call(method, path, token=TOKEN[:-1] + "x")
                assert wrong.status == 401, (method, path)
                assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
                basic = await admin.call(
                    method, path, token=None, headers={"Authorization": f"Basic {TOKEN}"}
                )
                assert basic.status == 401, (method, path)
            for path in ("/healthz", "/readyz"):
                assert (await admin.call("GET", path, token=None)).status == 200
            assert (await admin.call("GET", "/metrics")).status == 200
            assert (await admin.call("GET", "/v1/jobs")).status == 200
    listening = [e for e in logs if e["event"] == "admin_listening"]
    assert listening == [
        {
            "event": "admin_listening",
            "host": "0.0.0.0",  # noqa: S104
            "port": admin.server.port,
            "auth": "bearer",
            "bearer_file": "admin.token_file",
            "max_connections": 64,
            "log_level": "info",
        }
    ]
    refused = [e for e in logs if e["event"] == "admin_unauthorized"]
    assert len(refused) == 3 * len(protected)
    assert TOKEN not in repr(logs)
    assert TOKEN[:-1] not in repr(logs)


def test_settings_refuse_binding_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"
    config = write_config(tmp_path, url, admin={"host": "0.0.0.0"})  # noqa: S104
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    message = str(refused.value)
    assert "admin: host '0.0.0.0' is not a loopback address" in message
    assert "set admin.token_file" in message

    (tmp_path / "admin_token").write_text(TOKEN + "\n")
    config = write_config(tmp_path, url, admin={"host": "0.0.0.0", "token_file": "admin_token"})  # noqa: S104
    settings = load_settings(config)
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)

    (tmp_path / "short").write_text("short")
    config = write_config(tmp_path, url, admin={"token_file": "short"})
    with pytest.raises(ConfigError, match="admin token must be at least 16 characters"):
        load_settings(config)
    config = write_config(tmp_path, url, admin={"token_file": "missing"})
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_settings(config)
    for bad in ("http://exporter.internal", "", "two names"):
        with pytest.raises(ValidationError, match="is not a Host header value"):
            AdminConfig(allowed_hosts=(bad,))
    # Disabled, it may name any host.
    AdminConfig(enabled=False, host="0.0.0.0")  # noqa: S104
    with pytest.raises(ValidationError, match="not a loopback address"):
        AdminConfig(host="admin.example.com")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("localhost.example.com", False),
        ("localhost.localdomain", True),
        (None, False),
    ],
)
def test_what_counts_as_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_a_port_in_use_is_a_clear_error(emulator: Emulator, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as failed:
            async with admin_daemon(emulator, tmp_path, admin={"port": port}):
                pass
    assert "admin.port" in str(failed.value)


@pytest.mark.slow
async def test_a_spawned_daemon_serves_its_probes_on_a_free_port(
    emulator: Emulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator.url)
    async with daemon_process(config, tmp_path / "daemon.log") as running:
        await running.until("daemon_ready", deadline_s=DEADLINE)
        (listening,) = [e for e in running.lines if e.get("event") == "admin_listening"]
        assert listening["host"] == "127.0.0.1"
        assert listening["auth"] == "bearer"
        made = tmp_path / "state" / "admin-token"
        assert listening["bearer_file"] == str(made)
        token = made.read_text().strip()
        url = f"http://127.0.0.1:{listening['port']}"
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz"):
                async with session.get(url + path) as resp:
                    assert resp.status == 200, (path, await resp.text())
            async with session.get(url + "/metrics") as resp:
                assert resp.status == 401
            auth = {"Authorization": f"Bearer {token}"}
            async with session.get(url + "/metrics", headers=auth) as resp:
                assert resp.status == 200, await resp.text()
        assert await kill(running, 15) == EXIT_OK
    assert any(e.get("event") == "admin_closed" for e in running.lines)
    assert token not in (tmp_path / "daemon.log").read_text()


# -- the Host header, and the token the daemon makes -----------------------------------------


async def test_a_request_naming_another_host_is_refused_everywhere(
    emulator: Emulator, tmp_path: Path
) -> None:
    # DNS rebinding: a page at http://evil.example:PORT whose name now resolves to 127.0.0.1.
    (dataset,) = await emulator.seed(rows=5)
    for configured in (TOKEN, None):  # with the configured token, and with the one made
        folder = tmp_path / str(bool(configured))
        folder.mkdir()
        admin_settings = {
            "token": configured,
            "allowed_hosts": ["exporter.internal", "Forwarded.example:8080"],
        }
        with capture_logs() as logs:
            async with admin_daemon(emulator, folder, admin=admin_settings) as admin:
                port = admin.server.port or 0
                token = configured or (folder / "state" / "admin-token").read_text().strip()
                for host in (
                    f"evil.example:{port}",
                    f"127.0.0.1:{port + 1}",
                    "localhost",
                    "",
                    "forwarded.example:8081",
                ):
                    foreign = {"Host": host, "Origin": f"http://{host}"}
                    for method, path, body in (
                        ("GET", "/healthz", None),
                        ("GET", "/readyz", None),
                        ("GET", "/metrics", None),
                        ("POST", "/v1/jobs", job(dataset, 1)),
                        ("GET", "/nowhere", None),
                    ):
                        for sent in (token, None):
                            answer = await admin.call(
                                method, path, body=body, token=sent, headers=foreign
                            )
                            assert answer.status == 421, (host, method, path, answer.body)
                            assert answer.body["error"] == "misdirected_request"
                            assert f"Host {host!r} does not name this server" in (
                                answer.body["message"]
                            ) or (host == "" and "Host '(none)'" in answer.body["message"])
                # Nothing was journaled, nothing was exported.
                listed = await admin.call("GET", "/v1/jobs", token=token)
                assert listed.body == {"jobs": [], "next_cursor": None}
                for host in (
                    f"localhost:{port}",
                    f"LOCALHOST:{port}",
                    f"[::1]:{port}",
                    f"127.0.0.1:{port}",
                    "exporter.internal",
                    "exporter.internal:80",
                    "forwarded.example:8080",
                ):
                    answer = await admin.call(
                        "GET", "/metrics", token=token, headers={"Host": host}
                    )
                    assert answer.status == 200, host
        assert not list(emulator.state.all_runs())
        refused = [e for e in logs if e["event"] == "admin_host_refused"]
        assert {e["host"] for e in refused} == {
            f"evil.example:{port}",
            f"127.0.0.1:{port + 1}",
            "localhost",
            "(none)",
            "forwarded.example:8081",
        }
        assert token not in repr(logs)


async def test_bound_to_every_interface_the_address_reached_is_accepted(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A Kubernetes probe or a Prometheus scrape names the pod's address, which is the
    # connection's local address; here that is 127.0.0.2, which no loopback name covers.
    admin_settings = {"host": "0.0.0.0"}  # noqa: S104
    async with admin_daemon(emulator, tmp_path, admin=admin_settings) as admin:
        url = f"http://127.0.0.2:{admin.server.port}"
        async with admin.session.get(
            url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 200
        foreign = {"Host": f"127.0.0.3:{admin.server.port}"}
        async with admin.session.get(url + "/healthz", headers=foreign) as resp:
            assert resp.status == 421


async def test_without_a_configured_token_one_is_made_kept_and_required(
    emulator: Emulator, tmp_path: Path
) -> None:
    made = tmp_path / "state" / "admin-token"
    with capture_logs() as logs:
        async with admin_daemon(emulator, tmp_path, admin={"token": None}) as admin:
            info = made.stat()
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_uid == os.geteuid()
            token = made.read_text().strip()
            assert len(token) >= 32
            assert admin.server.token_file == made
            assert SECRETS.scrub(f"an error that echoes {token}") == (
                "an error that echoes [redacted]"
            )
            for method, path in (("GET", "/metrics"), ("GET", "/v1/jobs"), ("GET", "/v1/lanes")):
                missing = await admin.call(method, path, token=None)
                assert missing.status == 401, path
                assert (await admin.call(method, path, token=TOKEN)).status == 401, path
            assert (await admin.call("GET", "/metrics", token=token)).status == 200
            assert (await admin.call("GET", "/v1/jobs", token=token)).status == 200
            for path in ("/healthz", "/readyz"):
                assert (await admin.call("GET", path, token=None)).status == 200
    assert [e for e in logs if e["event"] == "admin_token_created"] == [
        {"event": "admin_token_created", "path": str(made), "log_level": "info"}
    ]
    assert token not in repr(logs)

    # The next start reuses it.
    with capture_logs() as logs:
        async with admin_daemon(emulator, tmp_path, admin={"token": None}) as admin:
            assert (await admin.call("GET", "/metrics", token=token)).status == 200
    assert made.read_text().strip() == token
    assert not [e for e in logs if e["event"] == "admin_token_created"]
    (listening,) = [e for e in logs if e["event"] == "admin_listening"]
    assert listening["bearer_file"] == str(made)
    assert token not in repr(logs)


@pytest.mark.parametrize(
    ("mode", "content", "reason"),
    [
        (0o640, None, "has mode 0640: others may have read the token"),
        (0o604, None, "has mode 0604: others may have read the token"),
        (0o600, "short\n", "does not hold a token"),
        (0o600, "has a space in the middle\n", "does not hold a token"),
    ],
)
async def test_a_token_file_others_could_read_is_refused(
    emulator: Emulator, tmp_path: Path, mode: int, content: str | None, reason: str
) -> None:
    made = tmp_path / "state" / "admin-token"
    made.parent.mkdir()
    made.write_text(content or TOKEN + "\n")
    made.chmod(mode)
    with capture_logs() as logs, pytest.raises(ConfigError, match=reason) as refused:
        async with admin_daemon(emulator, tmp_path, admin={"token": None}):
            pass
    assert str(made) in str(refused.value)
    assert made.read_text() == (content or TOKEN + "\n")  # left for the operator to look at
    assert stat.S_IMODE(made.stat().st_mode) == mode
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["admin_token_refused"]
    assert TOKEN not in repr(logs)


def test_a_token_file_of_another_user_or_a_link_is_refused(tmp_path: Path) -> None:
    made = tmp_path / "admin-token"
    made.write_text(TOKEN)
    made.chmod(0o600)
    assert read_token(made, owner=os.geteuid()) == TOKEN
    with pytest.raises(ConfigError, match=f"belongs to uid {os.geteuid()}, not to this"):
        read_token(made, owner=os.geteuid() + 1)
    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(ConfigError, match="cannot read the admin token file"):
        ensure_token(link)
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_token(folder)


@pytest.mark.slow
async def test_a_spawned_daemon_refuses_a_readable_token_file_with_exit_2(
    emulator: Emulator, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator.url)
    made = tmp_path / "state" / "admin-token"
    made.parent.mkdir()
    made.write_text(TOKEN)
    made.chmod(0o644)
    async with daemon_process(config, tmp_path / "daemon.log") as running:
        async with asyncio.timeout(DEADLINE):
            code = await running.proc.wait()
        await running.until("daemon_config_error", deadline_s=DEADLINE)
    assert code == EXIT_CONFIG
    (error,) = [e for e in running.lines if e.get("event") == "daemon_config_error"]
    assert "has mode 0644" in error["error"]
    assert TOKEN not in (tmp_path / "daemon.log").read_text()
