"""IMS token issuance and the Adobe I/O gateway's header checks, over real HTTP.

Envelopes after docs/aep-notes.md ("error envelopes"): IMS answers OAuth's
`{error, error_description}`, the gateway `{error_code, message}`, an unknown sandbox
Flow Service's `FLOW-2100-404` problem document.
"""

from __future__ import annotations

from typing import Any

import pytest

from aep_emulator.settings import DEFAULT_CLIENT_ID, Knobs
from exporter.aep.facts import (
    ADHOC_DATASET_ACCEPT,
    ADHOC_PATH,
    IMS_TOKEN_PATH,
    LANDING_ZONE_PATH,
    NOT_READY_PHRASE,
    StorageType,
)
from tests.conftest import EMULATOR_SECRET, Answer, Emulator, default_knobs
from tests.workflow import base_connection, flow, source_connection, target_connection

GOOD_FORM = {
    "grant_type": "client_credentials",
    "client_id": DEFAULT_CLIENT_ID,
    "client_secret": EMULATOR_SECRET,
    "scope": "openid,AdobeID,read_organizations",
}
LIFETIME_S = 3_600


@pytest.fixture
def knobs() -> Knobs:
    return default_knobs(token_lifetime_s=LIFETIME_S)


async def ims(emulator: Emulator, form: dict[str, str] | None, **kwargs: Any) -> Answer:
    return await emulator.request("POST", IMS_TOKEN_PATH, form=form, auth=False, **kwargs)


def oauth_error(answer: Answer, status: int, error: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    assert set(answer.body) == {"error", "error_description"}, answer.body
    assert answer.body["error"] == error
    assert answer.body["error_description"]


def gateway_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.body
    assert answer.body == {"error_code": code, "message": answer.body["message"]}
    assert answer.body["message"]


def flow_error(answer: Answer, status: int, code: int) -> None:
    assert answer.status == status, answer.body
    assert answer.body["type"].endswith(f"/FLOW-{code}-{status}"), answer.body
    assert answer.body["status"] == status
    assert answer.body["report"]["detailed-message"]


async def without(emulator: Emulator, *names: str, **changes: str) -> dict[str, str]:
    """Good platform headers, minus `names`, with `changes` applied."""
    headers = await emulator.headers()
    for name in names:
        del headers[name]
    headers.update(changes)
    return headers


async def created(emulator: Emulator, path: str, body: dict[str, Any]) -> str:
    made = await emulator.fs("POST", path, json_body=body)
    assert made.status == 201, made.body
    return str(made.body["id"])


async def list_flows(emulator: Emulator, headers: dict[str, str]) -> Answer:
    return await emulator.fs("GET", "/flows", auth=False, headers=headers)


# -- IMS ----------------------------------------------------------------------------------------


async def test_good_credentials_get_a_bearer_token_whose_lifetime_is_the_knob(
    emulator: Emulator,
) -> None:
    answer = await ims(emulator, GOOD_FORM)
    assert answer.status == 200, answer.body
    assert set(answer.body) == {"access_token", "token_type", "expires_in"}
    assert answer.body["token_type"] == "bearer"
    assert answer.body["expires_in"] == LIFETIME_S
    assert isinstance(answer.body["access_token"], str)
    assert len(answer.body["access_token"]) > 20
    # The token it issued opens the platform.
    headers = await without(emulator, Authorization=f"Bearer {answer.body['access_token']}")
    assert (await list_flows(emulator, headers)).status == 200


async def test_every_token_is_new(emulator: Emulator) -> None:
    first, second = await ims(emulator, GOOD_FORM), await ims(emulator, GOOD_FORM)
    assert first.body["access_token"] != second.body["access_token"]


async def test_parameters_in_the_query_string_are_accepted(emulator: Emulator) -> None:
    answer = await ims(emulator, None, params=GOOD_FORM)
    assert answer.status == 200, answer.body
    assert answer.body["expires_in"] == LIFETIME_S


async def test_body_parameters_complete_the_query_string(emulator: Emulator) -> None:
    query = {"grant_type": "client_credentials", "scope": "openid"}
    form = {"client_id": DEFAULT_CLIENT_ID, "client_secret": EMULATOR_SECRET}
    answer = await ims(emulator, form, params=query)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"client_id": "someone-else"}, 400, "invalid_client"),
        ({"client_secret": "wrong-secret"}, 401, "invalid_client"),
        ({"client_secret": "sécret-ünicode"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({"client_id": ""}, 400, "invalid_request"),
        ({"scope": ""}, 400, "invalid_request"),
    ],
    ids=[
        "wrong-client-id",
        "wrong-secret",
        "non-ascii-secret",
        "password-grant",
        "code-grant",
        "empty-client-id",
        "empty-scope",
    ],
)
async def test_bad_credentials_get_oauth_errors(
    emulator: Emulator, changes: dict[str, str], status: int, error: str
) -> None:
    oauth_error(await ims(emulator, {**GOOD_FORM, **changes}), status, error)


