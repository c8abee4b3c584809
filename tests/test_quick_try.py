"""README's quick try, run as written, in a fresh clone, within a minute.

The commands come from README.md itself (the block after `<!-- quick-try -->`), so the README
cannot drift from what works. Two things differ from a user's run, both for a test machine:
the venv is the one running this test (linked in, not rebuilt: installs take minutes), and the
emulator's port is a free one rather than 8765 (other tests may run at the same time).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aep_emulator.cli import PRESETS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
BLOCK = re.compile(r"<!-- quick-try -->\n```sh\n(.*?)```", re.DOTALL)


def quick_try(readme: str) -> str:
    found = BLOCK.search(readme)
    assert found, "README.md has no quick-try block"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_the_readme_quick_try_works_from_a_clean_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(  # noqa: S603
        ["git", "clone", "--quiet", str(ROOT), str(clone)],  # noqa: S607
        check=True,
        timeout=DEADLINE_S,
    )
    (clone / ".venv").symlink_to(Path(sys.prefix))
    script = quick_try((clone / "README.md").read_text())
    port = free_port()
    assert script.count("--preset quick") == 1
    assert "8765" not in script
    script = script.replace("--preset quick", f"--preset quick --port {port}")
    config = clone / "config" / "quick.toml"
    config.write_text(config.read_text().replace(":8765", f":{port}"))

    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603
        ["bash", "-e", "-c", script],  # noqa: S607
        cwd=clone,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the emulator it starts is in its group: killed with it
        # A user's shell: no EXPORTER_* settings; export's rerun notes in the test's folder.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")},
            "XDG_STATE_HOME": str(tmp_path / "state"),
        },
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:  # the emulator too, should the script have failed before `kill %1`
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.monotonic() - started
    assert proc.returncode == 0, f"{out}\n{err}"
    assert took < DEADLINE_S

    dataset = re.search(r"--dataset (\w+)", script)
    assert dataset is not None
    assert f'"id": "{dataset.group(1)}"' in out  # the preset's seeded dataset is the README's
    assert f"aep-exporter emulator listening on http://127.0.0.1:{port}" in out
    assert "succeeded job job-" in err
    rows = PRESETS["quick"]["rows"]
    assert re.search(rf"^\s+records\s+{rows}$", err, re.MULTILINE), err
    assert re.search(r"^\s+files\s+1$", err, re.MULTILINE), err
    (exported,) = [line for line in out.splitlines() if line.endswith(".parquet")]
    assert (clone / exported).stat().st_size > 0
    assert exported.startswith(".aep-emulator/destinations/")
