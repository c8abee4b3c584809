"""The export engine: flows, triggers, the shared run poller, and the job runner."""

from exporter.engine.config import EngineConfig
from exporter.engine.engine import Engine, Progress

__all__ = ["Engine", "EngineConfig", "Progress"]
