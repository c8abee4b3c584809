"""Settings: file, environment and secret files, with errors that point at the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.errors import ConfigError
from exporter.settings import load_settings

MINIMAL = """
[aep]
client_id = "my-client"
org_id = "ORG@AdobeOrg"
"""


PARTNER_SFTP = (
    MINIMAL
    + """client_secret = "s"
[destinations.partner]
type = "sftp"
host = "sftp.example.com"
username = "ml"
"""
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exporter.toml"
    path.write_text(text)
    return path


def test_the_client_secret_comes_from_a_file_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "client").write_text("from-file\n")
    path = write(tmp_path, MINIMAL + 'client_secret_file = "secrets/client"\n')
    settings = load_settings(path)
    assert settings.aep.client_secret.get_secret_value() == "from-file"
    assert "from-file" not in repr(settings)


def test_or_from_systemds_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "aep_client_secret").write_text("from-systemd")
    settings = load_settings(write(tmp_path, MINIMAL), credentials_directory=str(creds))
    assert settings.aep.client_secret.get_secret_value() == "from-systemd"


def test_a_missing_secret_is_an_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"aep\.client_secret: Field required"):
        load_settings(write(tmp_path, MINIMAL), credentials_directory=str(tmp_path / "none"))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_AEP__SANDBOX", "dev")
    monkeypatch.setenv("EXPORTER_AEP__CLIENT_SECRET", "from-env")
    monkeypatch.setenv("EXPORTER_ENGINE__POLL_MAX_S", "45")
    path = write(tmp_path, MINIMAL + 'sandbox = "prod"\n[engine]\npoll_max_s = 90\n')
    settings = load_settings(path)
    assert settings.aep.sandbox == "dev"
    assert settings.aep.client_secret.get_secret_value() == "from-env"
    assert settings.engine.poll_max_s == 45


def test_destination_secret_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sftp-password").write_text("pw")
    path = write(
        tmp_path,
        PARTNER_SFTP
        + """password_file = "sftp-password"
""",
    )
    dest = load_settings(path).destinations["partner"]
    auth = dest.auth()
    assert auth is not None
    assert auth["params"]["password"] == "pw"


def test_verify_section_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """Not against the daemon's working folder (systemd starts it in /): the read secret, the
    known_hosts file and the webhook's secret of a verify section sit beside the config."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "read-password").write_text("read-pw\n")
    (tmp_path / "secrets" / "hook").write_text("hook-secret\n")
    (tmp_path / "known_hosts").write_text("")
    path = write(
        tmp_path,
        PARTNER_SFTP
        + """password = "pw"
[destinations.partner.verify]
password_file = "secrets/read-password"
known_hosts = "known_hosts"
[destinations.partner.verify.webhook]
url = "https://hooks.example.com/aep"
secret_file = "secrets/hook"
""",
    )
    assert Path.cwd() != tmp_path
    verify = load_settings(path).destinations["partner"].verify
    assert verify is not None
    assert verify.password is not None
    assert verify.password.get_secret_value() == "read-pw"
    assert verify.known_hosts == tmp_path / "known_hosts"
    assert verify.webhook is not None
    assert verify.webhook.secret.get_secret_value() == "hook-secret"


def test_the_queries_folder_resolves_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'client_secret = "s"\n[engine]\nqueries_dir = "sql"\n')
    assert load_settings(path).engine.queries_dir == tmp_path / "sql"


def test_unknown_keys_and_bad_values_are_all_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """client_secret = "hide-this-secret"
retries = 3
[engine]
poll_min_s = -1
[destinations.x]
type = "gcs"
bucket = "googly"
access_key_id = "a"
secret_access_key = "hide-this-too"
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert "3 problem(s)" in text
    assert "aep.retries: Extra inputs are not permitted" in text
    assert "engine.poll_min_s" in text
    assert "destinations.x.gcs.bucket" in text
    assert "hide-this" not in text


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[aep\n")
    with pytest.raises(ConfigError, match=r"exporter\.toml"):
        load_settings(path)


def test_the_settings_models_do_not_load_the_scheduler(tmp_path: Path) -> None:
    """A configuration without schedules loads without APScheduler: the models are data, the
    schedule behaviour lives in `exporter.sources.schedules` (loaded by the daemon)."""
    config = tmp_path / "exporter.toml"
    config.write_text('[aep]\nclient_id = "c"\nclient_secret = "s"\norg_id = "o@AdobeOrg"\n')
    probe = (
        "import sys; from pathlib import Path; from exporter.settings import load_settings; "
        "load_settings(Path(sys.argv[1])); "
        "print(sorted(m for m in sys.modules if 'apscheduler' in m))"
    )
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed program
        [sys.executable, "-c", probe, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.stdout.strip() == "[]"


def test_a_misspelt_key_gets_a_did_you_mean_where_it_stands(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """client_secret = "s"
sandbx = "dev"
[engine]
poll_mni_s = 2
[destinations.x]
type = "gcs"
bucket = "googly"
acess_key_id = "a"
secret_access_key = "b"
[destinations.y]
type = "dlz"
colour = "blue"
[deamon]
state_dir = "x"
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert "aep.sandbx: Extra inputs are not permitted (did you mean 'sandbox'?)" in text
    assert "engine.poll_mni_s: Extra inputs are not permitted (did you mean 'poll_min_s'?)" in text
    assert "(did you mean 'access_key_id'?)" in text  # a field of gcs, the destination's type
    assert "deamon: Extra inputs are not permitted (did you mean 'daemon'?)" in text
    (colour,) = [line for line in text.splitlines() if "colour" in line]
    assert "did you mean" not in colour  # nothing close: no guess


def test_no_configuration_file_at_all_is_said_before_the_missing_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("EXPORTER_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    first, *rest = str(caught.value).splitlines()
    assert first.startswith("no configuration file found: --config was not given")
    assert "/etc/aep-exporter/exporter.toml does not exist" in first
    assert "  aep.client_id: Field required" in rest
