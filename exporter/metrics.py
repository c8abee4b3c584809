"""Prometheus metrics of one daemon, in a registry of its own (tests build many daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


class Metrics:
    """Every metric the daemon exposes on `/metrics`; components record into it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
