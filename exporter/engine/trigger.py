"""trigger: start the ad hoc run of a flow, patiently and exactly once.

AEP refuses ad hoc runs of a young flow ("not ready") for about ten minutes after its
creation, so the wait is measured from the flow's `createdAt`, not slept blindly; after
that, "not ready" answers are retried with backoff. "Already running" adopts that run. A
trigger whose answer was lost may or may not have started a run: before sending it again,
the runs of the flow created since the intent are looked up and adopted.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import structlog

from exporter.aepclient.api import AepApi, FlowInfo
from exporter.clock import Clock
from exporter.engine.config import EngineConfig
from exporter.engine.poller import RunTimedOut
from exporter.errors import (
    AdhocNotEnabled,
    NotReadyError,
    RunInProgress,
    ServerError,
    ThrottledError,
    TransportError,
)
from exporter.metrics import Metrics

log = structlog.get_logger("exporter.trigger")
CLOCK_SKEW_MS = 1_000  # tolerated skew between our clock and AEP's createdAt; a run missed
# because of a larger skew is still found: re-triggering it answers "already running"


class Triggerer:
    def __init__(
        self,
        api: AepApi,
        config: EngineConfig,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._metrics = metrics
        self.sent = 0

    async def trigger(
        self,
        flow: FlowInfo,
        dataset_id: str,
        *,
        intent_ms: int,
        deadline: float,
        on_wait: Callable[[float], Awaitable[None]] | None = None,
    ) -> str:
        """The id of the run exporting `dataset_id` through `flow`, started at or after
        `intent_ms`. Raises `RunTimedOut` at `deadline` (monotonic), `AdhocNotEnabled`."""
        ready_at = flow.created_at_ms / 1000 + self._config.not_ready_wait_s
        # Never longer than the whole window: AEP's clock may be ahead of ours.
        wait = min(ready_at - self._clock.time(), self._config.not_ready_wait_s)
        if wait > 0:
            log.info("trigger_waiting_for_flow", flow_id=flow.id, seconds=round(wait, 1))
            await self._sleep(wait, deadline, on_wait)
        delay = self._config.not_ready_retry_s
        uncertain = retrying = False  # retrying: after a failure (not a "not ready" answer)
        while True:
            if uncertain:
                adopted = await self.adopt(flow.id, intent_ms)
                if adopted is not None:
                    return adopted
            if retrying and self._metrics is not None:
                self._metrics.api_retry("adhoc.run")
            retrying = False
            try:
                self.sent += 1
                run_id = await self._api.trigger(flow.id, dataset_id)
            except RunInProgress as exc:
                log.info("run_adopted", flow_id=flow.id, run_id=exc.run_id)
                return exc.run_id
            except NotReadyError:
                pause = self._rng.uniform(delay / 2, delay)
                log.info("trigger_not_ready", flow_id=flow.id, retry_in=round(pause, 1))
                await self._sleep(pause, deadline, on_wait)
                delay = min(delay * 2, self._config.not_ready_retry_max_s)
                continue
            except ThrottledError as exc:
                pause = max(exc.retry_after or 0.0, self._rng.uniform(delay / 4, delay / 2))
                log.info("trigger_throttled", flow_id=flow.id, retry_in=round(pause, 1))
                await self._sleep(pause, deadline, on_wait)
                retrying = True
                continue
            except (TransportError, ServerError) as exc:
                # The answer was lost or the server failed mid-way: a run may exist. (A
                # request that was never sent is harmless to look for, too.)
                uncertain = retrying = True
                pause = self._rng.uniform(delay / 4, delay / 2)
                log.warning("trigger_uncertain", flow_id=flow.id, error=str(exc))
                await self._sleep(pause, deadline, on_wait)
                continue
            except AdhocNotEnabled as exc:
                raise AdhocNotEnabled(
                    f"dataset export is not enabled for this destination (flow {flow.id}, "
                    f"flow spec {flow.flow_spec_id}): {exc.message}",
                    status=exc.status,
                    operation="adhoc.run",
                ) from exc
            log.info("run_triggered", flow_id=flow.id, run_id=run_id)
            return run_id

    async def adopt(self, flow_id: str, intent_ms: int) -> str | None:
        """A run of the flow created since the trigger intent, if there is one."""
        runs = await self._api.runs_of_flow(flow_id, intent_ms - CLOCK_SKEW_MS)
        fresh = [r for r in runs if r.created_at_ms >= intent_ms - CLOCK_SKEW_MS]
        if fresh:
            log.info("run_adopted", flow_id=flow_id, run_id=fresh[0].id)
            return fresh[0].id
        return None

    async def _sleep(
        self, seconds: float, deadline: float, on_wait: Callable[[float], Awaitable[None]] | None
    ) -> None:
        left = deadline - self._clock.monotonic()
        if seconds >= left:
            await self._clock.sleep(max(0.0, left))
            raise RunTimedOut("the job's deadline passed while waiting to trigger its run")
        if on_wait is not None:
            await on_wait(seconds)
        await self._clock.sleep(seconds)
