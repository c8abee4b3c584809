"""The admin server's status page, in Debian's Chromium driven by Playwright, against a daemon
that exported through the emulator: one job succeeded, one failed in AEP, one fired by a
schedule; and a journaled job whose id and AEP message carry markup.

One daemon, one emulator and one browser serve the whole module (its own event loop): the
browser takes about a second to start, a daemon with finished jobs a few. Screenshots go to
each test's temporary folder. The dashboard and the alerting rules are checked here too,
against this daemon's real /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from structlog.testing import capture_logs

from aep_emulator.app import serve
from exporter.clock import FakeClock
from exporter.daemon.admission import Admissions
from exporter.daemon.assemble import build_daemon
from exporter.daemon.config import AdminConfig, ScheduleConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.daemon.journal import JobRecord
from exporter.engine.lanes import LaneManager
from exporter.jobs import JobState, Outcome, RunError
from exporter.ops.admin import AdminServer
from exporter.ops.status_page import COOKIE, MAX_SESSIONS, SESSION_TTL_S, StatusPage
from tests.bad_jobs import DESTINATIONS
from tests.conftest import Emulator, default_knobs
from tests.test_daemon_intake import DEADLINE, settings_for

IN_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

TOKEN = "status-page-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
# Debian's Chromium, headless, as root in CI, with nothing reaching out to the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MARKUP_ID = "<script>window.pwned=1</script>"
MARKUP_MESSAGE = '<img src=x onerror="window.pwned=2">'
ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "aep-exporter.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SCHEDULE = ScheduleConfig.model_validate(
    {
        "name": "nightly",
        "cron": "0 3 * * *",
        "job": {"dataset_id": "placeholder", "destination": DESTINATIONS[0], "path": "n"},
    }
)


@dataclass
class Site:
    url: str
    daemon: Daemon
    server: AdminServer
    emulator: Emulator
    clock: FakeClock
    session: aiohttp.ClientSession
    good: JobRecord
    bad: JobRecord
    scheduled: JobRecord
    reason: str  # AEP's error message for the failed run, as the emulator gave it
    metrics: str  # /metrics scraped once every job had finished

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
        async with self.session.get(self.url + path, allow_redirects=False, **kwargs) as resp:
            return resp.status, await resp.text(), dict(resp.headers)

    async def post(self, path: str, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
        async with self.session.post(self.url + path, allow_redirects=False, **kwargs) as resp:
            return resp.status, await resp.text(), dict(resp.headers)


async def _submit(site_url: str, session: aiohttp.ClientSession, job: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(f"{site_url}/v1/jobs", json=job, headers=headers) as resp:
        assert resp.status == 202, await resp.text()


async def _ended(daemon: Daemon, job_id: str) -> JobRecord:
    journal = daemon.journal
    assert journal is not None
    async with asyncio.timeout(DEADLINE), daemon.filed:
        while True:
            record = await journal.get(job_id)
            if record is not None and record.terminal:
                return record
            await daemon.filed.wait()


async def _scheduled(daemon: Daemon) -> JobRecord:
    journal = daemon.journal
    assert journal is not None
    async with asyncio.timeout(DEADLINE), daemon.filed:
        while True:
            done = await journal.search(source="schedule", states=[JobState.SUCCEEDED], limit=1)
            if done:
                return done[0]
            await daemon.filed.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    tmp = tmp_path_factory.mktemp("status-page")
    clock = FakeClock(auto_advance=True)
    async with (
        serve(default_knobs(), tmp / "emulator", clock=clock) as (url, state),
        aiohttp.ClientSession() as session,
    ):
        emulator = Emulator(url, state, clock, session, tmp / "emulator")
        datasets = await emulator.seed(rows=20, count=3)
        schedule = SCHEDULE.model_copy(
            update={"job": SCHEDULE.job.model_copy(update={"dataset_id": datasets[2]})}
        )
        settings = settings_for(emulator, tmp).model_copy(
            update={
                "admin": AdminConfig(port=0, token=SecretStr(TOKEN)),
                "schedules": (schedule,),
            }
        )
        daemon = build_daemon(settings, clock=clock)
        (server,) = [s for s in daemon.services if isinstance(s, AdminServer)]
        task = asyncio.create_task(daemon.run(), name="daemon")
        try:
            async with asyncio.timeout(DEADLINE):
                await daemon.ready.wait()
            base = f"http://127.0.0.1:{server.port}"
            good = {"id": "good-1", "dataset_id": datasets[0], "destination": DESTINATIONS[0]}
            await _submit(base, session, {**good, "path": "ml/good"})
            good_record = await _ended(daemon, "good-1")
            await emulator.control("PATCH", "/config", {"run_failure_rate": 1.0})
            bad = {"id": "bad-1", "dataset_id": datasets[1], "destination": DESTINATIONS[1]}
            await _submit(base, session, {**bad, "path": "ml/bad"})
            bad_record = await _ended(daemon, "bad-1")
            await emulator.control("PATCH", "/config", {"run_failure_rate": 0.0})
            scheduled = await _scheduled(daemon)
            assert good_record.state is JobState.SUCCEEDED, good_record
            assert bad_record.state is JobState.FAILED, bad_record
            run = await emulator.fs("GET", f"/runs/{bad_record.run_id}")
            (item,) = run.body["items"]
            (error,) = item["metrics"]["statusSummary"]["errors"]
            # A job from another source whose id and AEP message carry markup.
            journal = daemon.journal
            assert journal is not None
            spec = {"dataset_id": "x", "destination": DESTINATIONS[1], "path": "p"}
            await journal.add(MARKUP_ID, source="redis", name="1-0", spec=spec)
            await journal.finish(
                Outcome(
                    job_id=MARKUP_ID,
                    state=JobState.FAILED,
                    message="the run failed in AEP",
                    errors=(RunError(code="EXPORT-500", message=MARKUP_MESSAGE),),
                )
            )
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(f"{base}/metrics", headers=headers) as resp:
                metrics = await resp.text()
            # From here on the daemon's time stands still: pages show the same slots.
            with clock.within(0):
                yield Site(
                    base,
                    daemon,
                    server,
                    emulator,
                    clock,
                    session,
                    good_record,
                    bad_record,
                    scheduled,
                    error["message"],
                    metrics,
                )
        finally:
            daemon.stop()
            code = await asyncio.wait_for(task, DEADLINE)
        assert code == EXIT_OK


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert shutil.which(CHROMIUM), "no Chromium: apt-get install chromium (.ci/run does)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def log_in(context: BrowserContext, site: Site, path: str = "/status") -> Page:
    page = await context.new_page()
    await page.goto(site.url + path)
    await page.fill("#token", TOKEN)
    await page.click("#login")
    await expect(page.locator("h2").first).to_have_text("Recent failures")
    return page


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def logged_in(browser: Browser, site: Site) -> AsyncIterator[BrowserContext]:
    """A browser context that logged in once, through the form."""
    context = await browser.new_context()
    try:
        first = await log_in(context, site)
        await first.close()
        yield context
    finally:
        await context.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(logged_in: BrowserContext, site: Site, tmp_path: Path) -> AsyncIterator[Page]:
    """A new page on the status page, logged in; a screenshot of it at the end."""
    opened = await logged_in.new_page()
    try:
        await opened.goto(f"{site.url}/status")
        yield opened
        await opened.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        assert (tmp_path / "status.png").stat().st_size > 0
    finally:
        await opened.close()


def row(page: Page, table: str, text: str) -> Any:
    return page.locator(f"#{table} tr", has_text=text)


# -- logging in ------------------------------------------------------------------------------


@IN_MODULE_LOOP
async def test_the_page_asks_for_the_token_and_keeps_it_out_of_the_browser(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(f"{site.url}/status?state=failed")
        assert page.url.startswith(f"{site.url}/status/login?next=")
        await page.fill("#token", "not-the-token-at-all-0000000000")
        await page.click("#login")
        await expect(page.locator("#error")).to_have_text("wrong admin token")
        await page.screenshot(path=str(tmp_path / "wrong-token.png"))
        await page.fill("#token", TOKEN)
        await page.click("#login")
        # Back to what was asked for, filter included.
        assert page.url == f"{site.url}/status?state=failed"
        await expect(page.locator("#state")).to_have_value("failed")
        await page.screenshot(path=str(tmp_path / "logged-in.png"), full_page=True)
        (cookie,) = await context.cookies()
        assert cookie["name"] == COOKIE
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/status"
        assert TOKEN not in cookie["value"]
        assert TOKEN not in await page.content()
        # The cookie opens the page only: the jobs API still wants the bearer token.
        answer = await page.request.get(f"{site.url}/v1/jobs")
        assert answer.status == 401
        await page.click("#logout")
        assert page.url.startswith(f"{site.url}/status/login")
        await page.goto(f"{site.url}/status")
        assert page.url.startswith(f"{site.url}/status/login")
    finally:
        await context.close()
    assert (tmp_path / "wrong-token.png").stat().st_size > 0


@IN_MODULE_LOOP
async def test_logins_from_other_sites_and_other_host_names_are_refused(site: Site) -> None:
    status, _, headers = await site.get("/status")
    assert status == 303
    assert headers["Location"].startswith("/status/login?next=")
    form = {"token": TOKEN, "next": "/status"}
    with capture_logs() as logs:
        # A form on another site posting the right token (login CSRF) gets no session.
        status, body, headers = await site.post(
            "/status/login", data=form, headers={"Origin": "http://evil.example"}
        )
        assert status == 403
        assert "Set-Cookie" not in headers
        assert "another site" in body
        wrong = {**form, "token": TOKEN[::-1]}
        status, body, headers = await site.post("/status/login", data=wrong)
        assert status == 401
        assert "Set-Cookie" not in headers
        status, _, headers = await site.post("/status/login", data=form)
        assert status == 303
        assert headers["Set-Cookie"].startswith(f"{COOKIE}=")
    events = [e["event"] for e in logs]
    assert events == ["status_login_refused", "status_login_refused", "status_login"]
    assert TOKEN not in repr(logs)
    assert TOKEN[::-1] not in repr(logs)
    assert TOKEN not in headers["Set-Cookie"]
    # A name pointed at 127.0.0.1 (DNS rebinding) reaches nothing, not even the form.
    status, _, _ = await site.get("/status/login", headers={"Host": "evil.example"})
    assert status == 421
    # After logging in, only this server's /status addresses are followed.
    status, _, headers = await site.post("/status/login", data={**form, "next": "//evil/x"})
    assert status == 303
    assert headers["Location"] == "/status"
    # The bearer token works too (scripts); bad filters get a clear 400.
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, body, headers = await site.get("/status?state=lost", headers=bearer)
    assert status == 400
    assert "state: &#39;lost&#39; is not a job state" in body
    assert "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]


# -- what the page shows ---------------------------------------------------------------------


@IN_MODULE_LOOP
async def test_a_failed_job_shows_aeps_reason(page: Page, site: Site) -> None:
    limit = site.daemon.settings.daemon.max_in_flight
    await expect(page.locator("#summary")).to_contain_text(f"0 of {limit} jobs in flight · ready ·")
    failure = row(page, "failures", "bad-1")
    await expect(failure).to_have_count(1)
    await expect(failure).to_contain_text("failed")
    await expect(failure).to_contain_text(site.reason)
    assert site.reason  # the emulator's own words for the failed run
    await expect(row(page, "failures", "good-1")).to_have_count(0)
    await expect(row(page, "jobs", "bad-1")).to_contain_text(site.reason)


@IN_MODULE_LOOP
async def test_markup_in_ids_and_messages_is_shown_as_text(page: Page) -> None:
    failure = row(page, "failures", "window.pwned")
    await expect(failure).to_contain_text(MARKUP_ID)
    await expect(failure).to_contain_text(MARKUP_MESSAGE)
    assert await page.evaluate("typeof window.pwned") == "undefined"
    assert await page.locator("script, img").count() == 0


@IN_MODULE_LOOP
async def test_jobs_filter_by_state_source_destination_and_id(page: Page, site: Site) -> None:
    jobs = page.locator("#jobs tr.job")
    await expect(jobs).to_have_count(4)  # good-1, bad-1, the schedule's, the markup one
    await page.select_option("#state", "failed")
    await page.click("#apply")
    assert "state=failed" in page.url
    await expect(jobs).to_have_count(2)
    await page.select_option("#source", "http")
    await page.click("#apply")
    await expect(jobs).to_have_count(1)
    await expect(jobs).to_contain_text("bad-1")
    await page.go_back()  # the back button returns to the previous filter
    await expect(jobs).to_have_count(2)
    await page.goto(f"{site.url}/status?destination={DESTINATIONS[0]}")
    await expect(jobs).to_have_count(2)  # good-1 and the schedule's
    await expect(page.locator("#jobs tr.job", has_text="bad-1")).to_have_count(0)
    await page.goto(f"{site.url}/status")
    await page.fill("#q", "nightly@")
    await page.click("#apply")
    await expect(jobs).to_have_count(1)
    await expect(jobs).to_contain_text(site.scheduled.job_id)
    await page.goto(f"{site.url}/status?q=no-such-job")
    await expect(page.locator("#no-jobs")).to_be_visible()
    await page.goto(f"{site.url}/status?limit=1")
    await expect(jobs).to_have_count(1)
    await page.click("#next")
    await expect(jobs).to_have_count(1)
    assert "cursor=" in page.url


@IN_MODULE_LOOP
async def test_lanes_show_their_datasets_and_schedules_their_next_slots(
    page: Page, site: Site
) -> None:
    for record in (site.good, site.bad, site.scheduled):
        dataset = record.spec["dataset_id"]
        lane = row(page, "lanes", dataset)
        await expect(lane).to_have_count(1)
        await expect(lane).to_contain_text(record.spec["destination"])
        await expect(lane).to_contain_text(str(record.flow_id))
    now = datetime.fromtimestamp(site.clock.time(), UTC)
    first = now.replace(hour=3, minute=0, second=0, microsecond=0)
    if first <= now:
        first += timedelta(days=1)
    slots = [first + timedelta(days=n) for n in range(3)]
    expected = ", ".join(s.strftime("%Y-%m-%dT%H:%M:%SZ") for s in slots)
    schedule = row(page, "schedules", "nightly")
    await expect(schedule).to_contain_text(expected)
    last = site.scheduled.job_id.split("@", 1)[1]
    await expect(schedule).to_contain_text(last)


@IN_MODULE_LOOP
async def test_the_page_refreshes_itself(page: Page, site: Site) -> None:
    refresh = page.locator('meta[http-equiv="refresh"]')
    assert await refresh.get_attribute("content") == "10"
    site.server.status_page.refresh_s = 1  # not ten seconds of the suite's time
    try:
        await page.reload()
        journal = site.daemon.journal
        assert journal is not None
        spec = {"dataset_id": "y", "destination": DESTINATIONS[0], "path": "p"}
        await journal.add("arrived-later", source="http", name="arrived-later", spec=spec)
        # No click, no reload from here: the page fetches itself again.
        await expect(row(page, "jobs", "arrived-later")).to_have_count(1, timeout=10_000)
    finally:
        site.server.status_page.refresh_s = 10


# -- the dashboard and the alerts ------------------------------------------------------------

METRIC = re.compile(r"\b((?:aep_exporter|process|python)_[a-z_]+)\b")


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exposed(text: str) -> set[str]:
    """Every series name the exposition declares (with _total, _bucket, _count, _sum): also
    those of a labelled metric that has no series yet (a counter of 429s before any 429)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + end for end in SUFFIXES.get(family.type, ())}
    return names


