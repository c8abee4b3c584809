"""The emulator's clock seam: what it reads of time, and the real clock it uses by default.

Tests pass their fake clock (anything with these two methods) into `serve(...)`, so the
emulator and the client under test see the same virtual time pass.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock time, epoch seconds."""

    def monotonic(self) -> float:
        """A clock that never goes backwards, for rate limiting."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
