"""Writes to the local disk that must not be lost: retried with backoff while they fail.

A full disk (ENOSPC, SQLite's "database or disk is full"), too many open files (EMFILE), a
flaky mount: the journal, a result file or a spool scan fails for a while and then works
again once an operator acts. Nothing here gives up: a job whose outcome cannot be written
waits, its task alive, until it can. `Faults` remembers what is failing now, so readiness
tells the truth meanwhile (the journal's writability check consults it).
"""

from __future__ import annotations

import errno
import math
import random
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from exporter.clock import Clock
from exporter.retry import Backoff, Retrying, retry

T = TypeVar("T")
log = structlog.get_logger("exporter.daemon")

# "database is locked" is an OperationalError too: also worth waiting out.
STORAGE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.OperationalError)
RETRY = Backoff(
    max_attempts=sys.maxsize, base_delay_s=0.5, max_delay_s=30.0, max_elapsed_s=math.inf
)
# What waiting can cure: space, descriptors, memory, a busy database. (Not a missing folder
# or a permission: at start those exit with their traceback; a job's writes retry anyway.)
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EIO}
)
TRANSIENT_SQLITE = frozenset({5, 6, 10, 13})  # SQLITE_BUSY, _LOCKED, _IOERR, _FULL


def transient(exc: BaseException) -> bool:
    """Whether `exc` is a storage failure that may pass by itself or once space is freed."""
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in TRANSIENT_SQLITE
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


class Faults:
    """What local writes are failing now, by operation, for readiness and logs."""

    def __init__(self, counted: Callable[[str], None] | None = None) -> None:
        """`counted` hears of each failure by its operation (the daemon's `Metrics`)."""
        self._failing: dict[str, str] = {}
        self._counted = counted

    def failed(self, operation: str, error: BaseException) -> None:
        self._failing[operation] = f"{type(error).__name__}: {error}"
        if self._counted is not None:
            self._counted(operation)

    def worked(self, operation: str) -> None:
        self._failing.pop(operation, None)

    def describe(self) -> str | None:
        """None when every write works; else what fails, for a person."""
        if not self._failing:
            return None
        failing = sorted(self._failing.items())
        return "; ".join(f"{operation} failing ({why})" for operation, why in failing)


async def persist(
    write: Callable[[], Awaitable[T]],
    *,
    operation: str,
    clock: Clock,
    faults: Faults,
    rng: random.Random,
    only_transient: bool = False,
    **context: object,
) -> T:
    """`write()`, again and again with backoff until it works. Cancellable between tries.
    `only_transient`: other storage errors (see `transient`) are raised at once."""
    failures = 0

    def retryable(exc: Exception) -> bool:
        return isinstance(exc, STORAGE_ERRORS) and (transient(exc) or not only_transient)

    def failed(r: Retrying) -> None:
        nonlocal failures
        failures = r.attempt
        faults.failed(operation, r.error)
        log.warning(
            "storage_write_failed",
            operation=operation,
            error=f"{type(r.error).__name__}: {r.error}",
            attempt=r.attempt,
            retry_in_s=round(r.delay, 3),
            **context,
        )

    result = await retry(
        write, policy=RETRY, clock=clock, rng=rng, retryable=retryable, on_retry=failed
    )
    if failures:
        log.info("storage_write_recovered", operation=operation, attempts=failures, **context)
    faults.worked(operation)
    return result