@IN_MODULE_LOOP
async def test_dashboard_panels_query_only_metrics_the_daemon_exports(site: Site) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exposed(site.metrics)
    queried: set[str] = set()
    panels = dashboard["panels"]
    assert len(panels) >= 8
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets, panel["title"]
        for target in targets:
            found = set(METRIC.findall(target["expr"]))
            assert found, (panel["title"], target["expr"])
            queried |= found
    assert queried - names == set()
    for wanted in (
        "aep_exporter_build_info",
        "aep_exporter_exported_bytes_total",
        "aep_exporter_schedule_last_success_timestamp_seconds",
        "aep_exporter_lane_last_success_timestamp_seconds",
        "process_resident_memory_bytes",
    ):
        assert wanted in queried


@IN_MODULE_LOOP
async def test_alert_rules_name_exported_metrics_and_cover_the_four_cases(site: Site) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) >= {
        "AepExporterExportsFailing",
        "AepExporterRunStuck",
        "AepExporterScheduleMissedSlot",
        "AepExporterFlowBudgetNearlySpent",
    }
    names = exposed(site.metrics)
    for name, rule in alerts.items():
        used = set(METRIC.findall(rule["expr"]))
        assert used, name
        assert used - names == set(), name
        assert rule["annotations"]["summary"], name


