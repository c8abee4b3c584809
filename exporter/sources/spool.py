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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from exporter.errors import ConfigError
from exporter.jobs import Job, JobState, Outcome

FOLDERS = ("incoming", "processing", "done", "failed", "rejected")
SUFFIXES = (".json", ".yaml", ".yml", ".toml")
RESULT_SUFFIX = ".result.json"
OUTCOME_FOLDER = {JobState.SUCCEEDED: "done", JobState.REJECTED: "rejected"}
# Failures of the machine, not of the file: reading again later works (the daemon retries).
TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN})


class Rejected(ConfigError):
    """A job file that cannot become a job; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Parsed:
    job: Job
    spec: dict[str, Any]


MAX_PROBLEMS = 10  # listed in a reason; a file with 10,000 bad labels gets a readable one
TYPE_NAMES = {
    "NoneType": "null (or empty)",
    "list": "a list",
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "true/false",
}


def _describe(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors(include_url=False, include_input=False)
    unknown = False
    for error in errors[:MAX_PROBLEMS]:
        where = ".".join(str(p) for p in error["loc"]) or "job"
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            unknown = True
            parts.append(f"{where}: unknown field")
        else:
            parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    if unknown:
        parts.append(f"job fields are {', '.join(Job.model_fields)}")
    return "; ".join(parts)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (which value was meant is unknowable)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise Rejected(f"invalid JSON: the key {key!r} appears twice; give each field once")
        data[key] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key_node.value!r} appears twice; give each field once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_job(name: str, raw: bytes, destinations: Mapping[str, object]) -> Parsed:
    """A job from the bytes of a job file named `name`; raises `Rejected` with the reason."""
    suffix = Path(name).suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            f"not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); job "
            "files are JSON, YAML or TOML"
        ) from None
    if "\x00" in text:
        raise Rejected("contains NUL bytes: job files are JSON, YAML or TOML text")
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise Rejected(f"invalid JSON at {where}: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        raise Rejected(f"invalid TOML: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        problem = exc.problem or exc.context or "syntax error"
        raise Rejected(f"invalid YAML{where}: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise Rejected(f"invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise Rejected("nested too deeply: a job is a flat mapping of fields") from None
    except ValueError as exc:  # a value the parser cannot build: a 5,000-digit number, !!int x
        kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
        raise Rejected(f"invalid {kind}: {str(exc).split(';')[0]}") from None
    if not isinstance(data, dict):
        kind = TYPE_NAMES.get(type(data).__name__, type(data).__name__)
        raise Rejected(
            f"the job must be a mapping of fields (dataset_id, destination, path, ...), not {kind}"
        )
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise Rejected(_describe(exc)) from None
    if job.destination not in destinations:
        raise Rejected(
            f"destination: unknown destination {job.destination!r}; configured: "
            f"{', '.join(sorted(destinations)) or 'none'}"
        )
    # What the journal keeps: JSON-safe whatever the parser made (YAML !!binary is bytes).
    return Parsed(job, job.model_dump(mode="json", exclude_unset=True))


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