@pytest.mark.parametrize("missing", ["grant_type", "client_id", "client_secret", "scope"])
async def test_each_missing_parameter_is_an_invalid_request(
    emulator: Emulator, missing: str
) -> None:
    form = {k: v for k, v in GOOD_FORM.items() if k != missing}
    answer = await ims(emulator, form)
    oauth_error(answer, 400, "invalid_request")
    assert missing in answer.body["error_description"]


async def test_no_parameters_at_all_is_an_invalid_request(emulator: Emulator) -> None:
    oauth_error(await ims(emulator, None), 400, "invalid_request")


async def test_a_json_body_is_refused_for_its_content_type(emulator: Emulator) -> None:
    answer = await emulator.request("POST", IMS_TOKEN_PATH, json_body=GOOD_FORM, auth=False)
    oauth_error(answer, 400, "invalid_request")
    assert "Content-Type" in answer.body["error_description"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"grant_type=\xff\xfe&client_id=\xc3"),
        ("application/x-www-form-urlencoded; charset=no-such-charset", b"grant_type=x"),
        ("multipart/form-data; boundary=xyz", b"--xyz--"),
        ("text/plain", b"grant_type=client_credentials"),
    ],
    ids=["undecodable", "unknown-charset", "multipart", "text"],
)
async def test_unreadable_token_requests_get_oauth_errors(
    emulator: Emulator, content_type: str, body: bytes
) -> None:
    async with emulator.session.post(
        emulator.url + IMS_TOKEN_PATH, data=body, headers={"Content-Type": content_type}
    ) as resp:
        answer = Answer(resp.status, await resp.json(), dict(resp.headers))
    oauth_error(answer, 400, "invalid_request")


async def test_the_token_endpoint_needs_no_platform_headers(emulator: Emulator) -> None:
    # A request with a junk Authorization header still gets a token: IMS is not behind the gateway.
    answer = await ims(emulator, GOOD_FORM, headers={"Authorization": "Bearer junk"})
    assert answer.status == 200, answer.body


# -- gateway ------------------------------------------------------------------------------------


PLATFORM_CALLS = [
    ("GET", "/data/foundation/flowservice/flows"),
    ("GET", "/data/foundation/flowservice/connectionSpecs"),
    ("POST", "/data/foundation/flowservice/connections"),
    ("GET", "/data/foundation/flowservice/runs/no-such-run"),
    ("POST", ADHOC_PATH),
    ("GET", f"{LANDING_ZONE_PATH}/credentials?type=dlz_destination"),
    ("GET", "/data/foundation/flowservice/no-such-api"),
]


@pytest.mark.parametrize(("method", "path"), PLATFORM_CALLS)
async def test_every_platform_call_needs_a_token(
    emulator: Emulator, method: str, path: str
) -> None:
    headers = await without(emulator, "Authorization")
    answer = await emulator.request(method, path, json_body={}, auth=False, headers=headers)
    gateway_error(answer, 403, "403010")


@pytest.mark.parametrize(("method", "path"), PLATFORM_CALLS)
async def test_every_platform_call_checks_the_api_key(
    emulator: Emulator, method: str, path: str
) -> None:
    headers = await without(emulator, "x-api-key")
    answer = await emulator.request(method, path, json_body={}, auth=False, headers=headers)
    gateway_error(answer, 403, "403000")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer not-a-token", "Bearer", "Basic ZW11bGF0b3I6c2VjcmV0", "not-even-a-scheme"],
)
async def test_a_token_ims_did_not_issue_is_not_valid(
    emulator: Emulator, authorization: str
) -> None:
    headers = await without(emulator, Authorization=authorization)
    gateway_error(await list_flows(emulator, headers), 401, "401013")


