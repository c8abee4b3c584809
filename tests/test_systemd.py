"""systemd's notify protocol, heard by a datagram socket standing in for systemd.

The end-to-end test runs `aep-exporter run` as a child with $NOTIFY_SOCKET and
$WATCHDOG_USEC set and checks what arrives and in which order: READY=1 only once recovery is
done, STATUS= with job counts, WATCHDOG=1 at about half the interval, RELOADING=1 and
READY=1 around each SIGHUP, STOPPING=1 on SIGTERM and nothing but STATUS= after it.
In-process tests cover a blocked loop (no pings), reloads, the environment and a failing
socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from aep_emulator.app import serve
from aep_emulator.settings import Span
from exporter.clock import SystemClock
from exporter.daemon.config import AdminConfig
from exporter.daemon.core import EXIT_OK, Daemon
from exporter.errors import ConfigError
from exporter.ops.systemd import (
    Notifier,
    NotifyEnvironment,
    SystemdNotify,
    from_environment,
    monotonic_usec,
)
from exporter.settings import Settings
from tests.conftest import Emulator, emulator_knobs
from tests.daemon_support import (
    Running,
    kill,
    results,
    spool_daemon,
    start_daemon,
    write_config,
)
from tests.test_daemon_intake import settings_for

DEADLINE = 30.0  # real seconds: a bound on a wait for an event, never a sleep
STATUS = re.compile(r"jobs: (\d+) in flight, (\d+) finished, (\d+) rejected")

Message = dict[str, str]


@dataclass
class Listener:
    """Plays systemd's notify socket: collects each datagram as it arrives, with its time."""

    address: str  # as $NOTIFY_SOCKET names it
    sock: socket.socket
    messages: list[Message] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # time.monotonic() per message
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _add(self, data: bytes) -> None:
        lines = data.decode().split("\n")
        self.messages.append(dict(line.split("=", 1) for line in lines))
        self.received.append(time.monotonic())
        self._changed.set()

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._add(await loop.sock_recv(self.sock, 65536))

    def drain(self) -> None:
        """Take every datagram waiting in the socket now, without letting the loop run."""
        while True:
            try:
                self._add(self.sock.recv(65536))
            except BlockingIOError:
                return

    async def until(self, predicate: Callable[[list[Message]], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate(self.messages):
                self._changed.clear()
                await self._changed.wait()

    def index(self, key: str, start: int = 0) -> int:
        return next(i for i, m in enumerate(self.messages) if i >= start and key in m)


@asynccontextmanager
async def listening(address: str) -> AsyncIterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.setblocking(False)
    listener = Listener(address, sock)
    receiver = asyncio.create_task(listener._receive())
    try:
        yield listener
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        sock.close()


async def until_ready(systemd: Listener, running: Running) -> int:
    """The index of READY=1; fails at once if the daemon exits first."""
    exited = asyncio.ensure_future(running.proc.wait())
    ready = asyncio.ensure_future(systemd.until(has("READY")))
    try:
        await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        ready.cancel()
    if not ready.done() or ready.cancelled():
        await kill(running)
        raise AssertionError(f"the daemon exited before READY=1: see {running.log}")
    ready.result()
    return systemd.index("READY")


def counts(message: Message) -> tuple[int, int, int]:
    """(in flight, finished, rejected) from a STATUS= text."""
    found = STATUS.search(message["STATUS"])
    assert found, message
    return int(found[1]), int(found[2]), int(found[3])


def has(key: str, *, after: int = 0) -> Callable[[list[Message]], bool]:
    return lambda messages: any(key in m for m in messages[after:])


def only_status_after(listener: Listener, index: int) -> list[Message]:
    return [m for m in listener.messages[index + 1 :] if set(m) != {"STATUS"}]


# -- the daemon as systemd runs it ----------------------------------------------------------

BAD_LEFT = 20  # unreadable job files a crashed run left claimed: recovery rejects them


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_daemon_tells_systemd_what_it_does_in_order(tmp_path: Path) -> None:
    knobs = emulator_knobs(
        not_ready_window_s=0.2,
        run_duration_s=Span(min=0.2, max=0.3),
        seed=5,
    )
    async with (
        serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state),
        listening(str(tmp_path / "notify")) as systemd,
    ):
        dataset = state.lake.create_dataset(
            "prod", "features", 10, rng=random.Random(1), now_ms=0
        ).id
        config = write_config(tmp_path, url)
        # A previous run claimed these files and died before journaling them.
        processing = tmp_path / "spool" / "processing"
        processing.mkdir(parents=True)
        job = {"id": "left", "dataset_id": dataset, "destination": "lake", "path": "ml/left"}
        (processing / "left.json").write_text(json.dumps(job))
        for n in range(BAD_LEFT):
            (processing / f"bad-{n:02d}.json").write_text("{not json")
        running = await start_daemon(
            config,
            tmp_path / "daemon.log",
            env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"},
        )
        try:
            ready = await until_ready(systemd, running)
            # Before READY=1: only a status saying recovery is under way.
            assert all(set(m) == {"STATUS"} for m in systemd.messages[:ready])
            assert systemd.messages[0]["STATUS"].startswith("recovering; ")
            # READY=1 was sent once recovery had run: its status counts what recovery did.
            in_flight, finished, rejected = counts(systemd.messages[ready])
            assert (in_flight + finished, rejected) == (1, BAD_LEFT)
            await running.until("systemd_notified_ready", deadline_s=DEADLINE)
            events = [e["event"] for e in await running.events()]
            assert events.index("daemon_ready") < events.index("systemd_notified_ready")

            # The job finishes: a status says so.
            await systemd.until(
                lambda ms: any("STATUS" in m and counts(m)[:2] == (0, 1) for m in ms[ready:])
            )
            assert results(tmp_path / "spool")["left.json"]["state"] == "succeeded"

            # Pings from the event loop, at about half of WATCHDOG_USEC (0.1 s).
            await systemd.until(lambda ms: sum("WATCHDOG" in m for m in ms[ready:]) >= 10)
            pings = [
                t
                for m, t in zip(systemd.messages[ready:], systemd.received[ready:], strict=True)
                if m == {"WATCHDOG": "1"}
            ]
            mean = (pings[9] - pings[0]) / 9
            assert 0.05 < mean < 0.2, pings

            # SIGHUP: RELOADING=1 stamped with the time it began, then READY=1; a file that
            # no longer loads is refused, and the status says so.
            for accepted in (True, False):
                if not accepted:
                    config.write_text("[aep\n")
                start = len(systemd.messages)
                before = monotonic_usec()
                running.proc.send_signal(signal.SIGHUP)
                await systemd.until(has("READY", after=start))
                reloading = systemd.messages[systemd.index("RELOADING", start)]
                assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
                assert reloading["STATUS"].startswith("reloading configuration; ")
                done = systemd.messages[systemd.index("READY", start)]
                assert ("the last reload was refused" in done["STATUS"]) is not accepted

            running.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                assert await running.proc.wait() == EXIT_OK
        finally:
            await kill(running)
        systemd.drain()  # what the daemon sent before it exited is in the socket
        stopping = systemd.index("STOPPING")
        assert systemd.messages[stopping]["STOPPING"] == "1"
        assert systemd.messages[stopping]["STATUS"].startswith("stopping; ")
        assert only_status_after(systemd, stopping) == []
        assert sum("READY" in m for m in systemd.messages) == 3  # started, reloaded twice
        assert sum("RELOADING" in m for m in systemd.messages) == 2
        assert not [e for e in running.lines if e.get("event") == "systemd_notify_failed"]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_when_the_watchdog_fires_the_log_shows_every_threads_stack(
    tmp_path: Path,
) -> None:
    """systemd kills a daemon that stopped pinging with SIGABRT: its stacks go to the log."""
    async with listening(str(tmp_path / "notify")) as systemd:
        config = write_config(tmp_path, "http://127.0.0.1:9")  # no job: AEP is never called
        log = tmp_path / "daemon.log"
        running = await start_daemon(
            config, log, env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "30000000"}
        )
        try:
            await until_ready(systemd, running)
            running.proc.send_signal(signal.SIGABRT)
            async with asyncio.timeout(DEADLINE):
                assert await running.proc.wait() == -signal.SIGABRT
        finally:
            await kill(running)
    text = log.read_text()
    assert "Fatal Python error: Aborted" in text
    assert "(most recent call first)" in text
    assert "asyncio" in text  # the main thread was in the event loop


