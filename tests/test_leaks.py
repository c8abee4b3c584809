"""Secrets never leave the daemon: AEP's errors echo rejected values (docs/aep-notes.md,
"Errors that echo values"), so every configured secret, in every encoding, is scrubbed where
those errors are parsed, in outcomes and in the log pipeline; and the daemon's every output is
searched for them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog
from pydantic import SecretStr

from aep_emulator.app import serve
from aep_emulator.settings import Knobs, Span
from exporter.aep import transport as http_module
from exporter.aep.envelopes import error_for
from exporter.aep.facts import StorageType
from exporter.clock import SystemClock
from exporter.daemon.assemble import build_daemon
from exporter.daemon.config import DaemonConfig, LogConfig, RedisConfig
from exporter.destinations import AzureBlobDestination, SftpDestination
from exporter.engine.config import EngineConfig
from exporter.errors import RequestError
from exporter.jobs import JobState, Outcome, RunError
from exporter.logs import configure_logging
from exporter.redaction import MIN_SCRUB_CHARS, REDACTED, SECRETS, SecretRegistry, forms
from exporter.settings import Settings
from tests.aepclient_support import config_for
from tests.conftest import Emulator
from tests.daemon_support import (
    daemon_process,
    drop_job,
    results,
    until_results,
    write_config,
)
from tests.redis_support import RedisServer, start_redis, until_entries
from tests.workflow import spec_ref

DEADLINE = 30.0  # real seconds: a bound on a wait, never a sleep

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
    return [f for f in dict.fromkeys(found) if len(f) >= MIN_SCRUB_CHARS]


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
    header = "a key file starts with -----BEGIN OPENSSH PRIVATE KEY-----"
    assert registry.scrub(header) == header  # not a secret: errors may say it


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


# -- the emulator echoes, as AEP does: what makes the daemon test below a real one ----------


@pytest.mark.parametrize(
    ("storage", "spec_name", "params", "echoed"),
    [
        (
            StorageType.GCS,
            "Google Cloud Storage authentication credentials",
            {"accessKeyId": "GOOG1", "secretAccessKey": "GCSecho+Secret/" + "x" * 26},
            "GCSecho+Secret/" + "x" * 26,
        ),
        (
            StorageType.SFTP,
            "SFTP with SSH Key",
            {"domain": "h.example.com", "username": "u", "sshKey": PEM},
            repr(PEM)[1:-1],  # as Python's (and Java's) validators quote it: \n escaped
        ),
        (
            StorageType.S3,
            "Access Key",
            {"s3AccessKey": "AKIAIOSFODNN7EXAMPLE", "s3SecretKey": "S3echo/" + "y" * 34},
            "S3echo/" + "y" * 34,
        ),
    ],
)
async def test_the_emulator_echoes_a_rejected_secret_in_its_error_as_aep_does(
    emulator: Emulator, storage: StorageType, spec_name: str, params: dict[str, Any], echoed: str
) -> None:
    body = {
        "name": "echo",
        "connectionSpec": spec_ref(storage),
        "auth": {"specName": spec_name, "params": params},
    }
    answer = await emulator.fs("POST", "/connections", json_body=body)
    assert answer.status == 400
    assert any(echoed in text for text in strings(answer.body)), answer.body


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for item in value for s in strings(item)] if isinstance(value, list) else []


# -- the daemon: every byte it writes, searched -----------------------------------------------

AEP_SECRET = "aep-Client+Secret/LEAK-7Q2x9"
S3_SECRET = "S3leak+Secret/0123456789abcdefghijklmnop"
AZURE_KEY = "AzLeakAccountKey+/" + "k" * 68 + "=="
AZURE_CONNECTION = (
    f"DefaultEndpointsProtocol=https;AccountName=leakacct;AccountKey={AZURE_KEY};"
    "EndpointSuffix=core.windows.net"
)
ADLS_KEY = "adls-Leak~Principal.Key_8Xq"
GCS_SECRET = "GCSleak+Secret/0123456789abcdefghijklmnop"  # 41 characters: AEP refuses it
GCS_SECRET_RELOADED = "GCSleak+Reloaded/0123456789abcdefghijkl"  # 39: refused as well
SFTP_PASSWORD = "sftp-Leak-Password!9z"
SFTP_KEY = base64.b64encode(PEM.encode()).decode()
ADMIN_TOKEN = "admin-Leak-Token-0123456789abcdef"
REDIS_PASSWORD = "redis-Leak-Pass-1st"
REDIS_PASSWORD_ROTATED = "redis-Leak-Pass-2nd-rotated"
SECRET_VALUES = {
    "aep.client_secret": AEP_SECRET,
    "s3.secret_access_key": S3_SECRET,
    "azure.connection_string": AZURE_CONNECTION,
    "azure AccountKey": AZURE_KEY,
    "adls.service_principal_key": ADLS_KEY,
    "gcs.secret_access_key": GCS_SECRET,
    "gcs.secret_access_key (reloaded)": GCS_SECRET_RELOADED,
    "sftp.password": SFTP_PASSWORD,
    "sftp.ssh_key": SFTP_KEY,
    "sftp.ssh_key decoded": PEM,
    "sftp.ssh_key PEM body": PEM.splitlines()[2],
    "admin.token": ADMIN_TOKEN,
    "redis.password": REDIS_PASSWORD,
    "redis.password (rotated)": REDIS_PASSWORD_ROTATED,
}
DESTINATIONS = {
    "s3": {
        "type": "s3",
        "bucket": "leak-s3",
        "access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "secret_access_key_file": "secrets/s3",
    },
    "azure": {
        "type": "azure_blob",
        "container": "leak-blob",
        "connection_string_file": "secrets/az",
    },
    "adls": {
        "type": "adls_gen2",
        "url": "https://leaklake.dfs.core.windows.net",
        "service_principal_id": "sp",
        "tenant": "t",
        "service_principal_key_file": "secrets/adls",
    },
    "gcs": {
        "type": "gcs",
        "bucket": "leak-gcs",
        "access_key_id": "GOOG1LEAK",
        "secret_access_key_file": "secrets/gcs",
    },
    "sftp_pw": {
        "type": "sftp",
        "host": "sftp.example.com",
        "username": "ml",
        "password_file": "secrets/sftp_pw",
    },
    "sftp_key": {
        "type": "sftp",
        "host": "sftp.example.com",
        "username": "ml",
        "ssh_key_file": "secrets/sftp_key",
    },
}


def job(dataset: str, destination: str, suffix: str = "") -> dict[str, Any]:
    return {
        "id": f"{destination}{suffix}",
        "dataset_id": dataset,
        "destination": destination,
        "path": f"leak/{destination}",
    }


def leaks(name: str, data: bytes) -> list[str]:
    """Which secrets, in which encoding, `data` holds."""
    found = []
    for what, value in SECRET_VALUES.items():
        for form in encodings(value):
            if form.encode() in data:
                found.append(f"{name}: {what} as {form[:12]}...")
    return found


def write_leak_config(folder: Path, url: str, redis: RedisServer) -> Path:
    secrets = folder / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    for name, value in {
        "s3": S3_SECRET,
        "az": AZURE_CONNECTION,
        "adls": ADLS_KEY,
        "gcs": GCS_SECRET,
        "sftp_pw": SFTP_PASSWORD,
        "sftp_key": SFTP_KEY,
        "admin": ADMIN_TOKEN,
        "redis": REDIS_PASSWORD,
    }.items():
        (secrets / name).write_text(value + "\n")
    path = write_config(
        folder,
        url,
        admin={"port": 0, "token_file": "secrets/admin"},
        redis={
            "url": redis.url,
            "password_file": "secrets/redis",
            "consumer": "leak",
            "block_s": 0.5,
        },
    )
    (folder / "client_secret").write_text(AEP_SECRET)
    lines = [path.read_text()]
    for name, values in DESTINATIONS.items():
        lines.append(f"[destinations.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _admin_answers(http: aiohttp.ClientSession, admin: str) -> dict[str, bytes]:
    answers = {}
    for path in ("/v1/jobs", "/v1/jobs?state=failed", "/v1/jobs/gcs", "/metrics"):
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.get(admin + path, headers=headers) as resp:
            assert resp.status == 200, path
            answers[f"admin {path}"] = await resp.read()
    return answers


async def _streams(redis: RedisServer, password: str) -> dict[str, bytes]:
    client = aioredis.Redis(host="127.0.0.1", port=redis.port, password=password)
    found = {}
    try:
        for stream in ("aep-exporter:results", "aep-exporter:dead-letter"):
            reply: Any = await client.xrange(stream)
            found[f"redis {stream}"] = b"\n".join(
                k + b"=" + v for _, fields in reply for k, v in fields.items()
            )
    finally:
        await client.aclose()
    return found


def _files(folder: Path, when: str) -> dict[str, bytes]:
    """Every file the daemon writes: the journal (and its -wal, -shm), result files."""
    written = [p for d in ("state", "spool") for p in (folder / d).rglob("*") if p.is_file()]
    return {f"{p.relative_to(folder)} ({when})": p.read_bytes() for p in written}


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_no_secret_reaches_any_output_of_the_daemon(tmp_path: Path) -> None:
    """Validation errors that echo values (GCS secrets, through the emulator over HTTP),
    reloads (a changed secret, a PEM key where base64 belongs) and a Redis password rotation;
    then the log, result files, journal and its WAL, Redis streams and the admin API are
    searched for every secret in every encoding."""
    knobs = Knobs(
        client_secret=AEP_SECRET,
        not_ready_window_s=0.2,
        run_duration_s=Span(min=0.1, max=0.2),
        seed=5,
    )
    async with serve(knobs, tmp_path / "emulator", clock=SystemClock()) as (url, state):
        dataset = state.lake.create_dataset(
            "prod", "features", 10, rng=random.Random(1), now_ms=0
        ).id
        await _provoke_and_search(tmp_path, url, dataset)


async def _provoke_and_search(tmp_path: Path, url: str, dataset: str) -> None:
    redis = await start_redis(tmp_path / "redis", password=REDIS_PASSWORD)
    folder = tmp_path / "daemon"
    folder.mkdir()
    config = write_leak_config(folder, url, redis)
    spool = folder / "spool"
    log = tmp_path / "daemon.log"
    try:
        async with daemon_process(config, log) as running, aiohttp.ClientSession() as http:
            await running.until("admin_listening", deadline_s=DEADLINE)
            (listening,) = [e for e in running.lines if e["event"] == "admin_listening"]
            admin = f"http://127.0.0.1:{listening['port']}"
            names = [drop_job(spool, f"{dest}.json", job(dataset, dest)) for dest in DESTINATIONS]
            await redis.client.xadd(
                "aep-exporter:jobs", {"job": json.dumps(job(dataset, "gcs", "r"))}
            )
            await until_results(spool, names, deadline_s=DEADLINE * 4)
            await until_entries(redis.client, "aep-exporter:results", 1, deadline_s=DEADLINE)
            gcs = results(spool)["gcs.json"]
            assert gcs["state"] in ("rejected", "failed"), gcs
            assert "secretAccessKey" in gcs["message"]  # AEP's echo, scrubbed
            assert "[redacted]" in gcs["message"]

            # A reload that changes a secret: the new one is known from then on.
            (folder / "secrets" / "gcs").write_text(GCS_SECRET_RELOADED)
            running.proc.send_signal(signal.SIGHUP)
            await running.until("reload_done", deadline_s=DEADLINE)
            again = drop_job(spool, "gcs-2.json", job(dataset, "gcs", "2"))
            await until_results(spool, [again], deadline_s=DEADLINE)
            assert "[redacted]" in results(spool)["gcs-2.json"]["message"]

            # A reload refused: the SSH key pasted as a PEM, not base64.
            (folder / "secrets" / "sftp_key").write_text(PEM)
            running.proc.send_signal(signal.SIGHUP)
            await running.until("reload_refused", deadline_s=DEADLINE)
            (refused,) = [e for e in running.lines if e["event"] == "reload_refused"]
            assert "ssh_key is a PEM private key as-is" in refused["reason"]
            (folder / "secrets" / "sftp_key").write_text(SFTP_KEY)

            outputs = await _admin_answers(http, admin)
            assert b'"gcs"' in outputs["admin /v1/jobs"]
            outputs |= await _streams(redis, REDIS_PASSWORD)
            outputs |= _files(folder, "running")
            assert any("-wal (" in name for name in outputs), sorted(outputs)

            # Redis's password rotated: the daemon is told (a restart applies it), and its
            # connections are cut; it cannot log in again and stops, for systemd to restart.
            await redis.client.config_set("requirepass", REDIS_PASSWORD_ROTATED)
            (folder / "secrets" / "redis").write_text(REDIS_PASSWORD_ROTATED)
            running.proc.send_signal(signal.SIGHUP)
            await running.until("reload_needs_restart", deadline_s=DEADLINE)
            await redis.client.client_kill_filter(_type="normal", skipme=True)
            async with asyncio.timeout(DEADLINE):
                await running.proc.wait()
            assert any(e["event"] == "task_died" for e in running.lines)
        outputs |= _files(folder, "stopped")
        outputs |= await _streams(redis, REDIS_PASSWORD_ROTATED)
        outputs["log"] = log.read_bytes()
        assert b'"job_finished"' in outputs["log"]
        found = [hit for name, data in outputs.items() for hit in leaks(name, data)]
        assert not found, "\n".join(found)
    finally:
        await redis.stop()


class _LeakyJson:
    """The HTTP client's `json`, with a bug: encoding a body with `auth` fails, the whole
    body (credentials included) in the exception's message."""

    loads = staticmethod(json.loads)

    @staticmethod
    def dumps(value: Any, **kwargs: Any) -> str:
        if isinstance(value, dict) and "auth" in value:
            raise TypeError(f"cannot encode {value!r}")
        return json.dumps(value, **kwargs)


