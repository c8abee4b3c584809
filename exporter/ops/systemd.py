"""systemd's notify protocol (sd_notify(3)) for `Type=notify`, on the standard library.

What systemd hears, as datagrams on the AF_UNIX socket named by $NOTIFY_SOCKET:

    STATUS=                        "recovering" while unfinished jobs are picked up again
    READY=1 + STATUS=              once recovery is done (`Daemon.ready`) and after a reload
    STATUS=                        job counts, whenever they changed, checked at every tick
    WATCHDOG=1                     from the event loop at every tick (at least every half of
                                   $WATCHDOG_USEC): a blocked loop stops the pings, and
                                   systemd kills the daemon with SIGABRT (faulthandler
                                   writes every thread's stack to stderr first)
    RELOADING=1 + MONOTONIC_USEC=  when a reload (SIGHUP) begins
    STOPPING=1                     when the stop begins; no pings after it (systemd does not
                                   watch a stopping service: TimeoutStopSec= bounds the stop)

A send never blocks and never fails the daemon: systemd may be gone or its queue full. The
first failure is logged, later ones are dropped quietly.
"""

from __future__ import annotations

import faulthandler
import socket
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

import structlog

from exporter.daemon.admission import Admissions
from exporter.daemon.journal import JobRecord

log = structlog.get_logger("exporter.ops.systemd")

VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_EVERY_S = 5.0
RELOADING = "reloading configuration"


@dataclass(frozen=True)
class NotifyEnvironment:
    """What systemd told this process through its environment."""

    socket: str
    watchdog_s: float | None
    """The watchdog timeout, if systemd watches this process (WatchdogSec=)."""

    @classmethod
    def take(cls, environ: MutableMapping[str, str], *, pid: int) -> NotifyEnvironment | None:
        """Read the variables and remove them, as sd_notify's `unset_environment` does:
        nothing this process may start can then speak for it. None without $NOTIFY_SOCKET."""
        values = {name: environ.pop(name, "") for name in VARIABLES}
        address = values["NOTIFY_SOCKET"]
        if not address:
            return None
        if not address.startswith(("/", "@")):  # e.g. vsock: (systemd 254+, for VMs)
            log.warning("systemd_notify_socket_unsupported", socket=address)
            return None
        return cls(address, _watchdog_s(values["WATCHDOG_USEC"], values["WATCHDOG_PID"], pid))


def _watchdog_s(usec: str, for_pid: str, pid: int) -> float | None:
    if not usec:
        return None
    if for_pid and for_pid != str(pid):  # set for another process (one that started us)
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("systemd_watchdog_usec_invalid", watchdog_usec=usec)
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Sends notify messages to one socket: a path, or an abstract name (leading '@')."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failed = False

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=value` lines; False (logged the first time) if it failed."""
        message = "\n".join(fields).encode()
        try:
            self._sock.sendto(message, self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning(
                    "systemd_notify_failed",
                    socket=self.address,
                    error=str(exc),
                    message=message.decode(errors="replace"),
                )
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: systemd matches RELOADING=1 to its reload by this."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotify:
    """The daemon's service that keeps systemd informed (see the module docstring)."""

    name = "systemd"
    sources: tuple[str, ...] = ()

    def __init__(
        self,
        admissions: Admissions,
        notifier: Notifier,
        *,
        watchdog_s: float | None,
        status_every_s: float = STATUS_EVERY_S,
    ) -> None:
        self.admissions = admissions
        self.notifier = notifier
        self.watchdog = watchdog_s is not None
        self.tick_s = min(status_every_s, watchdog_s / 2) if watchdog_s else status_every_s
        self._status = ""
        self._phase = "recovering"
        self._reload_refused = False

    def status(self) -> str:
        counts = self.admissions.counts
        text = (
            f"jobs: {len(self.admissions.running)} in flight, {counts.finished} finished, "
            f"{counts.rejected} rejected"
        )
        if self._phase != "running":
            text = f"{self._phase}; {text}"
        if self._reload_refused:
            text += "; the last reload was refused (see the log)"
        return text

    def _send(self, *fields: str) -> None:
        self._status = self.status()
        self.notifier.send(*fields, f"STATUS={self._status}")

    async def start(self) -> None:
        # When the watchdog fires, systemd sends SIGABRT: let it print every thread's stack
        # to the journal first, so the log shows what blocked the loop.
        if self.watchdog and not faulthandler.is_enabled():
            faulthandler.enable(sys.stderr, all_threads=True)
        self._send()

    async def recover(self, records: list[JobRecord]) -> None:
        return None

    async def run(self) -> None:
        await self.admissions.ready.wait()
        self._phase = "running"
        self._send("READY=1")
        log.info("systemd_notified_ready", watchdog=self.watchdog, tick_s=self.tick_s)
        while True:
            if self.watchdog and self._phase != "stopping":
                self.notifier.send("WATCHDOG=1")
            if self.status() != self._status:
                self._send()
            await self.admissions.clock.sleep(self.tick_s)

    async def close(self) -> None:
        self.notifier.close()

    def announce_stopping(self) -> None:
        self._phase = "stopping"
        self._send("STOPPING=1")

    # A reload before READY=1 or once stopping is not systemd's business: it changes no state.
    def announce_reloading(self) -> None:
        if self._phase == "running":
            self._phase = RELOADING
            self._send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def announce_reloaded(self, ok: bool) -> None:
        self._reload_refused = not ok
        if self._phase == RELOADING:
            self._phase = "running"
            self._send("READY=1")


def from_environment(
    admissions: Admissions, environ: MutableMapping[str, str], *, pid: int
) -> SystemdNotify | None:
    """The notify service when systemd started this process with $NOTIFY_SOCKET."""
    found = NotifyEnvironment.take(environ, pid=pid)
    if found is None:
        return None
    return SystemdNotify(admissions, Notifier(found.socket), watchdog_s=found.watchdog_s)