@IN_MODULE_LOOP
async def test_the_scrape_counts_what_the_journal_says_was_exported(site: Site) -> None:
    families = {f.name: f for f in text_string_to_metric_families(site.metrics)}
    exported = {
        s.labels["destination"]: s.value
        for s in families["aep_exporter_exported_bytes"].samples
        if s.name.endswith("_total")
    }
    want: dict[str, float] = {}
    for record in (site.good, site.scheduled):  # the succeeded ones
        assert record.outcome is not None
        destination = record.spec["destination"]
        want[destination] = want.get(destination, 0) + record.outcome["bytes"]
    assert exported == want
    assert all(v > 0 for v in want.values())
    (last,) = families["aep_exporter_schedule_last_success_timestamp_seconds"].samples
    assert last.labels == {"schedule": "nightly"}
    assert site.scheduled.updated <= last.value <= site.scheduled.updated + 60
    lanes = families["aep_exporter_lane_last_success_timestamp_seconds"].samples
    assert len(lanes) == 2  # good-1's lane and the schedule's; the failed one's is absent
    (info,) = families["aep_exporter_build_info"].samples
    assert info.value == 1
    # Three lanes were made, one after the other: the sandbox held two flows at the last count.
    (flows,) = families["aep_exporter_destination_flows"].samples
    assert flows.value == 2
    (limit,) = families["aep_exporter_destination_flows_limit"].samples
    assert limit.value == site.daemon.settings.engine.max_flows


