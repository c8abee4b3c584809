"""A corpus of malformed job files, as data: what each file is, how to make it, and the words
its rejection reason must contain for a person to act on it (the field, what is allowed).

Used by tests/test_spool.py (each case through `Spool.read`) and tests/test_daemon_intake.py
(the whole corpus dropped into a running daemon's spool) and tests/test_daemon_cli.py
(`aep-exporter validate`). Makers receive the path to create, in a folder directly inside the
spool (incoming/, or a staging folder beside it): links "inside" point to the spool's root,
links "outside" to the folder that holds the spool. The spool is configured with
`DESTINATIONS` and `MAX_JOB_FILE_BYTES`.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DESTINATIONS = ("archive", "lake")
"""The destinations a spool reading this corpus is configured with."""
MAX_JOB_FILE_BYTES = 128 * 1024
"""The job file size limit: small, yet room for a 10,000-label map and a 5,000-digit number,
so that those reach their own checks rather than the size limit."""
DUPLICATE_ID = "features-nightly-2026-01-01"
ORIGINAL_NAME = "000-original-with-id.json"
"""A good job with id `DUPLICATE_ID`, filed before the corpus: the duplicate case names it."""

Maker = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    make: bytes | Maker
    expect: tuple[str, ...]
    """Words the rejection reason must contain."""
    what: str
    caught_by: Literal["spool", "journal"] = "spool"
    """`spool`: `Spool.read` rejects it; `journal`: only the daemon can (a duplicate id)."""
    needs_non_root: bool = False
    """Root reads any file whatever its mode (CAP_DAC_OVERRIDE)."""

    def create(self, path: Path) -> Path:
        if isinstance(self.make, bytes):
            path.write_bytes(self.make)
        else:
            self.make(path)
        return path


def job(**changes: Any) -> dict[str, Any]:
    """A valid job (dataset ids here exist nowhere: bad jobs never reach AEP)."""
    base: dict[str, Any] = {"dataset_id": "ds_0001", "destination": "lake", "path": "ml/features"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def as_json(**changes: Any) -> bytes:
    return json.dumps(job(**changes), indent=2).encode()


def compact_json(**changes: Any) -> bytes:
    return json.dumps(job(**changes), separators=(",", ":")).encode()


def as_yaml(**changes: Any) -> bytes:
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in job(**changes).items()).encode()


def symlink_to(target: str | Path) -> Maker:
    def make(path: Path) -> None:
        path.symlink_to(target)

    return make


def symlink_to_job(where: Callable[[Path], Path]) -> Maker:
    """A link to a valid job file at `where(link path)`: a good job behind a link is refused."""

    def make(path: Path) -> None:
        target = where(path)
        target.write_bytes(as_json())
        path.symlink_to(target)

    return make


def directory(path: Path) -> None:
    path.mkdir()
    (path / "job.json").write_bytes(as_json())


def fifo(path: Path) -> None:
    os.mkfifo(path)  # nobody writes to it: opening it for reading would block forever


def unreadable(path: Path) -> None:
    path.write_bytes(as_json())
    path.chmod(0)


def nested(depth: int) -> bytes:
    return b'{"labels": ' + b"[" * depth + b"]" * depth + b"}"


def billion_laughs() -> bytes:
    """Nine levels of nine references: 9**9 "lol"s if expanded, 1 KiB as written."""
    lines = ['dataset_id: ds_0001\ndestination: lake\npath: ml/features\nlabels:\n  a: &a ["lol"']
    lines[0] += ', "lol"' * 8 + "]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  {name}: &{name} [{', '.join(['*' + prev] * 9)}]\n")
    return "".join(lines).encode()


def merge_key_bomb() -> bytes:
    """YAML merge keys (`<<`) that copy a mapping 10**8 times if flattened naively."""
    out = ["dataset_id: ds_0001\ndestination: lake\npath: ml/features\n", "a: &a {x: 1, y: 2}\n"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        out.append(f"{name}: &{name} {{<<: [{', '.join(['*' + prev] * 10)}]}}\n")
    return "".join(out).encode()


def png() -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
        b"\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01"
        b"\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
    )


LIMIT = str(MAX_JOB_FILE_BYTES)
MODES = "'once', 'daily', 'hourly:3', 'hourly:6', 'hourly:9' or 'hourly:12'"
NOT_UTF8 = "not UTF-8 text"

CASES: tuple[Case, ...] = (
    # -- syntax errors, each with the line to look at ------------------------------------------
    Case(
        "json-trailing-comma.json",
        b'{\n  "dataset_id": "ds_0001",\n  "destination": "lake",\n  "path": "ml/x",\n}\n',
        ("invalid JSON", "line 5", "double quotes"),
        "JSON with a trailing comma",
    ),
    Case(
        "json-missing-comma.json",
        b'{\n  "dataset_id": "ds_0001"\n  "destination": "lake"\n}\n',
        ("invalid JSON", "line 3", "',' delimiter"),
        "JSON with a missing comma",
    ),
    Case(
        "json-single-quotes.json",
        b"{'dataset_id': 'ds_0001', 'destination': 'lake', 'path': 'ml/x'}",
        ("invalid JSON", "line 1", "double quotes"),
        "JSON with single quotes (a Python dict pasted in)",
    ),
    Case(
        "json-unterminated.json",
        b'{\n  "dataset_id": "ds_0001",\n  "path": "ml/x',
        ("invalid JSON", "line 3", "Unterminated string"),
        "JSON cut off mid-string (a writer that died)",
    ),
    Case(
        "json-duplicate-key.json",
        b'{"dataset_id": "ds_0001", "destination": "lake", "path": "ml/x", "path": "ml/y"}',
        ("invalid JSON", "'path' appears twice"),
        "JSON giving a field twice (parsers differ on which one wins)",
    ),
    Case(
        "yaml-duplicate-key.yaml",
        b"dataset_id: ds_0001\ndestination: lake\npath: ml/x\ndestination: archive\n",
        ("invalid YAML", "line 4", "'destination' appears twice"),
        "YAML giving a field twice",
    ),
    Case("json-empty.json", b"", ("invalid JSON", "line 1"), "an empty JSON file"),
    Case(
        "yaml-bad-indent.yaml",
        b"dataset_id: ds_0001\n  destination: lake\npath: ml/x\n",
        ("invalid YAML", "line 2", "mapping values are not allowed"),
        "YAML with a stray indent",
    ),
    Case(
        "yaml-unclosed-flow.yaml",
        b"dataset_id: ds_0001\ndestination: lake\npath: [ml/x\n",
        ("invalid YAML", "line 4", "expected ',' or ']'"),
        "YAML with an unclosed [",
    ),
    Case(
        "yaml-tab.yaml",
        b"dataset_id: ds_0001\ndestination: lake\n\tpath: ml/x\n",
        ("invalid YAML", "line 3", "\\t"),
        "YAML indented with a tab",
    ),
    Case(
        "yaml-two-documents.yaml",
        as_yaml() + b"---\n" + as_yaml(),
        ("invalid YAML", "line 4", "single document"),
        "two YAML documents in one file",
    ),
    Case(
        "toml-missing-value.toml",
        b'dataset_id = "ds_0001"\ndestination =\npath = "ml/x"\n',
        ("invalid TOML", "line 2", "Invalid value"),
        "TOML key without a value",
    ),
    Case(
        "toml-unclosed-string.toml",
        b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "ml/x\n',
        ("invalid TOML", "line 3", "Illegal character"),
        "TOML string without its closing quote",
    ),
    Case(
        "toml-duplicate-key.toml",
        b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "a"\npath = "b"\n',
        ("invalid TOML", "line 4", "overwrite"),
        "TOML key given twice",
    ),
    # -- not a mapping ----------------------------------------------------------------------
    Case("top-list.json", b'[{"dataset_id": "ds_0001"}]', ("mapping of fields", "a list"), "list"),
    Case("top-string.json", b'"ml/features"', ("mapping of fields", "a string"), "a string"),
    Case("top-null.json", b"null", ("mapping of fields", "null"), "JSON null"),
    Case("top-number.json", b"42", ("mapping of fields", "a number"), "a number"),
    Case("top-empty.yaml", b"# nothing yet\n", ("mapping of fields", "empty"), "empty YAML"),
    Case("top-list.yaml", b"- dataset_id: ds_0001\n- path: x\n", ("a list",), "YAML list"),
    # -- fields: wrong type or value, each named with what is allowed -----------------------
    Case(
        "dataset-id-number.json",
        as_json(dataset_id=12345),
        ("dataset_id", "valid string"),
        "dataset_id is a number",
    ),
    Case(
        "dataset-id-chars.yaml",
        as_yaml(dataset_id="features; rm -rf /"),
        ("dataset_id", "letters, digits"),
        "dataset_id with characters no AEP id has",
    ),
    Case(
        "destination-list.json",
        as_json(destination=["lake"]),
        ("destination", "valid string"),
        "destination is a list",
    ),
    Case(
        "destination-empty.json",
        as_json(destination=""),
        ("destination", "at least 1 character"),
        "destination is empty",
    ),
    Case(
        "destination-unknown.json",
        as_json(destination="s3-prod"),
        ("unknown destination 's3-prod'", "configured: archive, lake"),
        "a destination the configuration does not name",
    ),
    Case("format-xml.json", as_json(format="xml"), ("format", "'parquet' or 'json'"), "format"),
    Case(
        "format-number.toml",
        b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "ml/x"\nformat = 1\n',
        ("format", "'parquet' or 'json'"),
        "format is a number",
    ),
    Case(
        "compression-zip.yaml",
        as_yaml(compression="zip"),
        ("compression", "'gzip' or 'none'"),
        "compression not offered by AEP",
    ),
    Case(
        "json-without-gzip.json",
        as_json(format="json", compression="none"),
        ("JSON exports must be gzip-compressed", "set compression to gzip"),
        "JSON without gzip (AEP exports JSON compressed only)",
    ),
    Case(
        "path-dotdot.json",
        as_json(path="../secrets"),
        ("path", "'..' segments"),
        "path traversal: ../",
    ),
    Case(
        "path-inner-dotdot.yaml",
        as_yaml(path="a/../../b"),
        ("path", "'..' segments"),
        "path traversal in the middle: a/../../b",
    ),
    Case(
        "path-absolute-dotdot.json",
        as_json(path="/etc/../../root"),
        ("path", "'..' segments"),
        "absolute path climbing out: /etc/../../root",
    ),
    Case(
        "path-windows.json",
        as_json(path="C:\\Windows\\Temp"),
        ("path", "relative folder of letters, digits"),
        "a Windows path",
    ),
    Case(
        "path-home.json",
        as_json(path="~/exports"),
        ("path", "relative folder"),
        "a home-relative path",
    ),
    Case("path-empty.json", as_json(path=""), ("path", "at least 1 character"), "empty path"),
    Case(
        "path-slashes.toml",
        b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "///"\n',
        ("path", "relative folder"),
        "path of slashes only",
    ),
    Case("path-number.json", as_json(path=7), ("path", "valid string"), "path is a number"),
    Case("mode-weekly.json", as_json(mode="weekly"), ("mode", MODES), "mode not offered"),
    Case(
        "mode-daily-disable.yaml",
        as_yaml(mode="daily", after_run="disable"),
        ("after_run=disable would stop the daily schedule", "mode=once"),
        "a schedule whose flow would be disabled after its first run",
    ),
    Case(
        "after-run-delete.json",
        as_json(after_run="delete"),
        ("after_run", "'keep' or 'disable'"),
        "after_run not offered",
    ),
    Case(
        "timeout-negative.json",
        as_json(timeout=-5),
        ("timeout", "greater than 0"),
        "negative timeout",
    ),
    Case(
        "timeout-words.json",
        as_json(timeout="two hours"),
        ("timeout", "valid number"),
        "timeout in words",
    ),
    Case(
        "timeout-huge.json",
        as_json(timeout=1e308),
        ("timeout", "less than or equal to 604800"),
        "absurd timeout: 1e308 seconds",
    ),
    Case(
        "timeout-5000-digits.json",
        b'{"dataset_id": "ds_0001", "destination": "lake", "path": "ml/x", "timeout": '
        + b"9" * 5000
        + b"}",
        ("invalid JSON", "4300 digits"),
        "absurd timeout: a 5,000-digit integer (Python refuses to convert it)",
    ),
    Case(
        "timeout-5000-digits.yaml",
        as_yaml() + b"timeout: " + b"9" * 5000 + b"\n",
        ("invalid YAML", "4300 digits"),
        "absurd timeout in YAML",
    ),
    Case(
        "timeout-5000-digits.toml",
        b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "a"\ntimeout = ' + b"9" * 5000,
        ("invalid TOML", "4300 digits"),
        "absurd timeout in TOML",
    ),
    Case(
        "timeout-bad-int-tag.yaml",
        as_yaml() + b"timeout: !!int soon\n",
        ("invalid YAML", "'soon'"),
        "YAML !!int tag on a word",
    ),
    Case(
        "labels-list.json",
        as_json(labels=["team", "ml"]),
        ("labels", "valid dictionary"),
        "labels as a list",
    ),
    Case(
        "labels-nested.yaml",
        as_yaml() + b"labels:\n  team:\n    name: ml\n",
        ("labels.team", "valid string"),
        "a label whose value is a mapping",
    ),
    Case(
        "labels-10000.json",
        compact_json(labels={str(i): "" for i in range(10_000)}),
        ("labels", "at most 50 items"),
        "absurd size: a 10,000-label map",
    ),
    Case(
        "labels-10000-numbers.json",
        compact_json(labels={str(i): i for i in range(10_000)}),
        ("labels.0", "valid string", "and 9990 more problems"),
        "10,000 bad labels: the reason lists ten, not ten thousand",
    ),
    Case(
        "labels-long-value.json",
        as_json(labels={"note": "x" * 600}),
        ("labels.note", "at most 500 characters"),
        "a 600-character label value",
    ),
    Case("id-number.json", as_json(id=42), ("id", "valid string"), "id is a number"),
    Case(
        "id-spaces.json",
        as_json(id="my export job"),
        ("id", "letters, digits and . _ : @ -"),
        "id with spaces",
    ),
    Case(
        "id-too-long.json",
        as_json(id="a" * 300),
        ("id", "1-200 characters"),
        "a 300-character id",
    ),
    # -- missing and unknown fields ---------------------------------------------------------
    Case(
        "missing-all.json",
        b"{}",
        ("dataset_id: Field required", "destination: Field required", "path: Field required"),
        "an empty mapping",
    ),
    Case(
        "missing-path.yaml",
        as_yaml(path=None),
        ("path: Field required",),
        "no path",
    ),
    Case(
        "unknown-field.json",
        as_json(colour="red"),
        ("colour: unknown field", "job fields are id, dataset_id, destination"),
        "an unknown field",
    ),
    Case(
        "typo-field.toml",
        b'dataset = "ds_0001"\ndestination = "lake"\npath = "ml/x"\n',
        ("dataset: unknown field", "dataset_id: Field required"),
        "a typo in a field name",
    ),
    # -- types the parsers make that are not strings ----------------------------------------
    Case(
        "toml-date.toml",
        b'dataset_id = 2026-01-01\ndestination = "lake"\npath = "ml/x"\n',
        ("dataset_id", "valid string"),
        "a TOML date where a string is expected",
    ),
    Case(
        "yaml-python-tag.yaml",
        as_yaml() + b"labels: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
        ("invalid YAML", "line 4", "python/object/apply:os.system"),
        "a YAML python tag: safe_load refuses to build it",
    ),
    Case(
        "yaml-billion-laughs.yaml",
        billion_laughs(),
        ("labels.a", "valid string"),
        "billion laughs: aliases stay references, nothing is expanded",
    ),
    Case(
        "yaml-merge-bomb.yaml",
        merge_key_bomb(),
        ("b: unknown field", "i: unknown field"),
        "merge keys nested eight deep",
    ),
    Case(
        "deeply-nested.json",
        nested(50_000),
        ("nested too deeply",),
        "JSON nested 50,000 deep",
    ),
    Case(
        "deeply-nested.yaml",
        b"labels: " + b"[" * 1_000,
        ("nested too deeply",),
        "YAML nested 1,000 deep",
    ),
    Case(
        "deeply-nested.toml",
        b"labels = " + b"[" * 5_000,
        ("nested too deeply",),
        "TOML nested 5,000 deep",
    ),
    # -- not text ---------------------------------------------------------------------------
    Case(
        "random-bytes.json",
        b"\xff" + random.Random(7).randbytes(2048),
        (NOT_UTF8, "byte 0 is 0xff", "JSON, YAML or TOML"),
        "binary garbage",
    ),
    Case("image.yaml", png(), (NOT_UTF8, "0x89"), "a PNG image"),
    Case(
        "compressed.json",
        gzip.compress(as_json(), mtime=0),
        (NOT_UTF8, "byte 1 is 0x8b"),
        "a gzip file named .json",
    ),
    Case(
        "utf16.json",
        json.dumps(job()).encode("utf-16"),
        (NOT_UTF8, "byte 0 is 0xff"),
        "UTF-16 with a byte order mark",
    ),
    Case(
        "utf8-bom.json",
        b"\xef\xbb\xbf" + as_json(),
        ("invalid JSON", "BOM"),
        "UTF-8 with a byte order mark (JSON forbids it)",
    ),
    Case("nul.json", as_json()[:-1] + b"\x00}", ("NUL bytes",), "a NUL byte in JSON"),
    Case("nul.yaml", b"dataset_id: ds_\x000001\n", ("NUL bytes",), "a NUL byte in YAML"),
    # -- not a job file ---------------------------------------------------------------------
    Case(
        "too-big.json",
        as_json(labels={"pad": "x" * (MAX_JOB_FILE_BYTES + 1)}),
        ("too large", f"the limit is {LIMIT} bytes"),
        "absurd size: a file bigger than the limit",
    ),
    Case(
        "notes.txt",
        as_json(),
        ("unsupported file type '.txt'", "*.json, *.yaml, *.yml or *.toml"),
        "a good job with the wrong extension",
    ),
    Case("README", b"drop job files here\n", ("unsupported file type '(none)'",), "no suffix"),
    Case(
        "link-outside.json",
        symlink_to_job(lambda link: link.parent.parent.parent / "outside-job.json"),
        ("symbolic link", "outside-job.json", "regular files inside the spool"),
        "a symlink to a valid job outside the spool",
    ),
    Case(
        "link-passwd.json",
        symlink_to("/etc/passwd"),
        ("symbolic link", "/etc/passwd"),
        "a symlink to /etc/passwd",
    ),
    Case(
        "link-inside.json",
        symlink_to_job(lambda link: link.parent.parent / "inside-job.json"),
        ("symbolic link", "inside-job.json", "regular files"),
        "a symlink to a valid job inside the spool",
    ),
    Case("folder.json", directory, ("a directory", "regular file"), "a directory named x.json"),
    Case("pipe.json", fifo, ("a FIFO", "regular file"), "a FIFO named x.json: must not hang"),
    Case(
        "unreadable.json",
        unreadable,
        ("cannot read the file", "Permission denied"),
        "a file the daemon may not read (mode 000)",
        needs_non_root=True,
    ),
    Case(
        "duplicate-id.json",
        as_json(id=DUPLICATE_ID, path="ml/other"),
        (f"job id '{DUPLICATE_ID}' was already submitted", ORIGINAL_NAME, "another id"),
        "a second job with the id of a job already submitted",
        caught_by="journal",
    ),
)

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
