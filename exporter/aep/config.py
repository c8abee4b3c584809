"""How to reach AEP: hosts, credentials, sandbox, timeouts, pacing and the retry policy.

Built once at the edge (the CLI's settings) and handed to `HttpAep.from_config`. TLS
verification is not configurable: it is always on. Plain `http://` is accepted only for a
loopback host, which is where the emulator listens.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from exporter.net import is_loopback
from exporter.redaction import Secret
from exporter.retry import Backoff

# The scopes of Adobe's own AEP sample (aep-cloud-ml-ecosystem conf/config.ini).
DEFAULT_SCOPES = (
    "openid",
    "AdobeID",
    "read_organizations",
    "additional_info.projectedProductContext",
    "session",
)


def _check_url(value: str) -> str:
    url = URL(value.strip())
    if url.scheme not in ("https", "http") or not url.host:
        raise ValueError(f"{value!r} is not an http(s) URL with a host")
    if url.scheme == "http" and not is_loopback(url.host):
        raise ValueError(f"{value!r} must use https (plain http is only for a loopback emulator)")
    if url.user or url.password or url.query_string or url.fragment:
        raise ValueError(f"{value!r} must not carry credentials, a query or a fragment")
    return str(url).rstrip("/")


class AepConfig(BaseModel):
    """Connection settings for one org and sandbox. Secrets are `SecretStr`: never printed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    platform_url: str = "https://platform.adobe.io"
    ims_url: str = "https://ims-na1.adobelogin.com"
    client_id: str = Field(min_length=1)
    client_secret: Secret
    org_id: str = Field(min_length=1)
    sandbox: str = Field(default="prod", min_length=1)
    scopes: tuple[str, ...] = Field(default=DEFAULT_SCOPES, min_length=1)

    request_timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_concurrency: int = Field(default=8, ge=1, le=256)
    rate_limit_rps: float = Field(default=10.0, gt=0)
    rate_limit_min_rps: float = Field(default=0.5, gt=0)

    max_attempts: int = Field(default=6, ge=1)
    base_delay_s: float = Field(default=0.5, gt=0)
    max_delay_s: float = Field(default=30.0, gt=0)
    max_elapsed_s: float = Field(default=300.0, gt=0)
    token_refresh_margin_s: float = Field(default=300.0, ge=0)

    @field_validator("platform_url", "ims_url")
    @classmethod
    def _secure_url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("client_secret")
    @classmethod
    def _secret_present(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("client_secret must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AepConfig:
        if self.rate_limit_min_rps > self.rate_limit_rps:
            raise ValueError(
                f"rate_limit_min_rps ({self.rate_limit_min_rps}) is above "
                f"rate_limit_rps ({self.rate_limit_rps})"
            )
        if self.base_delay_s > self.max_delay_s:
            raise ValueError(
                f"base_delay_s ({self.base_delay_s}) is above max_delay_s ({self.max_delay_s})"
            )
        return self

    def backoff(self) -> Backoff:
        """The retry policy these settings describe."""
        return Backoff(
            max_attempts=self.max_attempts,
            base_delay_s=self.base_delay_s,
            max_delay_s=self.max_delay_s,
            max_elapsed_s=self.max_elapsed_s,
        )
