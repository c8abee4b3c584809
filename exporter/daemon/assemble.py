"""One daemon from the settings: the core plus the services its configuration asks for."""

from __future__ import annotations

from exporter.clock import Clock
from exporter.daemon.daemon import Daemon
from exporter.settings import Settings


def build_daemon(settings: Settings, *, clock: Clock) -> Daemon:
    daemon = Daemon(settings, clock=clock)
    return daemon
