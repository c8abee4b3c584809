"""A reload (SIGHUP): new destinations and schedules for jobs that start from now on.

Jobs in flight go on undisturbed; other changed sections are logged as needing a restart. A
configuration that does not load is refused and the old one kept. Reloads run one at a time;
of those that wait, one runs and reads the newest file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from exporter.daemon.admission import Reconfigurable
from exporter.errors import ConfigError
from exporter.settings import Settings

if TYPE_CHECKING:
    from exporter.daemon.core import Daemon

log = structlog.get_logger("exporter.daemon")
RELOADABLE = ("destinations", "schedules")  # the settings a reload (SIGHUP) takes


class Reloader:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = asyncio.Lock()
        self._queued = False

    async def reload(self, load: Callable[[], Settings]) -> bool | None:
        """See `Daemon.reload`."""
        if self._queued:
            log.info("reload_coalesced")
            return None
        self._queued = True
        try:
            await self._lock.acquire()
        finally:
            self._queued = False
        daemon = self.daemon
        try:
            if not daemon.ready.is_set():  # a SIGHUP during start: reload once running
                ready = asyncio.ensure_future(daemon.ready.wait())
                stopping = asyncio.ensure_future(daemon.wait_stopping())
                try:
                    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ready.cancel()
                    stopping.cancel()
            if daemon.stopping:
                return None
            return await self._reload(load)
        finally:
            self._lock.release()

    async def _reload(self, load: Callable[[], Settings]) -> bool:
        for hook in self.daemon.on_reloading:
            hook()
        log.info("reload_started")
        ok = False
        try:
            new = await asyncio.to_thread(load)
        except ConfigError as exc:
            log.error("reload_refused", reason=str(exc))
        except Exception as exc:
            log.exception("reload_refused", reason=f"internal error: {exc!r}")
        else:
            self._apply(new)
            ok = True
        finally:
            for report in self.daemon.on_reloaded:
                report(ok)
        return ok

    def _apply(self, new: Settings) -> None:
        daemon = self.daemon
        old = daemon.settings
        restart = sorted(
            name
            for name in Settings.model_fields
            if name not in RELOADABLE and getattr(new, name) != getattr(old, name)
        )
        daemon.settings = old.model_copy(update={name: getattr(new, name) for name in RELOADABLE})
        daemon.engine.use_destinations(daemon.settings.destinations)
        for service in daemon.services:
            if isinstance(service, Reconfigurable):
                service.reconfigure(daemon.settings)
        before, after = old.destinations, new.destinations
        log.info(
            "reload_done",
            destinations_added=sorted(after.keys() - before.keys()),
            destinations_removed=sorted(before.keys() - after.keys()),
            destinations_changed=sorted(
                n for n in before.keys() & after.keys() if before[n] != after[n]
            ),
        )
        if restart:
            log.warning("reload_needs_restart", sections=restart)