async def test_the_scheme_is_case_insensitive(emulator: Emulator) -> None:
    token = await emulator.token()
    headers = await without(emulator, Authorization=f"bearer {token}")
    assert (await list_flows(emulator, headers)).status == 200


async def test_a_token_expires_after_its_lifetime_on_the_fake_clock(emulator: Emulator) -> None:
    headers = await emulator.headers()
    await emulator.clock.advance(LIFETIME_S - 1)
    assert (await list_flows(emulator, headers)).status == 200
    await emulator.clock.advance(1)
    gateway_error(await list_flows(emulator, headers), 401, "401013")
    # A new token works again.
    fresh = await ims(emulator, GOOD_FORM)
    headers["Authorization"] = f"Bearer {fresh.body['access_token']}"
    assert (await list_flows(emulator, headers)).status == 200


async def test_the_token_lifetime_knob_applies_to_tokens_issued_after_a_change(
    emulator: Emulator,
) -> None:
    old = await emulator.headers()
    await emulator.control("PATCH", "/config", {"token_lifetime_s": 10})
    answer = await ims(emulator, GOOD_FORM)
    assert answer.body["expires_in"] == 10
    new = {**old, "Authorization": f"Bearer {answer.body['access_token']}"}
    await emulator.clock.advance(10)
    gateway_error(await list_flows(emulator, new), 401, "401013")
    assert (await list_flows(emulator, old)).status == 200  # issued with the old lifetime


async def test_a_wrong_api_key_is_invalid(emulator: Emulator) -> None:
    headers = await without(emulator, **{"x-api-key": "another-client"})
    gateway_error(await list_flows(emulator, headers), 403, "403003")


async def test_a_missing_org_header_is_a_bad_request(emulator: Emulator) -> None:
    headers = await without(emulator, "x-gw-ims-org-id")
    gateway_error(await list_flows(emulator, headers), 400, "400003")


async def test_another_org_is_not_the_profile_of_the_token(emulator: Emulator) -> None:
    headers = await without(emulator, **{"x-gw-ims-org-id": "OTHER0000000000000000@AdobeOrg"})
    gateway_error(await list_flows(emulator, headers), 403, "403025")


async def test_an_unknown_sandbox_is_not_found(emulator: Emulator) -> None:
    headers = await without(emulator, **{"x-sandbox-name": "staging"})
    flow_error(await list_flows(emulator, headers), 404, 2100)


async def test_checks_run_in_the_gateway_order(emulator: Emulator) -> None:
    # Token before key, key before org, org before sandbox.
    headers = {"x-sandbox-name": "nowhere"}
    gateway_error(await list_flows(emulator, headers), 403, "403010")
    headers["Authorization"] = "Bearer bogus"
    gateway_error(await list_flows(emulator, headers), 401, "401013")
    headers["Authorization"] = f"Bearer {await emulator.token()}"
    gateway_error(await list_flows(emulator, headers), 403, "403000")
    headers["x-api-key"] = "another-client"
    gateway_error(await list_flows(emulator, headers), 403, "403003")
    headers["x-api-key"] = DEFAULT_CLIENT_ID
    gateway_error(await list_flows(emulator, headers), 400, "400003")
    headers["x-gw-ims-org-id"] = "OTHER@AdobeOrg"
    gateway_error(await list_flows(emulator, headers), 403, "403025")
    headers["x-gw-ims-org-id"] = emulator.knobs.org_id
    flow_error(await list_flows(emulator, headers), 404, 2100)
    headers["x-sandbox-name"] = "dev"
    assert (await list_flows(emulator, headers)).status == 200


async def test_refused_calls_change_nothing_and_are_journaled(emulator: Emulator) -> None:
    headers = await without(emulator, "x-api-key")
    answer = await emulator.fs(
        "POST",
        "/connections",
        json_body=base_connection(StorageType.DLZ),
        auth=False,
        headers=headers,
    )
    gateway_error(answer, 403, "403000")
    assert (await emulator.fs("GET", "/connections")).body["items"] == []
    journal = await emulator.control("GET", "/journal?op=connections.create")
    assert [(e["method"], e["status"]) for e in journal["entries"]] == [("POST", 403)]


# -- sandboxes ----------------------------------------------------------------------------------


