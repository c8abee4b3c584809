"""Verification: does the export folder hold what the run's metrics report?

List the folder (names and sizes); count the files and bytes; for Parquet files read each
footer's row count with ranged reads (exporter/delivery/parquet.py). Files whose names start
with `_` or `.` are not the export's (`_SUCCESS`, the manifest, a writer's temporary file).
A difference, or no folder, is looked at again every `poll_s` until `grace_s` has passed (a
store may list late); what differs then is the verdict.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from exporter.clock import Clock
from exporter.delivery.config import VerifySettings
from exporter.delivery.parquet import Footer, NotParquet, footer_of
from exporter.delivery.stores import Entry, Store, StoreError

FOOTER_READS_AT_ONCE = 16


@dataclass(frozen=True, slots=True)
class Expected:
    """What the run reported (AEP's run metrics)."""

    files: int
    bytes: int
    records: int


@dataclass(frozen=True, slots=True)
class FileFound:
    name: str
    size: int
    rows: int | None = None


@dataclass(slots=True)
class Found:
    """What one look at the folder found, and how it differs from the run's metrics."""

    files: list[FileFound] = field(default_factory=list)
    rows: int | None = None
    columns: tuple[tuple[str, str], ...] = ()
    differences: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def is_export_file(name: str) -> bool:
    return not name.startswith(("_", "."))


async def look(store: Store, prefix: str, expected: Expected, settings: VerifySettings) -> Found:
    """One look at the folder `prefix` of `store`."""
    found = Found()
    try:
        entries = [e for e in await store.list(prefix) if is_export_file(e.name)]
    except StoreError as exc:
        found.differences.append(str(exc))
        return found
    if not entries and expected.files:
        found.differences.append("no export folder (or an empty one) at the destination")
        return found
    parquet = [e for e in entries if e.name.endswith(".parquet")]
    footers = await _footers(store, prefix, parquet, found.differences)
    rows: int | None = None
    if parquet and len(footers) == len(parquet):
        rows = sum(f.rows for f in footers.values())
        found.columns = next(iter(footers.values())).columns
    found.rows = rows if parquet and len(parquet) == len(entries) else None
    found.files = [
        FileFound(e.name, e.size, footers[e.name].rows if e.name in footers else None)
        for e in entries
    ]
    if len(entries) != expected.files:
        found.differences.append(
            f"files: {len(entries)} at the destination, the run reported {expected.files}"
        )
    if settings.compare_bytes and found.bytes != expected.bytes:
        found.differences.append(
            f"bytes: {found.bytes} at the destination, the run reported {expected.bytes}"
        )
    if found.rows is not None and found.rows != expected.records:
        found.differences.append(
            f"rows: {found.rows} in the Parquet footers, the run reported {expected.records}"
        )
    return found


async def _footers(
    store: Store, prefix: str, files: list[Entry], problems: list[str]
) -> dict[str, Footer]:
    gate = asyncio.Semaphore(FOOTER_READS_AT_ONCE)
    footers: dict[str, Footer] = {}

    async def one(entry: Entry) -> None:
        async def read(start: int, end: int) -> bytes:
            return await store.read(prefix + entry.name, start, end)

        async with gate:
            try:
                footers[entry.name] = await footer_of(entry.size, read)
            except NotParquet as exc:
                problems.append(f"{entry.name}: not a complete Parquet file ({exc})")
            except StoreError as exc:
                problems.append(str(exc))

    await asyncio.gather(*(one(e) for e in files))
    return footers


async def verify(
    store: Store,
    prefix: str,
    expected: Expected,
    settings: VerifySettings,
    clock: Clock,
    *,
    deadline: float | None = None,
) -> Found:
    """Look until the folder matches or `settings.grace_s` (and `deadline`, on the clock's
    monotonic time) has passed; the last look is the answer."""
    until = clock.monotonic() + settings.grace_s
    if deadline is not None:
        until = min(until, deadline)
    while True:
        found = await look(store, prefix, expected, settings)
        if not found.differences:
            return found
        left = until - clock.monotonic()
        if left <= 0:
            if not found.files and expected.files:
                found.differences[0] += f" after {settings.grace_s:g} s"
            return found
        await clock.sleep(min(settings.poll_s, left))
