"""The seam to AEP: `AepApi` names the calls the engine makes; `HttpAep` makes them over
HTTP, `FakeAep` in memory for unit tests."""

from exporter.aepclient.adhoc import TriggerOutcomeUnknown
from exporter.aepclient.api import AepApi, FlowInfo, RunInfo
from exporter.aepclient.config import AepConfig
from exporter.aepclient.fake import FakeAep
from exporter.aepclient.flowservice import HttpAep
from exporter.aepclient.ratelimit import RateLimiter

__all__ = [
    "AepApi",
    "AepConfig",
    "FakeAep",
    "FlowInfo",
    "HttpAep",
    "RateLimiter",
    "RunInfo",
    "TriggerOutcomeUnknown",
]
