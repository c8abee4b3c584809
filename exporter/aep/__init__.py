"""The seam to AEP: `api.AepApi` names the calls the engine makes; `client.HttpAep` makes
them over HTTP (through `transport`, `auth` and `ratelimit`), `fake.FakeAep` in memory for
unit tests; `facts` holds Adobe's ids and phrases.

Nothing is imported here, so that `exporter.aep.facts` costs no HTTP client to load."""
