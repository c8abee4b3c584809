"""What `export` remembers between two runs of the same command: the job's last step in AEP.

Ctrl-C (or SIGTERM) stops the command, not the run AEP started. The same arguments give the
same job id (`Job.job_id`), so running the same command again finds this note and resumes from
it as the daemon resumes from its journal: it adopts the run its ad hoc call started (or polls
the run it knew) instead of starting a second. The note holds ids only, never a secret; it is
removed once the job ends, and ignored once older than the job's timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from exporter.clock import Clock
from exporter.engine.engine import Progress
from exporter.jobs import JobState

KEPT = (JobState.TRIGGERING, JobState.RUNNING)  # the steps a rerun can resume from


def default_folder(env: Mapping[str, str]) -> Path:
    """`$XDG_STATE_HOME/aep-exporter/exports`, else `~/.local/state/aep-exporter/exports`."""
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aep-exporter" / "exports"


class ExportNote:
    """The note of one job in one org and sandbox (its file name hashes the three)."""

    def __init__(self, folder: Path, *, job_id: str, org_id: str, sandbox: str, clock: Clock):
        key = hashlib.sha256(f"{org_id}\0{sandbox}\0{job_id}".encode()).hexdigest()[:32]
        self.path = folder / f"{key}.json"
        self.job_id = job_id
        self.clock = clock

    def load(self, max_age_s: float) -> Progress | None:
        """The step saved by an earlier run of this job, if one can be resumed from."""
        try:
            data = json.loads(self.path.read_text())
            if data["job_id"] != self.job_id or self.clock.time() - data["saved"] > max_age_s:
                return None
            state = JobState(data["state"])
            if state not in KEPT:
                return None
            return Progress(
                state,
                flow_id=data.get("flow_id"),
                run_id=data.get("run_id"),
                intent_ms=data.get("intent_ms"),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: start afresh
            return None

    def save(self, progress: Progress) -> None:
        """Write a step a rerun can resume from (written whole, then renamed into place)."""
        if progress.state not in KEPT:
            return
        body = {
            "job_id": self.job_id,
            "state": progress.state.value,
            "flow_id": progress.flow_id,
            "run_id": progress.run_id,
            "intent_ms": progress.intent_ms,
            "saved": self.clock.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(body))
        partial.replace(self.path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
