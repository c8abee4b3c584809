"""The license, the version and the changelog agree with each other and with the package."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest

from exporter import __version__
from exporter.cli import main

ROOT = Path(__file__).resolve().parent.parent
# SHA-256 of the Apache License 2.0 text as the ASF publishes it
# (https://www.apache.org/licenses/LICENSE-2.0.txt; Debian ships the same bytes).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_license_file_is_the_apache_2_text_the_package_declares() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    project = pyproject()["project"]
    assert isinstance(project, dict)
    # An SPDX expression, not the table setuptools deprecates (its banner on every install).
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    assert "setuptools>=77" in build["requires"]  # the first to read the expression


def test_the_version_lives_in_one_place() -> None:
    data = pyproject()
    project = data["project"]
    assert isinstance(project, dict)
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "exporter.__version__"}  # type: ignore[index]
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    others = [
        str(path.relative_to(ROOT))
        for package in ("exporter", "aep_emulator")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
        and re.search(rf"['\"]{re.escape(__version__)}['\"]", path.read_text())
    ]
    assert others == [], "the version is written down again"


def test_the_newest_release_in_the_changelog_is_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", changelog, re.MULTILINE)
    assert releases, "no release heading (## X.Y.Z - YYYY-MM-DD)"
    assert releases[0] == __version__


def test_version_option_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"aep-exporter {__version__}"
