"""Secrets never leave the daemon: AEP's errors echo rejected values (docs/aep-notes.md,
"Errors that echo values"), so every configured secret, in every encoding, is scrubbed where
those errors are parsed, in outcomes and in the log pipeline; and the daemon's every output is
searched for them."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest
from pydantic import SecretStr

from exporter.aepclient.envelopes import error_for
from exporter.daemon.config import RedisConfig
from exporter.destinations import AzureBlobDestination, SftpDestination
from exporter.errors import RequestError
from exporter.jobs import JobState, Outcome, RunError
from exporter.redaction import MIN_SCRUB_CHARS, REDACTED, SECRETS, SecretRegistry, forms

PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBleakTestKeyBodyThatMustNeverBeEchoedBackToAnyOutput0000000\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


def encodings(value: str) -> list[str]:
    """What the leak checks search for: the value, base64, URL-encoded, JSON-escaped."""
    raw = value.encode()
    found = [
        value,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
    ]
    return [f for f in found if len(f) >= MIN_SCRUB_CHARS]


# -- the registry ----------------------------------------------------------------------------


def test_every_form_of_a_secret_is_scrubbed_and_the_rest_of_the_text_kept() -> None:
    registry = SecretRegistry()
    secret = "Leak+Test/Value=with spaces&more"
    registry.add(secret)
    for form in [*encodings(secret), repr(secret)[1:-1]]:
        text = f"value '{form}' does not match '^[A-Za-z0-9/+]{{40}}$'"
        scrubbed = registry.scrub(text)
        assert form not in scrubbed
        assert scrubbed == f"value '{REDACTED}' does not match '^[A-Za-z0-9/+]{{40}}$'"


def test_a_base64_ssh_key_is_scrubbed_as_configured_and_as_the_pem_it_encodes() -> None:
    registry = SecretRegistry()
    registry.add(base64.b64encode(PEM.encode()).decode())
    echoed = f"auth.params.sshKey: {PEM!r} does not match '^[A-Za-z0-9+/=\\\\s]+$'"
    as_json = json.dumps({"message": echoed})
    for text in (echoed, as_json, PEM):
        scrubbed = registry.scrub(text)
        assert "leakTestKeyBody" not in scrubbed
        assert "b3BlbnNzaC1rZXkt" not in scrubbed


def test_the_key_parts_of_an_azure_connection_string_are_secrets_on_their_own() -> None:
    registry = SecretRegistry()
    key = "AzLeakKey" + "Q" * 77 + "=="
    registry.add(f"DefaultEndpointsProtocol=https;AccountName=mlacct;AccountKey={key}")
    scrubbed = registry.scrub(f"AccountKey {key} is not valid; account mlacct")
    assert scrubbed == f"AccountKey {REDACTED} is not valid; account mlacct"


def test_short_secrets_are_not_scrubbed_by_value_so_common_words_survive() -> None:
    """A 7-character password would blank "redis" or "export" everywhere; it is left to the
    key-name redaction of the log pipeline (see exporter/redaction.py)."""
    registry = SecretRegistry()
    assert registry.add("export1") is False
    assert registry.add("exporter-long-secret") is True
    assert registry.scrub("export1 of the exporter") == "export1 of the exporter"
    assert all(len(f) >= MIN_SCRUB_CHARS for f in forms("exporter-long-secret"))


# -- settings fill the registry; errors and outcomes never hold a secret ---------------------


def test_validated_settings_register_their_secrets_and_aep_errors_never_hold_them() -> None:
    key = "AzEchoKey" + "R" * 77 + "=="
    AzureBlobDestination(
        type="azure_blob",
        container="ml-x",
        connection_string=SecretStr(f"AccountName=mlacct;AccountKey={key}"),
    )
    ssh = base64.b64encode(PEM.replace("leakTest", "leakEcho").encode()).decode()
    SftpDestination(type="sftp", host="h", username="u", ssh_key=SecretStr(ssh))
    RedisConfig(url="redis://:redis-url-password-42@127.0.0.1:6379/0")
    body = {
        "type": "https://ns.adobe.com/aep/errors/FLOW-1400-400",
        "title": "Bad Request",
        "errorMessage": f"auth.params.connectionString: 'AccountName=mlacct;AccountKey={key}' "
        f"does not match; sshKey {ssh!r}; redis-url-password-42",
    }
    error = error_for(400, body, operation="flowservice.create_connection")
    assert isinstance(error, RequestError)
    for text in (str(error), error.message, repr(error.args)):
        assert key not in text
        assert ssh[:40] not in text
        assert "redis-url-password-42" not in text
        assert "auth.params.connectionString" in text  # what was wrong is still said
    outcome = Outcome(
        job_id="j",
        state=JobState.FAILED,
        message=f"internal error: KeyError({key!r})",
        errors=(RunError(code="X", message=f"cannot write with key {key}"),),
    )
    assert key not in outcome.model_dump_json()


def test_the_process_registry_is_the_one_settings_fill() -> None:
    AzureBlobDestination(
        type="azure_blob",
        container="ml-x",
        connection_string=SecretStr("AccountName=a;SharedAccessSignature=sv=1&sig=ProcessSig123"),
    )
    assert SECRETS.scrub("sig=ProcessSig123") == f"sig={REDACTED}"


@pytest.mark.parametrize("value", ["", "short"])
def test_nothing_to_scrub_leaves_text_alone(value: str) -> None:
    registry = SecretRegistry()
    registry.add(value)
    assert registry.scrub("short text") == "short text"
