"""Schedules: recurring exports from `[[schedules]]`, fired inside the daemon by APScheduler.

A fire is a job with the id `<schedule>@<slot time in UTC>` (`nightly@2026-11-27T02:00:00Z`),
so a slot fired twice — by a double wake-up, or again after a crash between the job's journal
entry and the slot's — is one job: the journal refuses the second. At each wake-up, per
schedule:

    late       slots older than `misfire_grace_s` (the daemon was down, the machine asleep)
               are skipped: `schedule_missed`
    coalesce   of several slots due at once only the latest fires (`schedule_coalesced`);
               with `coalesce = false` each fires in turn, the next once the previous job ended
    overlap    a slot that falls while the schedule's previous job is still in flight is
               skipped: `schedule_overlap_skipped`

The latest slot handled (fired or skipped) is journaled, because APScheduler's memory job
store forgets: at start each schedule resumes at the first slot after it, fired if still
within grace, otherwise logged as missed. A new schedule starts at its next slot.

APScheduler runs on the daemon's `Clock` (`exporter.sources.scheduler`), so tests drive
schedules with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import structlog
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from rich.table import Table

from exporter.daemon.admission import Admission, Admissions, Quiet
from exporter.daemon.config import EPOCH, ScheduleConfig
from exporter.daemon.journal import JobRecord
from exporter.jobs import Job
from exporter.settings import Settings
from exporter.sources.scheduler import ClockedScheduler

log = structlog.get_logger("exporter.sources.schedules")

SOURCE = "schedule"
OUTCOMES = ("fired", "duplicate", "overlapping", "missed", "coalesced")
MAX_COUNTED = 1000  # missed slots counted one by one after a long stop; more are "1000"


class WallClockCron(CronTrigger):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """A cron trigger that fires a wall-clock time once when clocks go back.

    APScheduler fires 02:30 twice on the night the clocks fall back (once in summer time, once
    in winter time), and each would be its own slot and job. Like cron, an expression with a
    fixed hour fires the first of the two only; one whose hour is a wildcard (every 15 minutes,
    say) goes on by real time."""

    once_per_wall_time = False

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        nxt: datetime | None = super().get_next_fire_time(previous_fire_time, now)
        while nxt is not None and self.once_per_wall_time and nxt.fold == 1:
            nxt = super().get_next_fire_time(nxt, nxt)
        return nxt


def trigger_of(config: ScheduleConfig) -> BaseTrigger:
    """The APScheduler trigger of a schedule: its cron expression in its time zone, or its
    interval counted from the Unix epoch."""
    if config.cron is not None:
        trigger = WallClockCron.from_crontab(config.cron, timezone=ZoneInfo(config.timezone))
        trigger.once_per_wall_time = "*" not in config.cron.split()[1]
        return trigger
    return IntervalTrigger(seconds=config.interval_s, start_date=EPOCH, timezone=UTC)


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def iso(slot: datetime) -> str:
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slot_job_id(schedule: str, slot: datetime) -> str:
    return f"{schedule}@{iso(slot)}"


def following(trigger: BaseTrigger, slot: datetime) -> datetime | None:
    """The trigger's next slot strictly after `slot`."""
    nxt: datetime | None = trigger.get_next_fire_time(slot, slot)
    return nxt


def slots_between(trigger: BaseTrigger, first: datetime, end: datetime | None) -> int:
    """How many slots from `first` up to `end` (excluded), counting up to MAX_COUNTED."""
    count, slot = 0, following(trigger, first)
    while slot is not None and (end is None or slot < end) and count < MAX_COUNTED - 1:
        count, slot = count + 1, following(trigger, slot)
    return count + 1


def first_slot(
    config: ScheduleConfig, last: datetime | None, now: float
) -> tuple[datetime | None, datetime | None]:
    """Where a schedule starts: (first slot to wake up for, first slot missed or None).

    After `last` handled slot, the next one; if that is beyond grace already, it is missed,
    and the schedule starts at its first slot within grace. Without `last`, at the next slot."""
    trigger = trigger_of(config)
    if last is None:
        nxt: datetime | None = trigger.get_next_fire_time(None, utc(now))
        return nxt, None
    first = following(trigger, last)
    window = utc(now - config.misfire_grace_s)
    if first is not None and first < window:
        resumed: datetime | None = trigger.get_next_fire_time(None, window)
        return resumed, first
    return first, None