async def test_a_missing_sandbox_header_means_prod(emulator: Emulator) -> None:
    made = await emulator.fs(
        "POST", "/connections", json_body=base_connection(StorageType.DLZ), sandbox="prod"
    )
    assert made.status == 201, made.body
    headers = await without(emulator, "x-sandbox-name")
    answer = await emulator.fs(
        "GET", f"/connections/{made.body['id']}", auth=False, headers=headers
    )
    assert answer.status == 200, answer.body
    (item,) = answer.body["items"]
    assert item["sandboxName"] == "prod"
    journal = await emulator.control("GET", "/journal?op=connections.get")
    assert journal["entries"][-1]["sandbox"] == "prod"


async def test_entities_live_in_the_sandbox_that_created_them(emulator: Emulator) -> None:
    made = await emulator.fs(
        "POST", "/connections", json_body=base_connection(StorageType.DLZ), sandbox="dev"
    )
    assert made.status == 201, made.body
    entity_id = made.body["id"]
    in_dev = await emulator.fs("GET", f"/connections/{entity_id}", sandbox="dev")
    assert in_dev.status == 200
    assert in_dev.body["items"][0]["sandboxName"] == "dev"
    flow_error(await emulator.fs("GET", f"/connections/{entity_id}", sandbox="prod"), 404, 1101)
    assert (await emulator.fs("GET", "/connections", sandbox="prod")).body["items"] == []
    listed = await emulator.fs("GET", "/connections", sandbox="dev")
    assert [c["id"] for c in listed.body["items"]] == [entity_id]
    # Nor can prod delete it.
    flow_error(await emulator.fs("DELETE", f"/connections/{entity_id}", sandbox="prod"), 404, 1101)
    assert (await emulator.fs("GET", f"/connections/{entity_id}", sandbox="dev")).status == 200


async def test_datasets_live_in_their_sandbox(emulator: Emulator) -> None:
    (dev_dataset,) = await emulator.seed(rows=3, sandbox="dev")
    path = "/connectionSpecs/23598e46-f560-407b-88d5-ea6207e49db0/configs"
    query = {"outputType": "activationDatasets"}
    in_dev = await emulator.fs("GET", path, params=query, sandbox="dev")
    assert [d["id"] for d in in_dev.body["items"]] == [dev_dataset]
    in_prod = await emulator.fs("GET", path, params=query, sandbox="prod")
    assert in_prod.body["items"] == []
    assert in_prod.body["pageInfo"]["total"] == 0
    # A prod source connection cannot read a dev dataset; a dev one can.
    flow_error(
        await emulator.fs(
            "POST", "/sourceConnections", json_body=source_connection(dev_dataset), sandbox="prod"
        ),
        400,
        1415,
    )
    made = await emulator.fs(
        "POST", "/sourceConnections", json_body=source_connection(dev_dataset), sandbox="dev"
    )
    assert made.status == 201, made.body


async def test_flows_live_in_their_sandbox_for_adhoc_runs_too(emulator: Emulator) -> None:
    (dataset,) = await emulator.seed(rows=3, sandbox="prod")
    dlz = StorageType.DLZ
    base = await created(emulator, "/connections", base_connection(dlz))
    source = await created(emulator, "/sourceConnections", source_connection(dataset))
    target = await created(emulator, "/targetConnections", target_connection(dlz, base))
    flow_id = await created(emulator, "/flows", flow(dlz, source, target))
    request = {
        "activationInfo": {"destinations": [{"flowId": flow_id, "datasets": [{"id": dataset}]}]}
    }
    accept = {"Accept": ADHOC_DATASET_ACCEPT}
    in_dev = await emulator.request(
        "POST", ADHOC_PATH, json_body=request, headers=accept, sandbox="dev"
    )
    assert in_dev.status == 400
    assert set(in_dev.body) == {"message"}
    assert "Flow not found" in in_dev.body["message"]
    # In prod the flow exists (it is merely too new to run).
    in_prod = await emulator.request("POST", ADHOC_PATH, json_body=request, headers=accept)
    assert in_prod.status == 400
    assert NOT_READY_PHRASE in in_prod.body["message"]


async def test_the_control_api_needs_no_credentials(emulator: Emulator) -> None:
    async with emulator.session.get(f"{emulator.url}/_emulator/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
