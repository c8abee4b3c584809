"""The seam to AEP: `AepApi` names the calls the engine makes; `HttpAep` makes them over
HTTP, `FakeAep` in memory for unit tests."""

from exporter.aepclient.api import AepApi, FlowInfo, RunInfo

__all__ = ["AepApi", "FlowInfo", "RunInfo"]
