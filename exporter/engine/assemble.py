"""One engine from the settings, as every command that exports builds it: the daemon and the
one-shot commands (`export`, `lanes`) find the same lanes."""

from __future__ import annotations

import random

from exporter.aep.api import AepApi
from exporter.clock import Clock
from exporter.engine.engine import Engine
from exporter.metrics import Metrics
from exporter.settings import Settings


def engine_for(
    settings: Settings,
    api: AepApi,
    clock: Clock,
    *,
    metrics: Metrics | None = None,
    rng: random.Random | None = None,
) -> Engine:
    """The engine for `settings`' org, sandbox, destinations and engine section, with the AEP
    client secret as the key that tells destinations apart by their credentials."""
    return Engine(
        api,
        settings.destinations,
        settings.engine,
        org_id=settings.aep.org_id,
        sandbox=settings.aep.sandbox,
        clock=clock,
        identity_key=settings.aep.client_secret.get_secret_value().encode(),
        metrics=metrics,
        rng=rng,
    )
