"""One daemon from the settings: the core plus the services its configuration asks for."""

from __future__ import annotations

import os
import random

from exporter.clock import Clock
from exporter.daemon.core import Daemon
from exporter.ops import systemd
from exporter.ops.admin import AdminServer
from exporter.settings import Settings
from exporter.sources.schedules import Schedules
from exporter.sources.spool import SpoolIntake


def build_daemon(settings: Settings, *, clock: Clock, rng: random.Random | None = None) -> Daemon:
    """`rng`: the one source of jitter for the whole daemon (AEP client, engine, Redis,
    storage retries); a fresh one unless given (seeded in tests)."""
    daemon = Daemon(settings, clock=clock, rng=rng or random.Random())
    admissions = daemon.admissions
    daemon.add_service(SpoolIntake(admissions))
    daemon.add_service(Schedules(admissions))  # also without schedules: a reload may add some
    if settings.admin.enabled:
        admin = AdminServer(
            admissions,
            settings.admin,
            dead=daemon.health.dead,
            api=daemon.api,
            lanes=daemon.engine.lanes,
        )
        daemon.add_service(admin)
    if settings.redis is not None:
        # Imported here: the redis client is an extra, needed only with [redis] set.
        from exporter.sources.redis.intake import RedisIntake

        daemon.add_service(RedisIntake(admissions, settings.redis))
    # Started by systemd with Type=notify: tell it about readiness, progress and liveness.
    notify = systemd.from_environment(admissions, os.environ, pid=os.getpid())
    if notify is not None:
        daemon.add_service(notify)
    return daemon
