"""Settings of the daemon process: where its state lives, how much it takes on at once."""

from __future__ import annotations

import importlib.util
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, unquote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exporter.destinations import read_secret
from exporter.jobs import Job
from exporter.net import is_loopback
from exporter.redaction import SECRETS, Secret


def secret_from_file(data: Any, field: str) -> Any:
    """Raw settings with `<field>_file` read into `<field>` (a secret given by its file)."""
    if isinstance(data, dict) and f"{field}_file" in data:
        data = dict(data)
        if data.get(field) is not None:
            raise ValueError(f"give either {field} or {field}_file, not both")
        data[field] = read_secret(Path(str(data.pop(f"{field}_file"))))
    return data


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Path("/var/lib/aep-exporter")
    """The journal (SQLite) lives here; it must survive restarts."""
    spool_dir: Path = Path("/var/lib/aep-exporter/spool")
    """incoming/, processing/, done/, failed/, rejected/ are created inside."""
    max_in_flight: int = Field(default=1000, ge=1, le=100_000)
    """Jobs worked on at once; more files wait in incoming/ unclaimed."""
    rescan_s: float = Field(default=5.0, gt=0)
    """Spool rescan period, on top of inotify events where available."""
    watch: bool = True
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long in-flight calls may take to finish before they are cancelled."""
    max_job_file_bytes: int = Field(default=1_048_576, ge=1024)
    journal_retention_days: float = Field(default=30.0, ge=0)
    """Finished jobs are deleted from the journal this long after they finished (at start and
    every few hours), and the file shrinks; 0 keeps them forever. Unfinished jobs are always
    kept. A job id forgotten this way may be exported again."""


class LogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON lines unless standard error is a terminal."""


REDIS_EXTRA = "pip install 'aep-exporter[redis]'"


class RedisConfig(BaseModel):
    """Redis Streams intake (`exporter/sources/redis/intake.py`): jobs from a consumer group,
    outcomes to a results stream, messages that are not jobs to a dead-letter stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    """redis://, rediss:// (TLS) or unix://; put the password in `password_file`."""
    password: Secret | None = None
    """Given as `password_file` (a secret file); never logged."""
    insecure_plaintext: bool = False
    """Allow a password over plain `redis://` to a host that is not this machine (it travels
    in clear text): otherwise such a url is refused; use `rediss://`."""
    stream: str = Field(default="aep-exporter:jobs", min_length=1)
    """Producers XADD jobs here: the field `job` holds the job document (JSON)."""
    group: str = Field(default="aep-exporter", min_length=1)
    consumer: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    """This daemon's name in the group: the same across its restarts (it finds its own
    pending messages by it), different for every daemon on the stream."""
    results_stream: str = Field(default="aep-exporter:results", min_length=1)
    dead_letter_stream: str = Field(default="aep-exporter:dead-letter", min_length=1)
    lease_s: float = Field(default=60.0, ge=0.5, le=3600)
    """A daemon silent for this long loses its jobs to the others; a live one renews its
    claims every third of it."""
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    """A job delivered more often goes to the dead-letter stream: its first claim and each
    takeover by another daemon (from daemons that died with it) count; a daemon's own
    restarts do not."""
    read_count: int = Field(default=100, ge=1, le=10_000)
    """Messages read at once, never more than the daemon has room for."""
    block_s: float = Field(default=5.0, gt=0, le=60)
    """How long one read waits for new messages."""
    outage_s: float = Field(default=30.0, gt=0)
    """How long Redis may be unreachable before the daemon gives up (exit 70; systemd
    restarts it, and it picks up where it was). Shorter than `lease_s`: a daemon must not go
    on waiting for Redis after its jobs may have been taken over."""
    done_ttl_s: float = Field(default=7 * 86400.0, ge=60)
    """How long a finished job id is remembered: a redelivery or a duplicate within it is
    acknowledged without running again."""
    results_maxlen: int = Field(default=1_000_000, ge=1000)
    """The results and dead-letter streams are trimmed to about this many entries."""

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, data: Any) -> Any:
        return secret_from_file(data, "password")

    @model_validator(mode="before")
    @classmethod
    def _client_installed(cls, data: Any) -> Any:
        # The client comes with the `redis` extra, imported only when this section is set.
        if importlib.util.find_spec("redis") is None:
            raise ValueError(f"the Redis intake needs the redis client: {REDIS_EXTRA}")
        return data

    @model_validator(mode="after")
    def _coherent(self) -> RedisConfig:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        in_url = parts.password or any(_is_password(p) for p in parts.query.split("&"))
        if in_url and self.password is not None:
            raise ValueError("the url holds a password and password_file gives one: keep one")
        has_password = bool(in_url) or self.password is not None
        if (
            parts.scheme == "redis"
            and has_password
            and not is_loopback(parts.hostname)
            and not self.insecure_plaintext
        ):
            raise ValueError(
                f"a password over plain redis:// to {parts.hostname} would travel in clear "
                "text: use rediss:// (TLS), or set insecure_plaintext = true on a network "
                "you trust"
            )
        # A password in the url is scrubbed from errors and logs like password_file's.
        for given in [unquote(parts.password or "")] + [
            unquote_plus(p.partition("=")[2]) for p in parts.query.split("&") if _is_password(p)
        ]:
            SECRETS.add(given)
        if self.outage_s >= self.lease_s:
            raise ValueError(
                f"outage_s ({self.outage_s:g}) must be shorter than lease_s ({self.lease_s:g}): "
                "a daemon still waiting for Redis after its lease could trigger a job that "
                "another daemon has taken over"
            )
        names = [self.stream, self.results_stream, self.dead_letter_stream]
        if len(set(names)) != len(names):
            raise ValueError("stream, results_stream and dead_letter_stream must differ")
        return self

    @property
    def safe_url(self) -> str:
        """The url for logs and errors: a password in it (`:pw@` or `?password=pw`, which
        redis-py reads too) is replaced by ***."""
        url = self.url
        parts = urlsplit(url)
        if parts.password:
            host = parts.netloc.rsplit("@", 1)[1]
            user = parts.username or ""
            url = parts._replace(netloc=f"{user}:***@{host}").geturl()
        head, mark, rest = url.partition("?")
        query, hash_mark, fragment = rest.partition("#")
        masked = "&".join(
            f"{p.partition('=')[0]}=***" if _is_password(p) else p for p in query.split("&")
        )
        return head + mark + masked + hash_mark + fragment


