"""The export engine: `engine.Engine` runs one job from its lane to its outcome, with
`lanes` (one flow, many datasets), `trigger` (batched ad hoc runs) and `poller` (batched
status reads); `config.EngineConfig` is its settings.

Nothing is imported here, so that the settings (which need `config`) load no HTTP client."""
