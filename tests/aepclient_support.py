"""Shared by the client's tests: settings pointing at the emulator, and a flow built through
any `AepApi`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aep_emulator.settings import DEFAULT_CLIENT_ID
from exporter.aep.api import AepApi
from exporter.aep.config import AepConfig
from exporter.aep.facts import StorageType
from tests import workflow
from tests.conftest import EMULATOR_SECRET, Emulator


def config_for(emulator: Emulator, **changes: Any) -> AepConfig:
    """Settings for the emulator fixture, with retries generous enough for fault storms."""
    base: dict[str, Any] = {
        "platform_url": emulator.url,
        "ims_url": emulator.url,
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": EMULATOR_SECRET,
        "org_id": emulator.knobs.org_id,
        "rate_limit_rps": 50,
        "max_attempts": 8,
        "base_delay_s": 0.5,
        "max_delay_s": 10,
        "max_elapsed_s": 600,
    }
    return AepConfig.model_validate({**base, **changes})


async def journal(emulator: Emulator, op: str) -> list[dict[str, Any]]:
    """The emulator's journal entries for one operation (e.g. `flows.create`)."""
    entries: list[dict[str, Any]] = (await emulator.control("GET", f"/journal?op={op}"))["entries"]
    return entries


@dataclass(frozen=True)
class Built:
    base_id: str
    source_id: str
    target_id: str
    flow_id: str


async def build_flow(
    api: AepApi,
    dataset_ids: list[str],
    *,
    prefix: str = "t",
    storage: StorageType = StorageType.DLZ,
) -> Built:
    """Base, source and target connection and a one-off full-export flow of `dataset_ids`."""
    base_id = await api.create("connections", workflow.base_connection(storage, f"{prefix}-base"))
    source = workflow.source_connection(dataset_ids[0], f"{prefix}-source")
    source["params"]["datasets"] = [{"dataSetId": d, "name": "features"} for d in dataset_ids]
    source_id = await api.create("sourceConnections", source)
    target_id = await api.create(
        "targetConnections", workflow.target_connection(storage, base_id, name=f"{prefix}-target")
    )
    flow_id = await api.create(
        "flows", workflow.flow(storage, source_id, target_id, name=f"{prefix}-flow")
    )
    return Built(base_id, source_id, target_id, flow_id)
