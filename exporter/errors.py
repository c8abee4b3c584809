"""Every error aep-exporter raises, in one tree. Each says whether trying again may help.

Most are defined here; a few live next to the one piece that raises them (its module in
brackets). tests/test_errors.py checks this tree against the classes, both ways.

ExporterError
├── ConfigError                   settings or a job that cannot be used as given
│   ├── LaneBudgetExhausted       no room for another flow, and no idle lane to retire in time
│   └── Rejected                  [jobs] a job file or body that is not a usable job
├── ApiRequestError               a request to the daemon's own HTTP API is wrong (400)
│   ├── BadQuery                  [sources.http] the jobs API's query
│   └── BadPrune                  [ops.admin_lanes] a lanes prune request
├── ClientClosed                  the AEP client was used after it was closed
├── IllegalTransition             [jobs] a job state change the diagram does not allow
├── RunTimedOut                   [engine.poller] the job's deadline passed before its run ended
├── StatusUnreadable              [engine.poller] AEP would not tell a run's status for too long
├── RedisUnavailable              [sources.redis.store] Redis down for longer than outage_s
├── Corrupt                       [daemon.journal_file] the journal is not a usable database
├── Unwritable                    [daemon.journal] the daemon's writes are failing now
├── Stopped                       [oneshot] SIGINT or SIGTERM stopped the `export` command
├── StoreError                    [delivery.stores] a destination could not be read back
├── NotParquet                    [delivery.parquet] a file's footer is not Parquet's
├── WebhookFailed                 [delivery.signals] a completion webhook was not accepted
├── QueryFailed                   [engine.query] the job's Data Distiller query ended it
└── AepError                      something AEP (or the way to it) answered or failed to
    ├── TransportError            no answer: connection refused/reset/dropped, timeout  [retry]
    │   ├── ConnectError          [aep.envelopes] no connection: never sent             [retry]
    │   │   ├── TlsError          [aep.envelopes] the certificate could not be verified
    │   │   └── DnsError          [aep.envelopes] the host name does not resolve
    │   └── TriggerOutcomeUnknown [aep.adhoc] a trigger sent, its answer lost: look first
    ├── SendWindowMissed          not sent: held past its fence's send-by time          [retry]
    ├── AuthError                 IMS refused the credentials, or the gateway the token
    ├── ThrottledError            429                                                   [retry]
    ├── ServerError               5xx                                                   [retry]
    ├── NotFoundError             404
    ├── PreconditionFailed        412: the entity changed since its etag was read       [retry]
    ├── RequestError              any other 4xx: the request itself is wrong
    └── AdhocError                the ad hoc run service said no
        ├── NotReadyError         the flow is too young for dataset export              [retry]
        ├── AdhocNotEnabled       dataset export is not enabled for the flow's destination
        ├── RunInProgress         a run of this flow and dataset is going on: adopt it
        ├── FlowDisabled          the flow is disabled
        └── NotAMember            a dataset of the call is not part of the flow
"""

from __future__ import annotations

from exporter.redaction import SECRETS


class ExporterError(Exception):
    """Base of every error raised by aep-exporter."""

    retryable: bool = False


class ConfigError(ExporterError):
    """Configuration, a destination or a job is invalid; the message says where and why."""


class ApiRequestError(ExporterError):
    """A request to the daemon's own HTTP API is wrong; the message says how (answered 400)."""


class ClientClosed(ExporterError):
    """A request was attempted after the AEP client was closed (a task outlived its owner)."""


class AepError(ExporterError):
    """AEP answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        operation: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        # AEP's errors may echo a secret we sent (docs/aep-notes.md): no error keeps one.
        message = SECRETS.scrub(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = SECRETS.scrub(code) if code else code
        self.operation = operation
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"{self.operation}: " if self.operation else ""
        status = (
            f" (HTTP {self.status}{', ' + self.code if self.code else ''})" if self.status else ""
        )
        return f"{where}{self.message}{status}"


class TransportError(AepError):
    retryable = True


class SendWindowMissed(AepError):
    """A call that must be on the wire by a time (a fenced trigger: the job's lease) was not
    sent, because the token or the rate limiter made it wait past that time. Nothing reached
    AEP: it is safe to fence again and send."""

    retryable = True


class AuthError(AepError):
    pass


class ThrottledError(AepError):
    retryable = True


class ServerError(AepError):
    retryable = True


class NotFoundError(AepError):
    pass


class PreconditionFailed(AepError):
    retryable = True


class RequestError(AepError):
    pass


class AdhocError(AepError):
    pass


class NotReadyError(AdhocError):
    retryable = True


class AdhocNotEnabled(AdhocError):
    pass


class RunInProgress(AdhocError):
    """A dataset of the call already has a run going on (AEP names one dataset, when it does,
    and refuses the whole call)."""

    def __init__(
        self, message: str, *, run_id: str, dataset_id: str = "", **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.run_id = run_id
        self.dataset_id = dataset_id


class FlowDisabled(AdhocError):
    """The flow is disabled (by another job's `after_run`, another daemon, a person)."""


class NotAMember(AdhocError):
    """A dataset of the call is not (or no longer) part of the flow."""

    def __init__(self, message: str, *, dataset_id: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.dataset_id = dataset_id


class LaneBudgetExhausted(ConfigError):
    """No room for another flow in the sandbox and no idle lane to retire in time."""