# -- in process: the loop, the hooks -------------------------------------------------------


@asynccontextmanager
async def daemon_with(
    emulator: Emulator, tmp_path: Path, environ: MutableMapping[str, str]
) -> AsyncIterator[tuple[Daemon, SystemdNotify]]:
    daemon = spool_daemon(settings_for(emulator, tmp_path), clock=SystemClock())
    service = from_environment(daemon.admissions, environ, pid=os.getpid())
    assert service is not None
    daemon.add_service(service)
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon, service
    finally:
        daemon.stop()
        async with asyncio.timeout(DEADLINE):
            assert await task == EXIT_OK


async def test_a_blocked_event_loop_sends_no_pings(emulator: Emulator, tmp_path: Path) -> None:
    async with listening(str(tmp_path / "notify")) as systemd:
        environ = {
            "NOTIFY_SOCKET": systemd.address,
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        async with daemon_with(emulator, tmp_path, environ) as (_, service):
            assert service.tick_s == 0.05
            await systemd.until(lambda ms: sum("WATCHDOG" in m for m in ms) >= 3)
            systemd.drain()
            before = len(systemd.messages)
            # The loop blocks for six ticks (three watchdog timeouts): the block is what
            # is tested, not a wait for something.
            time.sleep(0.3)  # noqa: ASYNC251
            systemd.drain()
            assert systemd.messages[before:] == [], "a ping came while the loop was blocked"
            await systemd.until(has("WATCHDOG", after=before))  # and they resume after it


async def test_a_watchdog_meant_for_another_process_is_not_pinged(
    emulator: Emulator, tmp_path: Path
) -> None:
    async with listening(str(tmp_path / "notify")) as systemd:
        environ = {
            "NOTIFY_SOCKET": systemd.address,
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
        async with daemon_with(emulator, tmp_path, environ) as (_, service):
            assert not service.watchdog
            # A ping would go in the same step as READY=1, before the loop's first sleep.
            await systemd.until(has("READY"))
        systemd.drain()
        assert not any("WATCHDOG" in m for m in systemd.messages)
        assert "STOPPING" in systemd.messages[-1]


def refuse() -> Settings:
    raise ConfigError("exporter.toml: not TOML")


async def test_reloads_and_the_stop_are_announced_on_an_abstract_socket(
    emulator: Emulator, tmp_path: Path
) -> None:
    address = f"@aep-exporter-test-{uuid.uuid4().hex}"
    async with listening(address) as systemd:
        async with daemon_with(emulator, tmp_path, {"NOTIFY_SOCKET": address}) as (daemon, _):
            await systemd.until(has("READY"))
            ready = systemd.index("READY")

            for accepted in (False, True):
                start = len(systemd.messages)
                before = monotonic_usec()
                taken = await daemon.reload((lambda: daemon.settings) if accepted else refuse)
                assert taken is accepted
                after = monotonic_usec()
                await systemd.until(has("READY", after=start))
                reloading = systemd.index("RELOADING", start)
                message = systemd.messages[reloading]
                assert message["RELOADING"] == "1"
                assert before <= int(message["MONOTONIC_USEC"]) <= after
                assert message["STATUS"].startswith("reloading configuration; ")
                done = systemd.messages[systemd.index("READY", reloading)]
                refused = "the last reload was refused" in done["STATUS"]
                assert refused is not accepted
        systemd.drain()
    stopping = systemd.index("STOPPING")
    assert stopping > ready
    assert only_status_after(systemd, stopping) == []
    assert not any("WATCHDOG" in m for m in systemd.messages), "no watchdog was asked for"


def reload_hooks(daemon: Daemon, accepted: bool) -> None:
    for begin in daemon.on_reloading:
        begin()
    for end in daemon.on_reloaded:
        end(accepted)


async def test_reload_hooks_before_ready_or_while_stopping_announce_nothing(
    emulator: Emulator, tmp_path: Path
) -> None:
    """`Daemon.reload` waits for READY and skips a stop; hooks called out of turn anyway
    must not confuse systemd (RELOADING=1 before READY=1 or after STOPPING=1)."""
    async with listening(str(tmp_path / "notify")) as systemd:
        environ = {"NOTIFY_SOCKET": systemd.address}
        async with daemon_with(emulator, tmp_path, environ) as (daemon, _):
            reload_hooks(daemon, accepted=False)  # the daemon has not even started
            daemon.on_stopping.append(lambda: reload_hooks(daemon, accepted=True))
            await systemd.until(has("READY"))
        systemd.drain()
    assert not any("RELOADING" in m for m in systemd.messages)
    (ready,) = [m for m in systemd.messages if "READY" in m]
    assert "the last reload was refused" in ready["STATUS"]
    assert only_status_after(systemd, systemd.index("STOPPING")) == []


# -- the environment and the socket --------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, ("/run/systemd/notify", None)),
        ({"NOTIFY_SOCKET": "@notify", "WATCHDOG_USEC": "30000000"}, ("@notify", 30.0)),
        (
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "500000", "WATCHDOG_PID": "{pid}"},
            ("/n", 0.5),
        ),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, ("/n", None)),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "soon"}, ("/n", None)),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}, ("/n", None)),
        ({"NOTIFY_SOCKET": "run/notify"}, None),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, None),
        ({"WATCHDOG_USEC": "30000000"}, None),
    ],
)
def test_the_environment_is_read_once_and_removed(
    environ: dict[str, str], expected: tuple[str, float | None] | None
) -> None:
    given = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    given["PATH"] = "/usr/bin"
    found = NotifyEnvironment.take(given, pid=os.getpid())
    assert ((found.socket, found.watchdog_s) if found else None) == expected
    assert given == {"PATH": "/usr/bin"}, "nothing this process starts may notify for it"


