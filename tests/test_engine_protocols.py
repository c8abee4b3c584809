"""The exporter's destination options reach AEP as AEP takes them: the engine, over HTTP against
the emulator, exports to a real SFTP server on its own port, PGP-encrypted, at the server's
root (`/` as the folder path); the test decrypts what the server holds with its own key."""

from __future__ import annotations

import io
import random
import re

import pyarrow.parquet as pq
from pydantic import SecretStr

from exporter.aep.client import HttpAep
from exporter.destinations import SftpDestination
from exporter.engine.engine import Engine
from exporter.jobs import Job, JobState
from tests.aepclient_support import config_for
from tests.conftest import Emulator
from tests.pgp_support import Keypair
from tests.storage_servers import SftpServer
from tests.test_emulator_runs import batch_ids
from tests.test_engine import ENGINE


async def test_sftp_port_encryption_and_root_path_reach_the_server(
    emulator: Emulator, sftp_server: SftpServer, keypair: Keypair
) -> None:
    await emulator.control("PATCH", "/config", {"storage_endpoints": ["sftp=connection"]})
    (dataset,) = await emulator.seed(rows=120)
    destination = SftpDestination(
        type="sftp",
        host=sftp_server.host,
        port=sftp_server.port,
        username=sftp_server.password_user,
        password=SecretStr(sftp_server.password),
        pgp_public_key=keypair.public_b64,
    )
    config = config_for(emulator)
    async with HttpAep.from_config(config, clock=emulator.clock, rng=random.Random(5)) as api:
        engine = Engine(
            api,
            {"partner": destination},
            ENGINE,
            org_id=config.org_id,
            sandbox=config.sandbox,
            clock=emulator.clock,
            rng=random.Random(6),
        )
        async with engine:
            job = Job.model_validate({"dataset_id": dataset, "destination": "partner", "path": "/"})
            outcome = await engine.run(job)
    assert outcome.state == JobState.SUCCEEDED, outcome
    listed = sftp_server.list(dataset)
    assert len(listed) == outcome.files
    assert sum(listed.values()) == outcome.bytes
    for key in listed:
        assert re.fullmatch(rf"{dataset}/exportTime=\d{{12}}/part-.*\.gz\.parquet\.gpg", key), key
    plain = [keypair.decrypt(sftp_server.read(key)) for key in listed]
    rows = [
        pid
        for blob in plain
        for pid in pq.read_table(io.BytesIO(blob)).column("person_id").to_pylist()
    ]
    assert sorted(rows) == sorted(batch_ids(emulator, dataset))
