"""A destination's `verify` section: how to read the export back, and what to signal.

Read credentials may differ from the write credentials AEP holds (a read-only key, a SAS with
list and read rights); where the section gives none, the destination's own are used. Secret
values are `Secret`s, so they are scrubbed from every message like the destination's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exporter.net import is_loopback
from exporter.redaction import Secret

EXTRA_HINT = "pip install 'aep-exporter[delivery]'"


def _check_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return value
    raise ValueError(
        f"{what} must be an https:// URL (plain http:// only to this machine's loopback)"
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """`<name>_file = "/path"` fills the secret `<name>` from that file, as for a
        destination's own secrets."""
        if not isinstance(data, dict):
            return data
        from exporter.destinations import read_secret

        out = dict(data)
        for key, value in data.items():
            name = key.removesuffix("_file")
            if key.endswith("_file") and name in cls.model_fields and name != "known_hosts":
                if data.get(name) is not None:
                    raise ValueError(f"give either {name} or {key}, not both")
                out[name] = read_secret(Path(str(value)))
                del out[key]
        return out


class WebhookSettings(_Section):
    """A POST to `url` once the export is verified (or found wrong), signed with HMAC-SHA256
    over the exact body under `secret`; retried with backoff in the background."""

    url: str
    secret: Secret
    attempts: int = Field(default=5, ge=1, le=20)
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_elapsed_s: float = Field(default=300.0, gt=0, le=86400)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, "webhook url")


class VerifySettings(_Section):
    """Opt-in delivery verification for one destination."""

    store: Literal["auto", "local"] = "auto"
    """`auto`: the destination's own protocol (S3, Azure, GCS, SFTP, the landing zone's SAS);
    `local`: a folder standing for the bucket or container root (the emulator's default)."""
    root: Path | None = None
    """With `store = "local"`: the folder that stands for the bucket, container or SFTP root."""
    endpoint: str | None = None
    """Another endpoint for the store's API (an S3-compatible server, Azurite, a GCS
    emulator); https, or http to loopback only."""
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: Secret | None = None
    account_key: Secret | None = None
    sas_token: Secret | None = None
    username: str | None = None
    password: Secret | None = None
    ssh_key: Secret | None = None
    """An SFTP private key (OpenSSH/PEM text) for reading; else the destination's."""
    known_hosts: Path | None = None
    """SFTP: the known_hosts file the server's key must be in. Without it, the daemon user's
    ~/.ssh/known_hosts; only a server on this machine (loopback) goes unchecked."""
    port: int | None = Field(default=None, ge=1, le=65535)
    attempts: int = Field(default=4, ge=1, le=20)
    """Tries of each request to an object store (obstore retries 5xx, dropped connections
    and time-outs with backoff); `timeout_s` bounds each try."""
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    grace_s: float = Field(default=300.0, ge=0, le=86400)
    """How long to keep looking for the folder (and for it to match) before a mismatch."""
    poll_s: float = Field(default=15.0, gt=0, le=3600)
    compare_bytes: bool = True
    success_marker: bool = True
    """Write an empty `_SUCCESS` into the export folder once verified."""
    manifest: bool = True
    """Write `_manifest.json` (files, sizes, rows, dataset, run, export time, schema)."""
    webhook: WebhookSettings | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "verify.endpoint")

    @model_validator(mode="after")
    def _coherent(self) -> VerifySettings:
        if self.store == "local" and self.root is None:
            raise ValueError('store = "local" needs root, the folder standing for the bucket')
        if self.store != "local" and self.root is not None:
            raise ValueError('root is only for store = "local"')
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("verify.access_key_id and verify.secret_access_key go together")
        return self

    def require_reader(self, storage_type: str) -> None:
        """Raise ValueError naming the extra when the library that reads `storage_type`
        back is not installed (verification is opt-in; the runtime carries neither)."""
        if self.store == "local":
            return
        module = "asyncssh" if storage_type == "sftp" else "obstore"
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"verify needs {module} to read a {storage_type} destination back, and it is "
                f"not installed: {EXTRA_HINT}"
            )