PROMTOOL = shutil.which("promtool")


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus (.ci/run)"
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        done = subprocess.run(  # noqa: S603 - a fixed tool on files of this repository
            [PROMTOOL, *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


# -- sessions --------------------------------------------------------------------------------


@dataclass
class _ClockOnly:
    """The one part of `Admissions` the sessions read: the daemon's clock."""

    clock: FakeClock


def _with_cookie(sid: str) -> web.Request:
    return make_mocked_request("GET", "/status", headers={"Cookie": f"{COOKIE}={sid}"})


async def test_sessions_end_after_their_time_and_the_oldest_go_past_the_cap() -> None:
    clock = FakeClock()
    sessions = StatusPage(
        cast(Admissions, _ClockOnly(clock)),
        cast(LaneManager, None),
        check_token=lambda given: given == TOKEN,
    )
    first = sessions._new_session()
    assert sessions._session(_with_cookie(first)) == first
    assert sessions._session(_with_cookie("made-up")) is None
    assert sessions._session(_with_cookie("")) is None
    await clock.advance(SESSION_TTL_S - 1)
    assert sessions._session(_with_cookie(first)) == first
    await clock.advance(1)
    assert sessions._session(_with_cookie(first)) is None  # expired, and forgotten
    assert first not in sessions._sessions
    made = [sessions._new_session() for _ in range(MAX_SESSIONS + 5)]
    assert len(sessions._sessions) == MAX_SESSIONS
    assert sessions._session(_with_cookie(made[0])) is None  # the oldest went
    assert sessions._session(_with_cookie(made[-1])) == made[-1]
    assert len(set(made)) == len(made)
