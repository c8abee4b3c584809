"""The ad hoc export service's side of a trigger: the request body, the run id in the
answer, and its refusals read as `exporter.errors` types.

AEP documents none of this for datasets (see docs/aep-notes.md), so the answers are read
loosely: phrases are matched case-insensitively and the run id is found by pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from yarl import URL

from exporter.aep.facts import NOT_ENABLED_PHRASE, NOT_READY_PHRASE
from exporter.errors import (
    AdhocError,
    AdhocNotEnabled,
    AepError,
    FlowDisabled,
    NotAMember,
    NotReadyError,
    RunInProgress,
    TransportError,
)

_RUN_ID = re.compile(r"run\s*id\s*[:=]?\s*\[?\s*([A-Za-z0-9][A-Za-z0-9_-]*)", re.IGNORECASE)
_SPEC_ID = re.compile(r"flow\s*spec\s*[=:]\s*\[?\s*([A-Za-z0-9-]+)", re.IGNORECASE)
_WAIT_MINUTES = re.compile(r"wait\s+for\s+(\d+)\s+minute", re.IGNORECASE)
_NOT_READY = (NOT_READY_PHRASE.lower(), "not ready for dataset export")
_NOT_ENABLED = (NOT_ENABLED_PHRASE.lower(), "adhoc run can not be executed")
_IN_PROGRESS = ("already going on", "already running", "run already exists")
_DATASET = re.compile(r"dataset\s+([0-9a-zA-Z_-]{1,128})", re.IGNORECASE)
_DISABLED = ("flow is disabled",)
_NOT_MEMBER = ("is not part of",)


class TriggerOutcomeUnknown(TransportError):
    """A trigger was sent but no usable answer came back (lost connection, timeout, 5xx): a run
    may have started. Do not send it again blindly; look for the run with
    `runs_of_flow(flow_id, since_ms=sent_at_ms - <allowance for clock skew>)` first:
    `sent_at_ms` is the client's clock, `createdAt` AEP's."""

    retryable = False

    def __init__(
        self, message: str, *, flow_id: str, dataset_id: str, sent_at_ms: int, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.flow_id = flow_id
        self.dataset_id = dataset_id
        self.sent_at_ms = sent_at_ms


def trigger_body(flow_id: str, dataset_ids: Sequence[str]) -> dict[str, Any]:
    """`activationInfo` asking for datasets of one flow."""
    datasets = [{"id": d} for d in dataset_ids]
    return {"activationInfo": {"destinations": [{"flowId": flow_id, "datasets": datasets}]}}


def run_id_of(body: Any, flow_id: str, dataset_id: str) -> str | None:
    """The run id: the last path segment of the dataset's `statusURL` in the trigger's answer."""
    dests = body.get("destinations") if isinstance(body, Mapping) else None
    for dest in dests if isinstance(dests, list) else ():
        items = dest.get("datasets") if isinstance(dest, Mapping) else None
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, Mapping):
                continue
            if item.get("id", dataset_id) != dataset_id or item.get("flowId", flow_id) != flow_id:
                continue
            url = item.get("statusURL")
            if isinstance(url, str) and url.strip():
                last = URL(url.strip()).path.rstrip("/").rsplit("/", 1)[-1]
                if last:
                    return last
    return None


def refusal(exc: AepError, flow_id: str) -> AepError:
    """The ad hoc service's 4xx as the error the engine acts on. A `RunInProgress` whose
    `run_id` is empty says a run is going on without saying which."""
    text, lowered = exc.message, exc.message.lower()
    status, code, operation = exc.status, exc.code, exc.operation
    if any(p in lowered for p in _NOT_READY):
        minutes = _WAIT_MINUTES.search(text)
        return NotReadyError(
            text,
            status=status,
            code=code,
            operation=operation,
            retry_after=float(minutes.group(1)) * 60 if minutes else None,
        )
    if any(p in lowered for p in _NOT_ENABLED):
        spec = _SPEC_ID.search(text)
        return AdhocNotEnabled(
            f"dataset export is not enabled for the destination of flow {flow_id}"
            f"{f' (flow spec {spec.group(1)})' if spec else ''}; AEP said: {text}",
            status=status,
            code=code,
            operation=operation,
        )
    dataset = _DATASET.search(text)
    if any(p in lowered for p in _IN_PROGRESS):
        found = _RUN_ID.search(text)
        return RunInProgress(
            text,
            run_id=found.group(1) if found else "",
            dataset_id=dataset.group(1) if dataset else "",
            status=status,
            code=code,
            operation=operation,
        )
    if any(p in lowered for p in _DISABLED):
        return FlowDisabled(text, status=status, code=code, operation=operation)
    if any(p in lowered for p in _NOT_MEMBER):
        return NotAMember(
            text,
            dataset_id=dataset.group(1) if dataset else "",
            status=status,
            code=code,
            operation=operation,
        )
    return AdhocError(text, status=status, code=code, operation=operation)
