"""One daemon from the settings: the core plus the services its configuration asks for."""

from __future__ import annotations

import os

from exporter.clock import Clock
from exporter.daemon.core import Daemon
from exporter.ops import systemd
from exporter.ops.admin import AdminServer
from exporter.settings import Settings
from exporter.sources.schedules import Schedules


def build_daemon(settings: Settings, *, clock: Clock) -> Daemon:
    daemon = Daemon(settings, clock=clock)
    daemon.add_service(Schedules(daemon))  # also without schedules: a reload may add some
    if settings.admin.enabled:
        daemon.add_service(AdminServer(daemon, settings.admin))
    if settings.redis is not None:
        # Imported here: the redis client is an extra, needed only with [redis] set.
        from exporter.sources.redis.intake import RedisIntake

        daemon.add_service(RedisIntake(daemon, settings.redis))
    # Started by systemd with Type=notify: tell it about readiness, progress and liveness.
    notify = systemd.from_environment(daemon, os.environ, pid=os.getpid())
    if notify is not None:
        daemon.add_service(notify)
    return daemon