def test_unusable_settings_are_logged() -> None:
    with capture_logs() as logs:
        NotifyEnvironment.take({"NOTIFY_SOCKET": "relative"}, pid=1)
        NotifyEnvironment.take({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "-5"}, pid=1)
    assert [e["event"] for e in logs] == [
        "systemd_notify_socket_unsupported",
        "systemd_watchdog_usec_invalid",
    ]


async def test_a_failing_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    notifier = Notifier(str(path))
    with capture_logs() as logs:
        assert notifier.send("READY=1", "STATUS=x") is False  # nobody listens yet
        assert notifier.send("WATCHDOG=1") is False
        async with listening(str(path)) as systemd:
            assert notifier.send("WATCHDOG=1") is True
            await systemd.until(has("WATCHDOG"))
    notifier.close()
    failures = [e for e in logs if e["event"] == "systemd_notify_failed"]
    assert len(failures) == 1
    assert failures[0]["socket"] == str(path)
    assert systemd.messages == [{"WATCHDOG": "1"}]


def test_the_unit_allows_far_more_open_files_than_the_admin_server_may_hold() -> None:
    unit = (Path(__file__).parents[1] / "config" / "aep-exporter.service").read_text()
    (value,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    # Even the largest admin.max_connections leaves most descriptors to the rest.
    largest = AdminConfig.model_json_schema()["properties"]["max_connections"]["maximum"]
    assert int(value) >= 4 * largest
    assert int(value) >= 64 * AdminConfig().max_connections
