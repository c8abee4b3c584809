"""The spool directory: how job files arrive, are claimed, and leave with their result.

    incoming/    writers drop *.json, *.yaml, *.toml (dot-files and *.tmp wait to be renamed)
    processing/  claimed by an atomic rename; the journal says how far each one got
    done/ failed/ rejected/   the job file, and beside it <name>.result.json

Every file that enters leaves with a result a person can act on, however broken it is.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from exporter.jobs import JobState, Outcome, Parsed, Rejected, parse_job

FOLDERS = ("incoming", "processing", "done", "failed", "rejected")
SUFFIXES = (".json", ".yaml", ".yml", ".toml")
RESULT_SUFFIX = ".result.json"
OUTCOME_FOLDER = {JobState.SUCCEEDED: "done", JobState.REJECTED: "rejected"}
# Failures of the machine, not of the file: reading again later works (the daemon retries).
TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN})


class Spool:
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.dirs = {name: root / name for name in FOLDERS}

    def ensure(self) -> None:
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)

    def waiting(self, limit: int) -> list[Path]:
        """Up to `limit` files ready in incoming/, oldest first."""
        found: list[tuple[float, str, Path]] = []
        with os.scandir(self.dirs["incoming"]) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".tmp"):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                found.append((mtime, name, Path(entry.path)))
        found.sort()
        return [p for _, _, p in found[:limit]]

    def claim(self, path: Path) -> Path | None:
        """Move a file to processing/ (atomically); None if someone else took it first."""
        target = self._free(self.dirs["processing"], path.name)
        try:
            path.rename(target)
        except FileNotFoundError:
            return None
        return target

    def processing(self) -> list[Path]:
        return sorted(
            p
            for p in self.dirs["processing"].iterdir()
            if not p.name.startswith(".") and not p.name.endswith(RESULT_SUFFIX)
        )

    def read(self, path: Path, destinations: Mapping[str, object]) -> Parsed:
        """Parse a claimed file; raises `Rejected` for anything that is not a usable job."""
        if path.suffix.lower() not in SUFFIXES:
            raise Rejected(
                f"unsupported file type {path.suffix or '(none)'!r}: name job files "
                "*.json, *.yaml, *.yml or *.toml"
            )
        try:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = path.readlink()
                raise Rejected(
                    f"a symbolic link (to {target}); job files must be regular files "
                    "inside the spool"
                )
            if not stat.S_ISREG(info.st_mode):
                kind = (
                    "a directory"
                    if stat.S_ISDIR(info.st_mode)
                    else "a FIFO"
                    if stat.S_ISFIFO(info.st_mode)
                    else "a special file"
                )
                raise Rejected(f"{kind}, not a regular file: job files must be regular files")
            if info.st_size > self.max_bytes:
                raise Rejected(
                    f"{info.st_size} bytes is too large; the limit is {self.max_bytes} bytes"
                )
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as handle:
                raw = handle.read(self.max_bytes + 1)
        except OSError as exc:
            if exc.errno in TRANSIENT:
                raise
            raise Rejected(f"cannot read the file: {exc.strerror}") from None
        if len(raw) > self.max_bytes:
            raise Rejected(f"larger than the limit of {self.max_bytes} bytes")
        return parse_job(path.name, raw, destinations)

    def finish(self, path: Path, outcome: Outcome, *, name: str | None = None) -> Path:
        """Write the result beside the job in its outcome folder and move the job there.
        Safe to repeat after a crash between the two steps."""
        folder = self.dirs[OUTCOME_FOLDER.get(outcome.state, "failed")]
        name = name or path.name
        target = folder / name
        if not ((folder / f"{name}{RESULT_SUFFIX}").exists() and not target.exists()):
            # (A result without its job is a finish that stopped half-way: complete it.)
            target = self._free(folder, name)
        result = {
            **outcome.model_dump(mode="json"),
            "file": path.name,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = folder / f".{target.name}{RESULT_SUFFIX}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(folder / f"{target.name}{RESULT_SUFFIX}")
        if path.exists() or path.is_symlink():
            path.rename(target)
        return target

    @staticmethod
    def _free(folder: Path, name: str) -> Path:
        """`name` in `folder`, or `name` with a counter when that is taken."""
        candidate = folder / name
        stem, suffix = Path(name).stem, Path(name).suffix
        n = 1
        while (
            candidate.exists()
            or candidate.is_symlink()
            or (folder / f"{candidate.name}{RESULT_SUFFIX}").exists()
        ):
            n += 1
            candidate = folder / f"{stem}.{n}{suffix}"
        return candidate
