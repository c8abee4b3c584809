"""One engine from the settings, as every command that exports builds it."""

from __future__ import annotations

from exporter.aep.client import HttpAep
from exporter.clock import Clock
from exporter.engine.engine import Engine
from exporter.settings import Settings


def engine_for(settings: Settings, api: HttpAep, clock: Clock) -> Engine:
    """The engine a one-shot command uses: the same lanes the daemon finds."""
    return Engine(
        api,
        settings.destinations,
        settings.engine,
        org_id=settings.aep.org_id,
        sandbox=settings.aep.sandbox,
        clock=clock,
        identity_key=settings.aep.client_secret.get_secret_value().encode(),
    )
