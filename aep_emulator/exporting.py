"""What an export run writes at the destination: the folder name and the part files.

Folder names follow the flow's folder template (docs/aep-notes.md#export-folders-and-files; by
default `%DATASET_ID%/%EXPORT_TIME%`). Files are Spark-style part files in the asked format and
compression, written under a temporary name and renamed when complete, so a reader never sees
half a file.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aep_emulator.datalake import Batch
from aep_emulator.facts import Compression, FileType

DEFAULT_FOLDER_TEMPLATE = "%DATASET_ID%/%EXPORT_TIME%"

_MACRO_RE = re.compile(r"%([A-Za-z_]+)(?:\(([^()%]*)\))?%")
_PLAIN_MACROS = frozenset(
    {
        "DESTINATION",
        "DESTINATION_NAME",
        "DATASET_ID",
        "DATASET_NAME",
        "EXPORT_TIME",
        "DESTINATION_INSTANCE_ID",
        "DESTINATION_INSTANCE_NAME",
        "SANDBOX_NAME",
        "ORGANIZATION_NAME",
    }
)
_PATTERN_RUN_RE = re.compile(r"([A-Za-z])\1*")
_EXTENSIONS = {
    (FileType.PARQUET, Compression.NONE): "parquet",
    (FileType.PARQUET, Compression.GZIP): "gz.parquet",
    (FileType.JSON, Compression.GZIP): "json.gz",
    (FileType.JSON, Compression.NONE): "json",
}
_READ_BATCH_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class ExportResult:
    """The files one export wrote, its record count and the files' total size on disk."""

    files: tuple[Path, ...]
    records: int
    bytes: int