def _is_password(pair: str) -> bool:
    """Whether a url query's `name=value` pair gives the password (as redis-py reads it)."""
    return unquote_plus(pair.partition("=")[0]).strip().lower() == "password"


MIN_TOKEN_CHARS = 16


class AdminConfig(BaseModel):
    """The admin server: /healthz, /readyz, /metrics and the /v1/jobs API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    host: str = "127.0.0.1"
    """Loopback by default; any other address requires `token_file`."""
    port: int = Field(default=9464, ge=0, le=65535)
    """0 picks a free port; the bound one is logged (`admin_listening`)."""
    token: Secret | None = None
    """A bearer token; give it as `token_file` (a secret file) rather than inline."""
    loop_stall_s: float = Field(default=5.0, gt=0)
    """/healthz fails when the event loop was blocked longer than this..."""
    loop_stall_window_s: float = Field(default=30.0, gt=0)
    """...at any time within this many seconds (a stall between two probes is seen)."""
    check_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of each /readyz check (AEP token, journal)."""
    max_body_bytes: int = Field(default=65_536, ge=1024, le=16_777_216)
    max_connections: int = Field(default=64, ge=1, le=10_000)
    """Connections open at once; past it a new one is answered 503 and closed."""
    idle_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    """A connection with no request under way (idle, or its headers not all come) this long
    after it opened or its last answer is closed."""
    read_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """A request body must arrive within this, or the answer is 408."""
    allowed_hosts: tuple[str, ...] = ()
    """More `Host` header values to accept (`name` or `name:port`), e.g. the name of a
    Kubernetes Service or a forwarded port; loopback names and the address a request came
    to, with the bound port, are always accepted."""

    @model_validator(mode="before")
    @classmethod
    def _token_file(cls, data: Any) -> Any:
        return secret_from_file(data, "token")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_values(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not host or any(c.isspace() or c in "/@?#" for c in host):
                raise ValueError(
                    f"allowed_hosts: {host!r} is not a Host header value: give a name or "
                    "address, optionally with :port (no scheme, no path)"
                )
        return value

    @model_validator(mode="after")
    def _guarded(self) -> AdminConfig:
        if self.token is not None and len(self.token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must be at least {MIN_TOKEN_CHARS} characters")
        if self.enabled and self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address, so the admin server needs a "
                "bearer token: set admin.token_file to a file holding one (at least "
                f"{MIN_TOKEN_CHARS} characters), or bind admin.host to 127.0.0.1"
            )
        return self


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SCHEDULE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class ScheduleConfig(BaseModel):
    """A recurring export, `[[schedules]]`: a trigger (cron or interval) and a job template.

    Each fire is a job with the id `<name>@<slot time in UTC>`, so a slot fired twice is one
    job. The destination the template names is checked against `destinations` by Settings.
    What it does is in `exporter.sources.schedules` (`trigger_of`): this is only its data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SCHEDULE_NAME)
    """Letters, digits and . _ - (up to 100): part of every job id the schedule makes."""
    cron: str | None = None
    """Five crontab fields, minute hour day-of-month month day-of-week, in `timezone`."""
    interval_s: int | None = Field(default=None, ge=1, le=366 * 86400)
    """Or every this many seconds, counted from the Unix epoch (3600: on the hour), so every
    daemon and every restart sees the same slots."""
    timezone: str = "UTC"
    """The IANA time zone `cron` is read in (e.g. Europe/Berlin)."""
    job: Job
    """The job each fire submits: a job document's fields without `id`."""
    misfire_grace_s: int = Field(default=300, ge=1)
    """A slot noticed later than this (the daemon was down, the machine asleep) is skipped."""
    coalesce: bool = True
    """Several slots due at once fire once, for the latest; false: each in turn."""
    enabled: bool = True

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name: UTC, Europe/Berlin)"
            ) from None
        return value

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is None:
            return None
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(
                f"a cron expression has 5 fields (minute hour day month weekday), not {len(fields)}"
            )
        if any(c.isdigit() for c in fields[4]):
            # APScheduler 3 counts weekdays from Monday = 0, crontab from Sunday = 0: a
            # number would silently shift the day.
            raise ValueError("name days of the week (mon-fri, sat,sun), do not number them")
        # Imported here: only a configuration with schedules needs APScheduler to check
        # them (the one-shot `export` command does without it).
        from apscheduler.triggers.cron import CronTrigger

        try:
            trigger = CronTrigger.from_crontab(value, timezone=UTC)
        except ValueError as exc:
            raise ValueError(f"not a valid cron expression: {exc}") from None
        if trigger.get_next_fire_time(None, EPOCH) is None:
            raise ValueError(f"the cron expression {value!r} never fires")
        return " ".join(fields)

    @field_validator("job")
    @classmethod
    def _no_id(cls, value: Job) -> Job:
        if value.id is not None:
            raise ValueError("a schedule names its jobs <schedule>@<slot time>: remove job.id")
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron and interval_s")
        return self

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron} ({self.timezone})"
        return f"every {self.interval_s} s"
