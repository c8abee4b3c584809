"""One daemon from the settings: the core plus the services its configuration asks for."""

from __future__ import annotations

import os

from exporter.clock import Clock
from exporter.daemon import systemd
from exporter.daemon.admin import AdminServer
from exporter.daemon.daemon import Daemon
from exporter.daemon.redisintake import RedisIntake
from exporter.daemon.schedules import Schedules
from exporter.settings import Settings


def build_daemon(settings: Settings, *, clock: Clock) -> Daemon:
    daemon = Daemon(settings, clock=clock)
    daemon.add_service(Schedules(daemon))  # also without schedules: a reload may add some
    if settings.admin.enabled:
        daemon.add_service(AdminServer(daemon, settings.admin))
    if settings.redis is not None:
        daemon.add_service(RedisIntake(daemon, settings.redis))
    # Started by systemd with Type=notify: tell it about readiness, progress and liveness.
    notify = systemd.from_environment(daemon, os.environ, pid=os.getpid())
    if notify is not None:
        daemon.add_service(notify)
    return daemon
