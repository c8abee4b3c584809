"""Settings of the daemon process: where its state lives, how much it takes on at once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class LogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON lines unless standard error is a terminal."""
