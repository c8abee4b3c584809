"""`aep-exporter probe`, the container's health check, against a live admin server."""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import time
from pathlib import Path

import pytest

from exporter.cli import build_parser
from exporter.ops.probe import base_url, cmd_probe
from tests.conftest import EMULATOR_SECRET, Emulator
from tests.daemon_support import write_config
from tests.test_admin import admin_daemon


def probe_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["probe", *argv])


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


async def probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # (the daemon's own log lines)
    code = await asyncio.to_thread(cmd_probe, probe_args(*argv))
    # The probe's line: the in-process daemon may log (a timestamped line) while it runs.
    lines = [line for line in capsys.readouterr().out.splitlines() if not LOG_LINE.match(line)]
    return code, lines[-1] + "\n"


async def test_healthy_and_ready_daemons_pass(
    emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with admin_daemon(emulator, tmp_path) as admin:
        code, out = await probe(capsys, "--url", admin.url)
        assert code == 0
        assert out == f'ok: {admin.url}/healthz: 200 {{"status": "ok"}}\n'
        code, out = await probe(capsys, "--url", admin.url, "--ready")
        assert code == 0, out
        assert out.startswith(f"ok: {admin.url}/readyz: 200 ")


async def test_a_stalled_loop_fails_the_probe(
    emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stalls = {"loop_stall_s": 0.1, "loop_stall_window_s": 60}
    async with admin_daemon(emulator, tmp_path, admin=stalls) as admin:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the event loop on purpose: it is under test
        code, out = await probe(capsys, "--url", admin.url)
    assert code == 1
    assert out.startswith(f"unhealthy: {admin.url}/healthz: 503 ")
    assert "the event loop was blocked for" in out


async def test_nothing_listening_fails_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out = await probe(capsys, "--url", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert out.startswith(f"unhealthy: http://127.0.0.1:{port}/healthz: no answer (")


def test_the_address_comes_from_the_daemons_configuration(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("t" * 32)
    config = write_config(
        tmp_path,
        "http://127.0.0.1:1",
        admin={"host": "0.0.0.0", "port": 9999, "token_file": str(token)},  # noqa: S104
    )
    assert base_url(probe_args("--config", str(config))) == "http://127.0.0.1:9999"
    config = write_config(tmp_path, "http://127.0.0.1:1", admin={"host": "::1", "port": 9465})
    assert base_url(probe_args("--config", str(config))) == "http://[::1]:9465"
    assert (tmp_path / "client_secret").read_text() == EMULATOR_SECRET


def test_a_disabled_admin_server_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:1", admin={"enabled": False})
    assert cmd_probe(probe_args("--config", str(config))) == 2
    assert "the admin server is disabled" in capsys.readouterr().err


async def test_paths_beyond_the_probes_are_asked_with_the_token_the_daemon_made(
    emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The probe's configuration names the same state folder as the daemon's: tmp_path/state.
    config = write_config(tmp_path, emulator.url)
    async with admin_daemon(emulator, tmp_path, admin={"token": None}) as admin:
        token = (tmp_path / "state" / "admin-token").read_text().strip()
        asked = ("--config", str(config), "--url", admin.url)
        code, out = await probe(capsys, *asked, "--path", "/v1/jobs?limit=1")
        assert (code, out) == (
            0,
            f'ok: {admin.url}/v1/jobs?limit=1: 200 {{"jobs": [], "next_cursor": null}}\n',
        )
        code, out = await probe(capsys, *asked, "--path", "/metrics")
        assert code == 0, out
        assert out.startswith(f"ok: {admin.url}/metrics: 200 # HELP ")
        # The probes themselves need no token: a probe that cannot read it still passes.
        (tmp_path / "state" / "admin-token").chmod(0o644)
        assert (await probe(capsys, *asked))[0] == 0
        code = await asyncio.to_thread(cmd_probe, probe_args(*asked, "--path", "/metrics"))
        assert code == 2
        err = capsys.readouterr().err
        assert "has mode 0644: others may have read the token" in err
        assert token not in err
        # Elsewhere, the configuration points at a state folder with no token in it.
        other = write_config(tmp_path / "state", emulator.url)
        code = await asyncio.to_thread(
            cmd_probe, probe_args("--config", str(other), "--url", admin.url, "--path", "/metrics")
        )
        assert code == 2
        assert "no admin token: admin.token_file is not set and" in capsys.readouterr().err


async def test_without_the_token_a_protected_path_fails_the_probe(
    emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "other-token"
    wrong.write_text("w" * 32)
    config = write_config(tmp_path, emulator.url, admin={"token_file": str(wrong)})
    async with admin_daemon(emulator, tmp_path) as admin:
        code, out = await probe(
            capsys, "--config", str(config), "--url", admin.url, "--path", "/metrics"
        )
    assert code == 1
    assert out.startswith(f"unhealthy: {admin.url}/metrics: 401 ")
    assert "w" * 32 not in out