async def test_a_traceback_from_the_http_client_building_a_connection_leaks_nothing(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that puts the connection's body (the SFTP password in it) into an exception,
    raised in the HTTP client as the engine builds the base connection: the job ends with
    "internal error: ...", the log has the traceback; neither holds the password."""
    password = "sftp-Traceback-Password-77"
    monkeypatch.setattr(http_module, "json", _LeakyJson)
    settings = Settings.model_construct(
        aep=config_for(emulator),
        engine=EngineConfig(),
        destinations={
            "sftp": SftpDestination(
                type="sftp", host="h.example.com", username="u", password=SecretStr(password)
            )
        },
        daemon=DaemonConfig(
            state_dir=tmp_path / "state", spool_dir=tmp_path / "spool", shutdown_grace_s=1
        ),
        log=LogConfig(),
    )
    (dataset,) = await emulator.seed(rows=5)
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    try:
        daemon = build_daemon(settings, clock=emulator.clock)
        task = asyncio.create_task(daemon.run())
        async with asyncio.timeout(DEADLINE):
            await daemon.ready.wait()
        name = drop_job(tmp_path / "spool", "crash.json", job(dataset, "sftp"))
        await until_results(tmp_path / "spool", [name], deadline_s=DEADLINE)
        daemon.stop()
        await asyncio.wait_for(task, DEADLINE)
    finally:
        structlog.configure(**saved)
    outcome = results(tmp_path / "spool")[name]
    assert outcome["message"].startswith("internal error: TypeError(")
    assert "[redacted]" in outcome["message"]
    logged = out.getvalue()
    assert '"job_crashed"' in logged
    assert "_LeakyJson" in logged or "dumps" in logged  # the traceback is there
    outputs = {"log": logged.encode()} | _files(tmp_path, "stopped")
    found = [
        f"{where}: {form[:12]}..."
        for where, data in outputs.items()
        for form in encodings(password)
        if form.encode() in data
    ]
    assert not found, "\n".join(found)