def render_folder(
    template: str | None,
    *,
    dataset_id: str,
    dataset_name: str,
    export_time: datetime,
    destination_name: str,
    destination_instance_id: str,
    destination_instance_name: str,
    sandbox_name: str,
    organization_name: str,
) -> str:
    """The relative folder (`/`-separated) a run writes into, from the flow's folder template.

    `None` means AEP's default layout `<datasetId>/exportTime=YYYYMMDDHHMM`. A naive
    `export_time` is taken as UTC. Raises ValueError for an unknown macro, a bad
    `%DATETIME(...)%` pattern, or a result that is not a safe relative path.
    """
    when = export_time.replace(tzinfo=UTC) if export_time.tzinfo is None else export_time
    when = when.astimezone(UTC)
    values = {
        "DESTINATION": destination_name,
        "DESTINATION_NAME": destination_name,
        "DATASET_ID": dataset_id,
        "DATASET_NAME": dataset_name,
        "EXPORT_TIME": f"exportTime={when:%Y%m%d%H%M}",
        "DESTINATION_INSTANCE_ID": destination_instance_id,
        "DESTINATION_INSTANCE_NAME": destination_instance_name,
        "SANDBOX_NAME": sandbox_name,
        "ORGANIZATION_NAME": organization_name,
    }

    def substitute(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        if name == "DATETIME":
            return _format_java_datetime(pattern or "", when)
        if name in _PLAIN_MACROS and pattern is None:
            return values[name]
        raise ValueError(f"unknown folder template macro %{name}%")

    folder = _MACRO_RE.sub(substitute, DEFAULT_FOLDER_TEMPLATE if template is None else template)
    _check_relative_path(folder)
    return folder


def validate_template(template: str | None) -> None:
    """Raise ValueError if `template` has an unknown macro, a bad pattern or an unsafe path."""
    render_folder(
        template,
        dataset_id="0" * 24,
        dataset_name="dataset",
        export_time=datetime(2000, 1, 1, tzinfo=UTC),
        destination_name="destination",
        destination_instance_id="instance",
        destination_instance_name="instance",
        sandbox_name="prod",
        organization_name="org",
    )


def export_batches(
    batches: Sequence[Batch],
    dest_dir: Path,
    *,
    file_type: FileType,
    compression: Compression,
    rng: random.Random,
    max_rows_per_file: int,
) -> ExportResult:
    """Write the rows of `batches` into part files in `dest_dir`, at most `max_rows_per_file` each.

    Streams the batches, so memory stays bounded whatever the dataset size. No rows: no files
    (and no folder). If writing fails, the files of this call are removed before re-raising.
    """
    if max_rows_per_file <= 0:
        raise ValueError("max_rows_per_file must be positive")
    # Target connections keep the case the client sent:
    # docs/aep-notes.md#target-connection-parameters
    file_type, compression = FileType(file_type.upper()), Compression(compression.upper())
    ext = _EXTENSIONS[(file_type, compression)]
    # One Spark job: a shared transaction id and job uuid; each file is a task of its own.
    tid = rng.randrange(10**18, 10**19)
    job = uuid.UUID(int=rng.getrandbits(128), version=4)
    first_task = rng.randrange(1_000, 1_000_000 - 10_000)
    written: list[Path] = []
    records = 0
    writer: _PartWriter | None = None
    try:
        for chunk in _chunks(batches, max_rows_per_file):
            if writer is None:
                index = len(written)
                name = f"part-{index:05d}-tid-{tid}-{job}-{first_task + index}-1-c000.{ext}"
                writer = _PartWriter(dest_dir / name, file_type, compression, chunk.schema)
            writer.write(chunk)
            records += chunk.num_rows
            if writer.rows >= max_rows_per_file:
                written.append(writer.finish())
                writer = None
        if writer is not None:
            written.append(writer.finish())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return ExportResult(tuple(written), records, sum(p.stat().st_size for p in written))


def _chunks(batches: Sequence[Batch], max_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches that never straddle a part-file boundary."""
    room = max_rows
    for batch in batches:
        if batch.rows == 0:
            continue
        source = pq.ParquetFile(batch.path)
        for record_batch in source.iter_batches(batch_size=min(_READ_BATCH_ROWS, max_rows)):
            offset = 0
            while offset < record_batch.num_rows:
                take = min(room, record_batch.num_rows - offset)
                yield record_batch.slice(offset, take)
                offset += take
                room = room - take or max_rows


class _PartWriter:
    """One part file, written under a hidden temporary name until `finish()`."""

    def __init__(
        self, path: Path, file_type: FileType, compression: Compression, schema: pa.Schema
    ) -> None:
        self.path = path
        self.rows = 0
        self._tmp = path.with_name(f".{path.name}.inprogress")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = ExitStack()
        self._parquet: Any = None
        self._text: IO[bytes] | gzip.GzipFile | None = None
        gzipped = compression == Compression.GZIP
        # Gzip at zlib's default level 6, as Hadoop's codec under Spark does: the library
        # defaults (9) are slower for a percent less size.
        if file_type == FileType.PARQUET:
            self._parquet = self._stack.enter_context(
                pq.ParquetWriter(
                    self._tmp,
                    schema,
                    compression="gzip" if gzipped else "none",
                    compression_level=6 if gzipped else None,
                )
            )
        else:
            self._text = self._stack.enter_context(self._tmp.open("wb"))
            if gzipped:
                # No name in the gzip header: it would be the temporary one.
                self._text = self._stack.enter_context(
                    gzip.GzipFile(filename="", mode="wb", fileobj=self._text, compresslevel=6)
                )

    def write(self, chunk: pa.RecordBatch) -> None:
        if self._parquet is not None:
            self._parquet.write_batch(chunk)
        elif self._text is not None:
            self._text.write(_json_lines(chunk))
        self.rows += chunk.num_rows

    def finish(self) -> Path:
        self._stack.close()
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._stack.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def _json_lines(chunk: pa.RecordBatch) -> bytes:
    """One JSON object per row, keys in column order, built column by column for speed."""
    fields = ",".join(_dumps(name).replace("%", "%%") + ":%s" for name in chunk.schema.names)
    row_format = "{" + fields + "}\n"
    encoded = [_json_values(column) for column in chunk.columns]
    return "".join(row_format % values for values in zip(*encoded, strict=True)).encode()


def _json_values(column: Any) -> list[str]:
    """Each value of `column` as JSON text; temporals as ISO-8601 strings (UTC, `Z`)."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        # Arrow stores UTC instants; dropping the zone keeps them, and casting naive values to
        # text is ten times faster than strftime.
        text = column.cast(pa.timestamp(kind.unit)).cast(pa.string())
        text = pc.replace_substring(text, " ", "T", max_replacements=1)
        column = pc.binary_join_element_wise(text, "Z", "")
    elif pa.types.is_date(kind):
        column = column.cast(pa.string())
    values = column.to_pylist()
    if pa.types.is_nested(kind) or not values:
        return [_dumps(v) for v in values]
    # One C-speed dumps for the whole column; JSON escapes NUL inside strings, so a bare NUL
    # can only be the separator.
    return _dumps(values, separators=("\x00", ":"))[1:-1].split("\x00")


def _dumps(value: Any, separators: tuple[str, str] = (",", ":")) -> str:
    return json.dumps(value, separators=separators, ensure_ascii=False, default=str)


def _format_java_datetime(pattern: str, when: datetime) -> str:
    """Format `when` with Java pattern letters (yyyy, YYYY, MM, dd, HH, mm, ss, SSS ...)."""
    if not pattern:
        raise ValueError("%DATETIME(...)% needs a date pattern")

    def field(match: re.Match[str]) -> str:
        run = match.group(0)
        letter, width = run[0], len(run)
        # YYYY is Java's week-based year; AEP's own examples use it to mean the calendar year.
        if letter in "yY":
            return f"{when.year % 100:02d}" if width == 2 else f"{when.year:0{width}d}"
        if letter == "S":
            return f"{when.microsecond:06d}"[:width].ljust(width, "0")
        numbers = {
            "M": when.month,
            "d": when.day,
            "H": when.hour,
            "m": when.minute,
            "s": when.second,
        }
        if letter not in numbers:
            raise ValueError(f"unsupported pattern letter {letter!r} in %DATETIME({pattern})%")
        return f"{numbers[letter]:0{width}d}"

    return _PATTERN_RUN_RE.sub(field, pattern)


def _check_relative_path(folder: str) -> None:
    if "\x00" in folder or "\\" in folder:
        raise ValueError(f"unsafe character in folder {folder!r}")
    if folder.startswith("/"):
        raise ValueError(f"folder must be relative: {folder!r}")
    for segment in folder.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"unsafe path segment {segment!r} in folder {folder!r}")
