"""trigger: start the ad hoc runs of a lane's datasets, patiently, batched and exactly once.

AEP refuses ad hoc runs of a dataset for about ten minutes after it joined its flow ("not
ready"), so each dataset waits from its own join time, not blindly; after that, "not ready"
answers are retried with backoff. Datasets of one flow that are ready together share one ad
hoc call (at most `max_datasets_per_trigger`); AEP answers one run per dataset.

Exactly once: before a call is sent, the runs of the flow that already exist are read, and each
dataset's newest run time (AEP's clock) is told to its job, which journals it. A call whose
answer was lost — or a job resumed after a crash — adopts the runs of its dataset created
after that mark, so adoption never depends on this host's clock agreeing with AEP's. A dataset
that AEP says is already running adopts that run.

Fenced: a job may carry a fence, asked right before every call that would carry its dataset
(the Redis intake renews the job's lease there). A job whose fence raises is left out of the
call and gets the error; the other jobs of the batch go on.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from exporter.aep.api import AepApi, FlowInfo, RunInfo
from exporter.clock import Clock, sleep_or_wake
from exporter.engine.config import EngineConfig
from exporter.engine.poller import RunTimedOut, StatusUnreadable
from exporter.errors import (
    AdhocNotEnabled,
    AepError,
    FlowDisabled,
    NotAMember,
    NotReadyError,
    RunInProgress,
    SendWindowMissed,
    ServerError,
    ThrottledError,
    TransportError,
)
from exporter.metrics import Metrics
from exporter.retry import Backoff, Retrying, retry

log = structlog.get_logger("exporter.trigger")
BeforeSend = Callable[[int], Awaitable[None]]
Fence = Callable[[], Awaitable[float | None]]
"""Called right before each ad hoc call that carries the job's dataset: returns if the job
may be sent now, with the time (the engine's monotonic clock) the call must be on the wire by
for it, or None for any time; raises if not (the job then gets that error, and is left out of
the call). A call the rate limiter holds past that time is not sent, and is fenced again."""


@dataclass(slots=True)
class _Listener:
    """One job waiting for a dataset's run."""

    before_send: BeforeSend
    fence: Fence | None
    future: asyncio.Future[str]


@dataclass(slots=True)
class _Ask:
    """One dataset to trigger, for every job that waits for it."""

    dataset_id: str
    ready_at: float  # epoch seconds
    deadline: float  # monotonic: the latest of its jobs'
    listeners: list[_Listener]
    future: asyncio.Future[str]
    mark_ms: int | None = None

    def listen(self, before_send: BeforeSend, fence: Fence | None) -> _Listener:
        listener = _Listener(before_send, fence, asyncio.get_running_loop().create_future())
        self.listeners.append(listener)
        return listener

    def drop(self, listener: _Listener, error: BaseException | None = None) -> None:
        """`listener` waits no more: it gets `error` (or is cancelled); an ask nobody waits
        for is given up."""
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not listener.future.done():
            if error is None:
                listener.future.cancel()
            else:
                listener.future.set_exception(error)
                listener.future.exception()  # retrieved: its job may have gone meanwhile
        if not self.listeners and not self.future.done():
            self.future.cancel()

    def settled(self, future: asyncio.Future[str]) -> None:
        """The ask's outcome, passed on to each job that waits for it."""
        for listener in self.listeners:
            if listener.future.done():
                continue
            if future.cancelled():
                listener.future.cancel()
            elif (error := future.exception()) is not None:
                listener.future.set_exception(error)
                listener.future.exception()
            else:
                listener.future.set_result(future.result())


@dataclass(slots=True)
class _Queue:
    flow: FlowInfo
    asks: dict[str, _Ask] = field(default_factory=dict)
    worker: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Triggerer:
    def __init__(
        self,
        api: AepApi,
        config: EngineConfig,
        clock: Clock,
        rng: random.Random,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._clock = clock
        self._rng = rng
        # Waits after "not ready" and failed reads: doubling, kept between half and all of the
        # ceiling (AEP's readiness is minutes away, not a storm to spread out); bounded by the
        # asks' own deadlines, not by the policy.
        self._pace = Backoff(
            max_attempts=sys.maxsize,
            base_delay_s=config.not_ready_retry_s,
            max_delay_s=config.not_ready_retry_max_s,
            max_elapsed_s=math.inf,
            jitter=0.5,
        )
        self._metrics = metrics
        self._queues: dict[str, _Queue] = {}
        self.sent = 0  # ad hoc calls sent

    async def trigger(
        self,
        flow: FlowInfo,
        dataset_id: str,
        *,
        joined_ms: int,
        deadline: float,
        before_send: BeforeSend,
        fence: Fence | None = None,
    ) -> str:
        """The id of the run exporting `dataset_id` through `flow`. `before_send` hears the
        dataset's mark (ms) before its call goes out; `fence` is asked right before each
        call that would carry the dataset for this job, and what it raises, this raises.
        Raises `RunTimedOut` at `deadline` (monotonic), `AdhocNotEnabled`, `NotAMember`,
        other `AepError`s."""
        queue = self._queues.get(flow.id)
        if queue is None:
            queue = self._queues[flow.id] = _Queue(flow)
        queue.flow = flow
        ask = queue.asks.get(dataset_id)
        if ask is not None and not ask.future.done():  # jobs for one dataset share its run
            ask.deadline = max(ask.deadline, deadline)
            listener = ask.listen(before_send, fence)
            if ask.mark_ms is not None:  # its call is out: this job journals the same mark
                await before_send(ask.mark_ms)
        else:
            ready_at = joined_ms / 1000 + self._config.not_ready_wait_s
            # Never longer than the whole window: AEP's clock may be ahead of ours.
            ready_at = min(ready_at, self._clock.time() + self._config.not_ready_wait_s)
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            ask = queue.asks[dataset_id] = _Ask(dataset_id, ready_at, deadline, [], fut)
            fut.add_done_callback(ask.settled)
            listener = ask.listen(before_send, fence)
            queue.wake.set()
            if queue.worker is None or queue.worker.done():
                queue.worker = asyncio.create_task(self._work(queue), name=f"trigger-{flow.id}")
            wait = ready_at - self._clock.time()
            if wait > 0:
                log.info("trigger_waiting_for_dataset", flow_id=flow.id, seconds=round(wait, 1))
        try:
            run_id = await asyncio.shield(listener.future)
            # In the job's own context (the call went out in the worker's): one line a job.
            log.info("run_triggered", flow_id=flow.id, dataset_id=dataset_id, run_id=run_id)
            return run_id
        finally:
            ask.drop(listener)
            if queue.asks.get(dataset_id) is ask and ask.future.done():
                del queue.asks[dataset_id]

    async def adopt(self, flow_id: str, dataset_id: str, mark_ms: int) -> str | None:
        """The run of the dataset created after `mark_ms` (AEP's clock), if there is one."""
        runs = await self._api.runs_of_flow(flow_id, mark_ms)
        fresh = _after(runs, dataset_id, mark_ms)
        if fresh is not None:
            log.info("run_adopted", flow_id=flow_id, dataset_id=dataset_id, run_id=fresh.id)
            return fresh.id
        return None

    async def mark(self, flow_id: str) -> int:
        """The creation time of the flow's newest run (AEP's clock), or the start of the
        look-back window when the flow has none in it: the mark of every dataset of the flow,
        since no run of any of them is newer, so one of theirs created after it is new. One
        short read however many runs the flow has had: listing every run of a busy lane in
        the window made each mark read cost more the longer the daemon ran."""
        since = int((self._clock.time() - self._config.adopt_window_s) * 1000)
        newest = await self._api.newest_run(flow_id, since)
        return since if newest is None else max(since, newest.created_at_ms)

    async def aclose(self) -> None:
        tasks = [q.worker for q in self._queues.values() if q.worker is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the per-flow worker -----------------------------------------------------------------

    async def _work(self, queue: _Queue) -> None:
        try:
            while True:
                self._expire(queue)
                live = [a for a in queue.asks.values() if not a.future.done()]
                if not live:
                    return
                now = self._clock.time()
                ready = [a for a in live if a.ready_at <= now]
                if not ready:
                    soonest = min(a.ready_at for a in live) - now
                    await self._nap(queue, min(soonest, self._until_deadline(live)))
                    continue
                if self._config.trigger_coalesce_s and len(ready) < (
                    self._config.max_datasets_per_trigger
                ):
                    await self._clock.sleep(self._config.trigger_coalesce_s)
                    self._expire(queue)
                    ready = [
                        a
                        for a in queue.asks.values()
                        if not a.future.done() and a.ready_at <= self._clock.time()
                    ]
                batch = ready[: self._config.max_datasets_per_trigger]
                if batch:
                    await self._send(queue, batch)
        except asyncio.CancelledError:
            for ask in queue.asks.values():
                if not ask.future.done():
                    ask.future.cancel()
            raise
        except Exception as exc:  # a bug must fail the jobs, not leave them waiting
            log.exception("trigger_worker_failed", flow_id=queue.flow.id)
            for ask in queue.asks.values():
                _fail(ask, exc)
        finally:
            queue.worker = None

    def _expire(self, queue: _Queue) -> None:
        now = self._clock.monotonic()
        for ask in queue.asks.values():
            if not ask.future.done() and ask.deadline <= now:
                _fail(ask, RunTimedOut("the job's deadline passed while waiting to trigger"))

    def _until_deadline(self, asks: Sequence[_Ask]) -> float:
        return min(a.deadline for a in asks) - self._clock.monotonic()

    async def _nap(self, queue: _Queue, seconds: float) -> None:
        """Sleep `seconds` of the clock, or until a new dataset asks."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        queue.wake.clear()
        await sleep_or_wake(self._clock, seconds, queue.wake)

    async def _send(self, queue: _Queue, batch: list[_Ask]) -> None:
        """One batch to its runs: marks, journal, call; retries until each ask is settled."""
        flow_id = queue.flow.id
        unmarked = [a for a in batch if a.mark_ms is None]
        if unmarked:
            mark = await self._read_mark(queue, unmarked)
            if mark is None:
                return
            for ask in unmarked:
                ask.mark_ms = mark
            told = [(a, listener) for a in unmarked for listener in a.listeners]
            results = await asyncio.gather(
                *(listener.before_send(a.mark_ms or 0) for a, listener in told),
                return_exceptions=True,
            )
            for (ask, listener), result in zip(told, results, strict=True):
                if isinstance(result, BaseException):  # that job stops; the others go on
                    ask.drop(listener, result)
        step = 1  # how many times the pace has doubled, plus one
        uncertain = retrying = False
        while True:
            self._expire(queue)
            pending = [a for a in batch if not a.future.done()]
            if not pending:
                return
            if uncertain:
                try:
                    await self._adopt_all(flow_id, pending)
                except (TransportError, ServerError, ThrottledError) as exc:
                    log.warning("trigger_adoption_unreadable", flow_id=flow_id, error=str(exc))
                    await self._pause(queue, batch, self._paced(step))
                    step += 1
                    continue
                pending = [a for a in pending if not a.future.done()]
                if not pending:
                    return
            pending, send_by = await self._fence(pending)
            if not pending:
                continue
            if retrying and self._metrics is not None:
                self._metrics.api_retry("adhoc.run")
            retrying = uncertain = False
            pause = 0.0
            try:
                self.sent += 1
                runs = await self._api.trigger_many(
                    flow_id, [a.dataset_id for a in pending], send_by=send_by
                )
            except SendWindowMissed as exc:
                # Nothing went out: the jobs' fences are asked again before the next try.
                self.sent -= 1
                log.warning("trigger_send_window_missed", flow_id=flow_id, error=str(exc))
                continue
            except RunInProgress as exc:
                busy = next((a for a in pending if a.dataset_id == exc.dataset_id), None)
                if busy is None and len(pending) == 1:
                    busy = pending[0]
                if busy is not None and exc.run_id:
                    log.info("run_adopted", flow_id=flow_id, run_id=exc.run_id)
                    _resolve(busy, exc.run_id)
                else:  # AEP did not say which: each dataset's own run, if it has one
                    uncertain = True
                continue
            except NotReadyError:
                pause = self._paced(step)
                log.info("trigger_not_ready", flow_id=flow_id, retry_in=round(pause, 1))
                step += 1
            except ThrottledError as exc:
                pause = max(exc.retry_after or 0.0, self._paced(step) / 2)
                log.info("trigger_throttled", flow_id=flow_id, retry_in=round(pause, 1))
                retrying = True
            except (TransportError, ServerError) as exc:
                # The answer was lost or the server failed mid-way: runs may exist.
                uncertain = retrying = True
                pause = self._paced(step) / 2
                log.warning("trigger_uncertain", flow_id=flow_id, error=str(exc))
            except FlowDisabled:
                log.info("trigger_flow_disabled", flow_id=flow_id)
                await self._api.flow_action(flow_id, "enable")
                continue
            except NotAMember as exc:
                outsider = next((a for a in pending if a.dataset_id == exc.dataset_id), None)
                for a in [outsider] if outsider is not None else pending:
                    _fail(a, exc)
                continue
            except AdhocNotEnabled as exc:
                error = AdhocNotEnabled(
                    f"dataset export is not enabled for this destination (flow {flow_id}, "
                    f"flow spec {queue.flow.flow_spec_id}): {exc.message}",
                    status=exc.status,
                    operation="adhoc.run",
                )
                for a in pending:
                    _fail(a, error)
                return
            except AepError as exc:
                for a in pending:
                    _fail(a, exc)
                return
            else:
                for ask in pending:
                    run_id = runs.get(ask.dataset_id)
                    if run_id is not None:
                        _resolve(ask, run_id)
                missing = [a for a in pending if not a.future.done()]
                if missing:
                    uncertain = True
                    continue
                log.info("runs_triggered", flow_id=flow_id, datasets=len(pending))
                return
            await self._pause(queue, batch, pause)

    async def _read_mark(self, queue: _Queue, asks: list[_Ask]) -> int | None:
        """The mark, read again after failures until the asks' deadlines or
        `status_unreadable_s`: no call goes out without it (a lost answer could not be told
        from an old run)."""
        unreadable = (TransportError, ServerError, ThrottledError)

        async def read() -> int | None:
            if all(a.future.done() for a in asks):
                return None
            return await self.mark(queue.flow.id)

        def retrying(r: Retrying) -> None:
            log.warning("trigger_marks_unreadable", flow_id=queue.flow.id, error=str(r.error))

        async def pause(seconds: float) -> None:
            await self._pause(queue, asks, seconds)

        try:
            return await retry(
                read,
                policy=self._pace,
                clock=self._clock,
                rng=self._rng,
                retryable=lambda exc: isinstance(exc, unreadable),
                on_retry=retrying,
                deadline=self._clock.monotonic() + self._config.status_unreadable_s,
                sleep=pause,
            )
        except unreadable as exc:
            error = StatusUnreadable(
                f"the runs of flow {queue.flow.id} could not be read before the "
                f"trigger for {self._config.status_unreadable_s:g} s: {exc}"
            )
            for ask in asks:
                _fail(ask, error)
            return None

    async def _fence(self, asks: list[_Ask]) -> tuple[list[_Ask], float | None]:
        """Ask the fence of every job in the call, at once, right before it goes out; a job
        whose fence refuses is dropped with its error, and an ask left with no job is not
        sent. The asks to send, and the earliest time a fence wants the call on the wire by."""
        fenced: list[tuple[_Ask, _Listener]] = []
        checks: list[Awaitable[float | None]] = []
        for ask in asks:
            for listener in ask.listeners:
                if listener.fence is not None:
                    fenced.append((ask, listener))
                    checks.append(listener.fence())
        results = await asyncio.gather(*checks, return_exceptions=True)
        send_by: float | None = None
        for (ask, listener), result in zip(fenced, results, strict=True):
            if isinstance(result, BaseException):
                log.info("trigger_fenced", dataset_id=ask.dataset_id, error=repr(result))
                ask.drop(listener, result)
            elif result is not None:
                send_by = result if send_by is None else min(send_by, result)
        return [a for a in asks if not a.future.done() and a.listeners], send_by

    async def _adopt_all(self, flow_id: str, asks: Sequence[_Ask]) -> None:
        since = min(a.mark_ms or 0 for a in asks)
        runs = await self._api.runs_of_flow(flow_id, since)
        for ask in asks:
            fresh = _after(runs, ask.dataset_id, ask.mark_ms or 0)
            if fresh is not None:
                log.info("run_adopted", flow_id=flow_id, dataset_id=ask.dataset_id, run_id=fresh.id)
                _resolve(ask, fresh.id)

    def _paced(self, step: int) -> float:
        return self._pace.next_delay(step, self._rng) or self._pace.max_delay_s

    async def _pause(self, queue: _Queue, batch: Sequence[_Ask], seconds: float) -> None:
        live = [a for a in batch if not a.future.done()]
        if not live:
            return
        left = self._until_deadline(live)
        await self._clock.sleep(max(0.0, min(seconds, left)))
        self._expire(queue)


def _after(runs: Sequence[RunInfo], dataset_id: str, mark_ms: int) -> RunInfo | None:
    """The oldest run of the dataset created after the mark."""
    fresh = [r for r in runs if r.dataset_id == dataset_id and r.created_at_ms > mark_ms]
    return min(fresh, key=lambda r: r.created_at_ms) if fresh else None


def _resolve(ask: _Ask, run_id: str) -> None:
    if not ask.future.done():  # (its last job may have gone while the call was out)
        ask.future.set_result(run_id)


def _fail(ask: _Ask, error: BaseException) -> None:
    if not ask.future.done():
        ask.future.set_exception(error)
        ask.future.exception()  # retrieved: a job that left no longer awaits it