def upcoming(
    config: ScheduleConfig, last: datetime | None, now: float, count: int
) -> list[datetime]:
    """The next `count` slots the daemon would fire (the first may be due already)."""
    trigger = trigger_of(config)
    slot, _ = first_slot(config, last, now)
    slots: list[datetime] = []
    while slot is not None and len(slots) < count:
        slots.append(slot)
        slot = following(trigger, slot)
    return slots


def status_table(
    configs: Iterable[ScheduleConfig], last: Mapping[str, float], *, now: float, count: int = 3
) -> Table:
    """`aep-exporter status`: each schedule, its last slot and its next fire times."""
    table = Table(title="schedules")
    for column in ("schedule", "trigger", "last slot", f"next {count} slots (UTC)"):
        table.add_column(column)
    for config in configs:
        done = last.get(config.name)
        previous = utc(done) if done is not None else None
        if config.enabled:
            nxt = ", ".join(iso(s) for s in upcoming(config, previous, now, count)) or "none"
        else:
            nxt = "disabled"
        table.add_row(config.name, config.describe(), iso(previous) if previous else "", nxt)
    return table


# -- the service -----------------------------------------------------------------------------


class Schedules:
    """The daemon's scheduler service: `[[schedules]]` fired as jobs (see the module doc)."""

    name = "scheduler"
    sources = (SOURCE,)

    def __init__(self, admissions: Admissions) -> None:
        self.admissions = admissions
        self.clock = admissions.clock
        self.configs = {s.name: s for s in admissions.settings.schedules if s.enabled}
        self.scheduler = ClockedScheduler(admissions.clock)
        self.last: dict[str, datetime] = {}
        """Each schedule's latest slot handled (fired or skipped), as journaled."""
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
        self.decided = asyncio.Condition()
        """Notified after each slot is handled (`counts`)."""
        self._jobs: dict[str, set[str]] = defaultdict(set)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # -- Service ---------------------------------------------------------------------------

    async def start(self) -> None:
        slots = await self.admissions.journal.schedule_slots()
        self.last = {name: utc(slot) for name, slot in slots.items()}

    async def recover(self, records: list[JobRecord]) -> None:
        for record in records:  # fires that were in flight: the next slots wait for them
            self.admissions.resume(record, Quiet(SOURCE, record.name))
            self._jobs[record.name].add(record.job_id)

    async def run(self) -> None:
        self.scheduler.start()
        try:
            for config in self.configs.values():
                self._add(config)
            await asyncio.Event().wait()  # APScheduler's timer task does the work
        finally:
            await self.scheduler.aclose()

    async def close(self) -> None:
        return None

    def reconfigure(self, settings: Settings) -> None:
        """A reload: add, remove and replace schedules; their jobs in flight go on."""
        new = {s.name: s for s in settings.schedules if s.enabled}
        for name in self.configs.keys() - new.keys():
            self._remove(name)
            log.info("schedule_removed", schedule=name)
        for name, config in new.items():
            old = self.configs.get(name)
            if old == config:
                continue
            if old is not None:
                self._remove(name)
            self.configs[name] = config
            self._add(config, event="schedule_changed" if old else "schedule_added")
        self.configs = new

    # -- scheduling ------------------------------------------------------------------------

    def _add(self, config: ScheduleConfig, event: str = "schedule_started") -> None:
        if self.scheduler.state == STATE_STOPPED:
            return  # not running yet: `run` adds every schedule
        now = self.clock.time()
        first, missed = first_slot(config, self.last.get(config.name), now)
        if missed is not None:
            count = slots_between(trigger_of(config), missed, first)
            self._missed(config, missed, now, reason="the daemon was not running", count=count)
        if first is not None:
            self.scheduler.add_job(
                self._due,
                trigger=trigger_of(config),
                args=(config.name,),
                id=config.name,
                name=config.name,
                next_run_time=first,
                misfire_grace_time=None,  # judged in `_due`, on the daemon's clock
                coalesce=False,  # every due slot reaches `_due`, which applies the policy
                max_instances=1_000_000,  # overlap is judged on jobs in flight, in `fire`
                replace_existing=True,
            )
        log.info(
            event,
            schedule=config.name,
            trigger=config.describe(),
            next_slot=iso(first) if first else None,
            last_slot=iso(self.last[config.name]) if config.name in self.last else None,
        )

    def _remove(self, name: str) -> None:
        with contextlib.suppress(JobLookupError):  # not running yet, or no slot left
            self.scheduler.remove_job(name)

    async def _due(self, name: str, *, slots: Sequence[datetime] = ()) -> None:
        """APScheduler's call, with every slot that fell due since the last one."""
        config = self.configs.get(name)
        if config is None or not slots:
            return  # removed by a reload meanwhile
        now = self.clock.time()
        late = [s for s in slots if now - s.timestamp() > config.misfire_grace_s]
        due = [s for s in slots if now - s.timestamp() <= config.misfire_grace_s]
        if late:
            self._missed(config, late[0], now, reason="noticed too late", count=len(late))
            if not due:
                await self._handled(name, late[-1])
        if config.coalesce and len(due) > 1:
            log.info(
                "schedule_coalesced",
                schedule=name,
                slot=iso(due[-1]),
                coalesced=len(due) - 1,
                first_coalesced=iso(due[0]),
            )
            self._count(name, "coalesced", len(due) - 1)
            due = due[-1:]
        for n, slot in enumerate(due):
            if n:  # without coalescing: one after the other, each still within grace
                await self._settled(name)
                now = self.clock.time()
                if now - slot.timestamp() > config.misfire_grace_s:
                    self._missed(config, slot, now, reason="its turn came too late")
                    await self._handled(name, slot)
                    continue
            await self.fire(name, slot)

    async def fire(self, name: str, slot: datetime) -> Admission | None:
        """Submit the job of one slot: None when skipped because the schedule's previous job
        is still in flight; DUPLICATE when this slot's job exists already."""
        config = self.configs[name]
        job_id = slot_job_id(name, slot)
        async with self._locks[name]:
            late_s = round(self.clock.time() - slot.timestamp(), 3)
            running = self._running(name) - {job_id}
            if running:
                log.warning(
                    "schedule_overlap_skipped",
                    schedule=name,
                    slot=iso(slot),
                    running=sorted(running),
                )
                self._count(name, "overlapping")
                await self._handled(name, slot)
                return None
            if self.admissions.stopping:
                return None
            spec = {**config.job.model_dump(mode="json", exclude_unset=True), "id": job_id}
            admitted = await self.admissions.submit(
                Job.model_validate(spec), spec, Quiet(SOURCE, name)
            )
            if admitted.result is Admission.STARTED:
                self._jobs[name].add(job_id)
                log.info(
                    "schedule_fired",
                    schedule=name,
                    slot=iso(slot),
                    job_id=job_id,
                    late_s=late_s,
                )
                self._count(name, "fired")
            else:
                known = admitted.record
                log.info(
                    "schedule_fire_duplicate",
                    schedule=name,
                    slot=iso(slot),
                    job_id=job_id,
                    state=known.state.value if known else None,
                )
                self._count(name, "duplicate")
            await self._handled(name, slot)
            return admitted.result

    # -- bookkeeping -----------------------------------------------------------------------

    def _running(self, name: str) -> set[str]:
        """This schedule's jobs in flight (forgetting those that ended)."""
        jobs = self._jobs[name]
        jobs.intersection_update(self.admissions.running)
        return set(jobs)

    async def _settled(self, name: str) -> None:
        await self.admissions.wait_ended(self._running(name))

    def _missed(
        self, config: ScheduleConfig, slot: datetime, now: float, *, reason: str, count: int = 1
    ) -> None:
        log.warning(
            "schedule_missed",
            schedule=config.name,
            slot=iso(slot),
            missed=count,
            late_s=round(now - slot.timestamp(), 3),
            misfire_grace_s=config.misfire_grace_s,
            reason=reason,
        )
        self._count(config.name, "missed", count)

    def _count(self, name: str, outcome: str, n: int = 1) -> None:
        self.counts[name][outcome] += n
        self.admissions.metrics.schedule_slot(name, outcome, n)

    async def _handled(self, name: str, slot: datetime) -> None:
        if name not in self.last or slot > self.last[name]:
            self.last[name] = slot
            await self.admissions.journal.mark_slot(name, slot.timestamp())
        async with self.decided:
            self.decided.notify_all()
