"""Data Landing Zone endpoints: container information and (fake) SAS credentials."""

from __future__ import annotations

import secrets

from aiohttp import web

from aep_emulator.common import json_ok, state_of
from aep_emulator.connections import invalid
from aep_emulator.gateway import caller

CONTAINER = "dlz-destination"
ACCOUNT = "emulatordlz"


def _check_type(request: web.Request) -> None:
    kind = request.query.get("type")
    if kind != "dlz_destination":
        raise invalid(
            f"type must be dlz_destination (the emulator serves the destination "
            f"landing zone), got {kind!r}"
        )


def _credentials() -> dict[str, str]:
    token = f"sv=2020-10-02&si=dlz-destination&sr=c&sig={secrets.token_urlsafe(32)}"
    return {
        "containerName": CONTAINER,
        "SASToken": token,
        "storageAccountName": ACCOUNT,
        "SASUri": f"https://{ACCOUNT}.blob.core.windows.net/{CONTAINER}?{token}",
    }


async def get_credentials(request: web.Request) -> web.Response:
    _check_type(request)
    return json_ok(_credentials())


async def refresh_credentials(request: web.Request) -> web.Response:
    _check_type(request)
    if request.query.get("action") != "refresh":
        raise invalid("action=refresh is required to rotate the credentials")
    return json_ok(_credentials())


async def container_info(request: web.Request) -> web.Response:
    _check_type(request)
    who = caller(request)
    state_of(request).destinations_dir.joinpath("dlz", who.sandbox.name, CONTAINER).mkdir(
        parents=True, exist_ok=True
    )
    return json_ok({"containerName": CONTAINER, "containerTTL": "7"})
