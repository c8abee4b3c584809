"""The step after a run succeeds: where it landed, verified, signalled.

`Deliverer.deliver` adds the landing URI (and the landing zone's retention) to every
succeeded outcome; for a destination with a `verify` section it reads the folder back,
turns a difference into `delivery_mismatch`, writes the manifest and `_SUCCESS` once the
folder is verified, and sends the webhook in the background.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import aiohttp
import structlog

from exporter.aep.api import RunInfo
from exporter.clock import Clock
from exporter.delivery.landing import Landing, landing
from exporter.delivery.signals import MANIFEST, manifest, send_webhook, write_markers
from exporter.delivery.stores import Store, StoreError, open_store
from exporter.delivery.verify import Expected, verify
from exporter.destinations import Destination, DlzDestination
from exporter.errors import AepError, ConfigError
from exporter.jobs import Delivery, Job, JobState, Outcome
from exporter.redaction import SECRETS

log = structlog.get_logger("exporter.delivery")
WEBHOOK_DRAIN_S = 5.0
DLZ_CREDENTIALS_TTL_S = 600.0
"""How long the landing zone's credentials are reused: the account never changes, and a SAS
lasts far longer (docs/aep-notes.md#data-landing-zone); one call serves every job meanwhile."""


@runtime_checkable
class LandingZoneApi(Protocol):
    """An AEP client that can read the landing zone's credentials."""

    async def landing_zone_credentials(self) -> dict[str, Any]: ...


class Deliverer:
    """Owned by the engine: one per process; `aclose` ends the webhooks still going."""

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        *,
        dlz_credentials: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        open_store: Callable[..., Store] = open_store,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self._dlz_credentials = dlz_credentials
        self._open_store = open_store
        self._session: aiohttp.ClientSession | None = None
        self.webhooks: set[asyncio.Task[bool]] = set()
        self._dlz_lock = asyncio.Lock()
        self._dlz_answer: tuple[float, dict[str, Any]] | None = None

    async def _dlz(self) -> dict[str, Any] | None:
        """The landing zone's credentials, fetched once per `DLZ_CREDENTIALS_TTL_S` however
        many jobs finish at once."""
        if self._dlz_credentials is None:
            return None
        async with self._dlz_lock:
            cached = self._dlz_answer
            if cached is not None and self.clock.monotonic() - cached[0] < DLZ_CREDENTIALS_TTL_S:
                return cached[1]
            try:
                answer = await self._dlz_credentials()
            except AepError as exc:
                log.warning("landing_zone_credentials_failed", error=str(exc))
                return None
            for key in ("SASToken", "SASUri"):
                if isinstance(answer.get(key), str):
                    SECRETS.add(answer[key])
            if not isinstance(answer.get("storageAccountName"), str):
                log.warning("landing_zone_credentials_unreadable", keys=sorted(answer))
                return None
            self._dlz_answer = (self.clock.monotonic(), answer)
            return answer

    async def deliver(
        self,
        destination: Destination,
        job: Job,
        run: RunInfo,
        outcome: Outcome,
        *,
        schedule: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """`outcome` (of a succeeded run) with where it landed and, if the destination asks,
        what verification found."""
        dlz = await self._dlz() if isinstance(destination, DlzDestination) else None
        place = landing(
            destination,
            job.path,
            job.dataset_id,
            run.created_at_ms,
            schedule=schedule,
            dlz_account=str(dlz["storageAccountName"]) if dlz else None,
        )
        if place is not None:
            outcome = outcome.model_copy(
                update={"landing_uri": place.uri, "retention_days": place.retention_days}
            )
        if destination.verify is None:
            return outcome
        if place is None:
            return self._mismatch(
                outcome,
                Delivery(verdict="mismatch", differences=("the export folder is unknown",)),
                "cannot verify: the export folder cannot be derived (a folder template, or "
                "the landing zone's credentials could not be read)",
            )
        try:
            store = self._open_store(destination, place, dlz_sas=dlz)
        except Exception as exc:  # a store client refusing its options: say so, never crash
            why = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            why = SECRETS.scrub(why)
            return self._mismatch(
                outcome,
                Delivery(verdict="mismatch", differences=(why,)),
                f"cannot verify: {why}",
            )
        try:
            delivery = await self._check(destination, job, run, outcome, place, store)
        finally:
            await store.aclose()
        if delivery.verdict == "mismatch":
            outcome = self._mismatch(
                outcome, delivery, "delivery mismatch: " + "; ".join(delivery.differences)
            )
        else:
            outcome = outcome.model_copy(update={"delivery": delivery})
        log.info(
            "delivery_checked",
            verdict=delivery.verdict,
            landing_uri=place.uri,
            files=delivery.files,
            bytes=delivery.bytes,
            rows=delivery.rows,
            requests=delivery.requests,
            differences=list(delivery.differences),
        )
        webhook = destination.verify.webhook
        if webhook is not None:
            event = {
                "event": f"export.{delivery.verdict}",
                "job_id": job.job_id,
                "dataset_id": job.dataset_id,
                "run_id": run.id,
                "flow_id": outcome.flow_id,
                "state": outcome.state.value,
                "landing_uri": place.uri,
                "files": delivery.files,
                "bytes": delivery.bytes,
                "rows": delivery.rows,
                "records": outcome.records,
                "differences": list(delivery.differences),
                "manifest": delivery.manifest,
                "success_marker": delivery.success_marker,
            }
            if self._session is None:
                self._session = aiohttp.ClientSession()
            task = asyncio.create_task(
                send_webhook(self._session, webhook, event, clock=self.clock, rng=self.rng),
                name=f"webhook-{job.job_id}",
            )
            self.webhooks.add(task)
            task.add_done_callback(self.webhooks.discard)
        return outcome

    async def _check(
        self,
        destination: Destination,
        job: Job,
        run: RunInfo,
        outcome: Outcome,
        place: Landing,
        store: Store,
    ) -> Delivery:
        settings = destination.verify
        assert settings is not None
        expected = Expected(outcome.files, outcome.bytes, outcome.records)
        found = await verify(store, place.prefix, expected, settings, self.clock)
        differences = list(found.differences)
        manifest_name: str | None = None
        marker = False
        if not differences and (settings.manifest or settings.success_marker):
            body = (
                manifest(
                    found,
                    dataset_id=job.dataset_id,
                    run_id=run.id,
                    flow_id=outcome.flow_id,
                    export_time_ms=run.created_at_ms,
                    landing_uri=place.uri,
                    file_format=job.format,
                    compression=job.compression,
                )
                if settings.manifest
                else None
            )
            try:
                await write_markers(
                    store, place.prefix, manifest_bytes=body, success=settings.success_marker
                )
                manifest_name = MANIFEST if settings.manifest else None
                marker = settings.success_marker
            except StoreError as exc:
                differences.append(f"completion markers not written: {exc}")
        return Delivery(
            verdict="mismatch" if differences else "verified",
            files=len(found.files),
            bytes=found.bytes,
            rows=found.rows,
            differences=tuple(differences),
            requests=store.requests,
            success_marker=marker,
            manifest=manifest_name,
        )

    @staticmethod
    def _mismatch(outcome: Outcome, delivery: Delivery, message: str) -> Outcome:
        return outcome.model_copy(
            update={
                "state": JobState.DELIVERY_MISMATCH,
                "delivery": delivery,
                "message": SECRETS.scrub(message),
            }
        )

    async def aclose(self, within_s: float = WEBHOOK_DRAIN_S) -> None:
        """Give webhooks under way `within_s` to finish, then cancel them; close the session."""
        pending = set(self.webhooks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=within_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
