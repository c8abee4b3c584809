"""The emulator's `denied_permissions`: a credential whose roles lack a permission gets
Flow Service's 403 FLOW-2120-403 on the calls that need it, and only on those
(docs/aep-notes.md#permissions)."""

from __future__ import annotations

import pytest

from aep_emulator.facts import DATALAKE_SOURCE_SPEC_ID, LANDING_ZONE_PATH
from aep_emulator.gateway import FORBIDDEN_MESSAGE
from tests.conftest import Answer, Emulator

DLZ_SPEC = "10440537-2a7b-4583-ac39-ed38d4b848e8"
CONFIGS = f"/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs?outputType=activationDatasets"


def forbidden(answer: Answer) -> bool:
    return (
        answer.status == 403
        and answer.body["type"] == "https://ns.adobe.com/aep/errors/FLOW-2120-403"
        and answer.body["title"] == "Forbidden"
        and answer.body["report"]["detailed-message"] == FORBIDDEN_MESSAGE
    )


async def calls(emulator: Emulator) -> dict[str, bool]:
    """Which of the calls dataset export makes are refused."""
    connection = {
        "name": "lz",
        "connectionSpec": {"id": DLZ_SPEC, "version": "1.0"},
    }
    answers = {
        "list exportable datasets": await emulator.fs("GET", CONFIGS),
        "list flows": await emulator.fs("GET", "/flows"),
        "read a connection spec": await emulator.fs("GET", f"/connectionSpecs/{DLZ_SPEC}"),
        "create a connection": await emulator.fs("POST", "/connections", json_body=connection),
        "trigger a run": await emulator.request(
            "POST",
            "/data/core/activation/disflowprovider/adhocrun",
            json_body={"activationInfo": {"destinations": []}},
        ),
        "read the landing zone": await emulator.request(
            "GET", f"{LANDING_ZONE_PATH}?type=dlz_destination"
        ),
    }
    return {name: forbidden(answer) for name, answer in answers.items()}


@pytest.mark.parametrize(
    ("denied", "refused"),
    [
        ([], set()),
        (["view-datasets"], {"list exportable datasets"}),
        (["view-destinations"], {"list flows", "read a connection spec"}),
        (["manage-dataset-destinations"], {"create a connection", "trigger a run"}),
    ],
)
async def test_each_permission_guards_its_calls(
    emulator: Emulator, denied: list[str], refused: set[str]
) -> None:
    config = await emulator.control("PATCH", "/config", {"denied_permissions": denied})
    assert config["denied_permissions"] == denied
    found = await calls(emulator)
    assert {name for name, no in found.items() if no} == refused


async def test_an_unknown_permission_name_is_refused(emulator: Emulator) -> None:
    async with emulator.session.patch(
        f"{emulator.url}/_emulator/config", json={"denied_permissions": ["view-everything"]}
    ) as resp:
        assert resp.status == 400
    assert emulator.knobs.denied_permissions == []
