"""The emulator's in-memory world: tokens, sandboxes and the entities inside them.

Entities are kept as the JSON dicts AEP returns, so GET is a lookup; runs are objects whose
status is a function of the emulated clock (see runs.py).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import ConfigDict

from aep_emulator.clock import Clock
from aep_emulator.datalake import Batch, DataLake
from aep_emulator.exporting import ExportResult
from aep_emulator.settings import Knobs
from aep_emulator.storage import Remote

RunStatus = Literal["processing", "success", "failed"]


class EmuClock:
    """The emulator's notion of now: the base clock plus an offset that tests can advance."""

    def __init__(self, base: Clock) -> None:
        self.base = base
        self.offset = 0.0

    def now(self) -> float:
        return self.base.time() + self.offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)


@dataclass(slots=True)
class Run:
    """One flow run. Its outcome is drawn when it is created and revealed at `complete_at`."""

    id: str
    client_id: str
    flow_id: str
    flow_spec: dict[str, str]
    dataset_id: str
    sandbox: Sandbox
    created: float
    complete_at: float
    outcome: Literal["success", "failed", "partial"]
    batches: tuple[Batch, ...]
    dest_dir: Path
    file_type: str
    compression: str
    input_bytes: int = 0
    request_id: str = ""  # the x-request-id of the trigger that started it
    status: RunStatus = "processing"
    result: ExportResult | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    finishing: asyncio.Task[None] | None = None
    view: dict[str, Any] | None = None
    view_bytes: bytes | None = None
    # A storage server to write to instead of `dest_dir` (storage_endpoints), and the
    # OpenPGP public key to encrypt the files to (the base connection's `encryption`).
    remote: Remote | None = None
    public_key: bytes | None = None

    @property
    def terminal(self) -> bool:
        return self.status != "processing"


@dataclass
class Sandbox:
    name: str
    id: str
    org_id: str
    connections: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_connections: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_connections: dict[str, dict[str, Any]] = field(default_factory=dict)
    flows: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    # flow id -> its runs by id: `GET /runs?property=flowId==…` without a scan of every run
    runs_by_flow: dict[str, dict[str, Run]] = field(default_factory=dict)
    active_runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    exported_batches: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # base connection id -> the OpenPGP public key its `encryption` names (decoded, checked)
    encryption_keys: dict[str, bytes] = field(default_factory=dict)
    # flow id -> dataset id -> when the dataset joined the flow (epoch s): not in the flow JSON.
    joined: dict[str, dict[str, float]] = field(default_factory=dict)
    # Scheduled runs: flow id -> its next slot (epoch s), and a heap of (slot, flow id) whose
    # entries are current only while they match `next_slot` (stale ones are skipped).
    next_slot: dict[str, float] = field(default_factory=dict)
    slots: list[tuple[float, str]] = field(default_factory=list)
    slot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Token(NamedTuple):
    org_id: str
    client_id: str
    expires_at: float


class JournalEntry(NamedTuple):
    seq: int
    time_ms: int
    method: str
    path: str
    status: int
    op: str
    sandbox: str
    request_id: str


@dataclass
class ScriptedFault:
    """A fault served to the next `count` matching requests, for deterministic tests."""

    # A misspelt field (`path` for `path_prefix`) must be refused, not silently widen the fault.
    __pydantic_config__ = ConfigDict(extra="forbid")

    action: Literal["status", "drop", "drop_after", "delay"]
    op: str | None = None
    method: str | None = None
    path_prefix: str | None = None
    status: int = 503
    retry_after: int | None = None
    delay_ms: float = 0.0
    count: int = 1

    def matches(self, op: str, method: str, path: str) -> bool:
        return (
            (self.op is None or self.op == op)
            and (self.method is None or self.method.upper() == method)
            and (self.path_prefix is None or path.startswith(self.path_prefix))
        )


class EmulatorState:
    """Everything one emulator instance knows; the aiohttp app holds exactly one."""

    def __init__(self, knobs: Knobs, data_dir: Path, clock: Clock) -> None:
        self.knobs = knobs
        self.data_dir = data_dir
        self.clock = EmuClock(clock)
        self.lake = DataLake(data_dir / "datalake")
        self.destinations_dir = data_dir / "destinations"
        self.rng = random.Random(knobs.seed)
        self.tokens: dict[str, Token] = {}
        self.sandboxes: dict[tuple[str, str], Sandbox] = {}
        self.journal: deque[JournalEntry] = deque(maxlen=knobs.journal_size)
        self.journal_seq = 0
        self.faults: list[ScriptedFault] = []
        self._seq_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.arrivals = 0
        self._arrival_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.rate_buckets: dict[str, tuple[float, float]] = {}
        self.queries: dict[str, Any] = {}  # Query Service: id -> queryservice.Query

    def sandbox(self, org_id: str, name: str) -> Sandbox:
        key = (org_id, name)
        box = self.sandboxes.get(key)
        if box is None:
            box = Sandbox(
                name=name, id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org_id}/{name}")), org_id=org_id
            )
            self.sandboxes[key] = box
        return box

    def all_runs(self) -> Iterator[Run]:
        for box in self.sandboxes.values():
            yield from box.runs.values()

    def record(
        self, method: str, path: str, status: int, op: str, sandbox: str, request_id: str = ""
    ) -> None:
        self.journal_seq += 1
        if self._seq_waiters:
            self._wake_seq_waiters()
        self.journal.append(
            JournalEntry(
                self.journal_seq, self.clock.now_ms(), method, path, status, op, sandbox, request_id
            )
        )

    def _wake_seq_waiters(self) -> None:
        self._seq_waiters = _wake(self._seq_waiters, self.journal_seq)

    def arrived(self) -> None:
        """A platform request came in (it is journaled when it has been answered)."""
        self.arrivals += 1
        if self._arrival_waiters:
            self._arrival_waiters = _wake(self._arrival_waiters, self.arrivals)

    async def served(self, count: int) -> None:
        """Return once `count` requests in all have been answered (for tests that act at a
        chosen point of a workload, such as killing a client mid-way)."""
        await _until(self._seq_waiters, lambda: self.journal_seq, count)

    async def received(self, count: int) -> None:
        """Return once `count` requests in all have come in, answered or not."""
        await _until(self._arrival_waiters, lambda: self.arrivals, count)

    def reset(self, *, datasets: bool = False) -> None:
        """Forget every entity, token, fault and journal entry (datasets too, if asked)."""
        for run in self.all_runs():
            if run.finishing is not None:
                run.finishing.cancel()
        self.tokens.clear()
        self.sandboxes.clear()
        self.journal.clear()
        self.journal_seq = 0
        self.faults.clear()
        self.rate_buckets.clear()
        self.queries.clear()
        if datasets:
            self.lake.clear()


Waiters = list[tuple[int, "asyncio.Future[None]"]]


def _wake(waiters: Waiters, reached: int) -> Waiters:
    still = []
    for target, fut in waiters:
        if fut.done():
            continue
        if reached >= target:
            fut.set_result(None)
        else:
            still.append((target, fut))
    return still


async def _until(waiters: Waiters, current: Callable[[], int], target: int) -> None:
    if current() >= target:
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append((target, fut))
    await fut
