"""deploy/: the compose file and the Kubernetes manifests agree with the code and the image.

No Docker engine or cluster runs here (and `docker compose` is not installed), so the files
are parsed and checked against what the code reads: the commands parse with the CLI's own
parser, the configurations load with `load_settings`, and every port, path, probe, secret
and user matches the settings and the Dockerfile.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from exporter import __version__
from exporter.cli import build_parser
from exporter.settings import SECRET_NAME, Settings, load_settings
from tests.test_packaging import env, only, parse_dockerfile

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RUNTIME = parse_dockerfile(ROOT / "Dockerfile")[-1]
CONFIG_PATH = PurePosixPath(env(RUNTIME)["EXPORTER_CONFIG"])
IMAGE_USER = only(RUNTIME, "USER").args  # "10001:10001"
STATE_VOLUME = only(RUNTIME, "VOLUME").exec_form()[0]
SECRETS_DIR = "/run/secrets/"
TMP = "/tmp"  # noqa: S108 - the container's own /tmp, a tmpfs: where the image sets HOME


@pytest.fixture(autouse=True)
def _no_exporter_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXPORTER_"):
            monkeypatch.delenv(name)


def load_with_secrets(text: str, tmp_path: Path, secrets: dict[str, str]) -> Settings:
    """A configuration as the container reads it: its /run/secrets files made under
    `tmp_path` (the client secret found there by name, as in the container)."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    for name, value in secrets.items():
        (folder / name).write_text(value + "\n")
    config = tmp_path / "exporter.toml"
    config.write_text(text.replace(SECRETS_DIR, f"{folder}/"))
    return load_settings(config, credentials_directory=str(folder))


# -- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_the_daemon_redis_and_the_emulator(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"exporter", "redis", "emulator"}
    exporter = services["exporter"]
    assert exporter["image"] == f"aep-exporter:{__version__}"
    assert exporter["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / exporter["build"]["context"] / "Dockerfile").is_file()
    args = build_parser(["run"]).parse_args(exporter["command"])
    assert args.command == "run"
    assert exporter["read_only"] is True
    assert exporter["tmpfs"] == [TMP]
    assert exporter["user"] == IMAGE_USER
    emulator = services["emulator"]
    assert emulator["image"] == f"aep-exporter-emulator:{__version__}"
    dockerfile = DEPLOY / emulator["build"]["context"] / emulator["build"]["dockerfile"]
    (stage,) = parse_dockerfile(dockerfile)
    assert only(stage, "ENTRYPOINT").exec_form() == ["aep-exporter", "emulator"]
    parsed = build_parser(["emulator"]).parse_args(["emulator", *emulator["command"]])
    assert parsed.host == "0.0.0.0"  # noqa: S104 - reached from the other containers
    # Its own ignore file lets in what its COPY lines name, and the emulator's package.
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().split()
    for copied in ("pyproject.toml", "README.md", "LICENSE", "exporter/", "aep_emulator/"):
        assert f"!{copied}" in ignore


def test_compose_mounts_agree_with_the_daemons_settings(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    exporter, emulator = services["exporter"], services["emulator"]
    mounts = dict(reversed(v.rsplit(":", 2)[:2]) for v in exporter["volumes"])
    config_source = DEPLOY / mounts[str(CONFIG_PATH)]
    state_volume = mounts[STATE_VOLUME]
    assert state_volume in compose["volumes"], "the journal and spool outlive the container"
    # Both secrets come from the operator's environment: none is kept in the repository.
    assert compose["secrets"][SECRET_NAME] == {"environment": "AEP_EXPORTER_CLIENT_SECRET"}
    assert compose["secrets"]["admin_token"] == {"environment": "AEP_EXPORTER_ADMIN_TOKEN"}
    assert not list((DEPLOY / "compose").glob("*secret*"))
    client_secret = "c" * 48  # what `openssl rand -hex 24` gives
    assert set(exporter["secrets"]) == {SECRET_NAME, "admin_token"}
    settings = load_with_secrets(
        config_source.read_text(),
        tmp_path,
        {SECRET_NAME: client_secret, "admin_token": "t" * 32},
    )
    assert str(settings.daemon.state_dir) == STATE_VOLUME
    assert settings.daemon.spool_dir.is_relative_to(settings.daemon.state_dir)
    assert settings.admin.token is not None
    assert settings.aep.client_secret.get_secret_value() == client_secret
    # The daemon shares the emulator's network namespace: the emulator on loopback (plain
    # http allowed), the admin port published on the emulator's service.
    assert exporter["network_mode"] == "service:emulator"
    command = build_parser(["emulator"]).parse_args(["emulator", *emulator["command"]])
    assert settings.aep.platform_url == f"http://127.0.0.1:{command.port}"
    assert settings.aep.ims_url == settings.aep.platform_url
    assert str(command.client_secret) == f"{SECRETS_DIR}{SECRET_NAME}"
    assert SECRET_NAME in emulator["secrets"]
    published = {p.rsplit(":", 1)[1] for p in emulator["ports"]}
    assert str(settings.admin.port) in published
    assert settings.redis is not None
    assert settings.redis.url.startswith("redis://redis:6379/")
    assert "redis" in exporter["depends_on"]
    assert settings.engine.not_ready_wait_s == command.not_ready_window_s


# -- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/k8s by kind; kustomization.yaml lists exactly these files. The
    Secret is the one its secretGenerator makes from files (its `files` as `data` keys)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    found: dict[str, dict[str, Any]] = {}
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    assert "Secret" not in found, "no Secret with values in the repository: a generator"
    (generator,) = kustomization["secretGenerator"]
    assert generator["options"]["disableNameSuffixHash"], "the StatefulSet names it as is"
    assert not generator.get("literals"), "secrets come from files, not the manifest"
    sources = dict(f.split("=", 1) for f in generator["files"])
    found["Secret"] = {
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "data": dict.fromkeys(sources),
        "sources": sources,
    }
    return found


def pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = manifests["StatefulSet"]["spec"]["template"]["spec"]
    return spec


def test_k8s_has_a_secret_a_configmap_a_statefulset_and_a_service(
    manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(manifests) == {"Secret", "ConfigMap", "StatefulSet", "Service"}
    statefulset = manifests["StatefulSet"]["spec"]
    assert statefulset["replicas"] == 1, "the SQLite journal has one writer"
    labels = statefulset["template"]["metadata"]["labels"]
    assert statefulset["selector"]["matchLabels"].items() <= labels.items()
    assert manifests["Service"]["spec"]["selector"].items() <= labels.items()
    (claim,) = statefulset["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    secret = manifests["Secret"]
    assert set(secret["data"]) == {SECRET_NAME, "admin_token"}
    # Its files are the operator's, in a folder git ignores: none is in the repository.
    for source in secret["sources"].values():
        ignored = subprocess.run(  # noqa: S603
            ["git", "check-ignore", "--quiet", f"deploy/k8s/{source}"],  # noqa: S607
            cwd=ROOT,
            check=False,
        )
        assert ignored.returncode == 0, f"git would track deploy/k8s/{source}"


def test_the_pod_mounts_config_secrets_and_state_where_the_daemon_reads_them(
    manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    spec = pod(manifests)
    (container,) = spec["containers"]
    assert container["image"] == f"aep-exporter:{__version__}"
    assert build_parser(["run"]).parse_args(container["args"]).command == "run"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The ConfigMap's key lands at the image's EXPORTER_CONFIG.
    config = volumes[
        next(n for n, m in mounts.items() if m["mountPath"] == str(CONFIG_PATH.parent))
    ]
    items = config["configMap"]["items"]
    assert config["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert [i["path"] for i in items] == [CONFIG_PATH.name]
    text = manifests["ConfigMap"]["data"][items[0]["key"]]
    # The Secret's keys land in /run/secrets, where the settings look for the client secret.
    secret_mount = next(n for n, m in mounts.items() if m["mountPath"] == SECRETS_DIR.rstrip("/"))
    assert volumes[secret_mount]["secret"]["secretName"] == manifests["Secret"]["metadata"]["name"]
    assert volumes[secret_mount]["secret"]["defaultMode"] & 0o040, "readable by the pod's group"
    settings = load_with_secrets(
        text, tmp_path, dict.fromkeys(manifests["Secret"]["data"], "x" * 32)
    )
    assert settings.admin.token is not None
    assert str(settings.daemon.state_dir) == STATE_VOLUME
    assert mounts["state"]["mountPath"] == STATE_VOLUME
    assert manifests["StatefulSet"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == (
        "state"
    )
    assert settings.daemon.spool_dir.is_relative_to(settings.daemon.state_dir)
    assert volumes[next(n for n, m in mounts.items() if m["mountPath"] == TMP)]["emptyDir"]
    # A stop finishes within the grace Kubernetes gives before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > settings.daemon.shutdown_grace_s
    # Clients in the cluster name the Service in their Host header: the admin server must
    # accept it.
    service = manifests["Service"]["metadata"]["name"]
    assert service in settings.admin.allowed_hosts


def test_the_probes_ask_the_admin_port_for_health_and_readiness(
    manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    (container,) = pod(manifests)["containers"]
    text = manifests["ConfigMap"]["data"]["exporter.toml"]
    port = tomllib.loads(text)["admin"]["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"admin": port}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = container["readinessProbe"]["httpGet"]
    assert {k: (v["path"], ports[v["port"]]) for k, v in probes.items()} == {
        "startupProbe": ("/healthz", port),
        "livenessProbe": ("/healthz", port),
        "readinessProbe": ("/readyz", port),
    }
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == port
    annotations = manifests["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_the_pod_runs_as_the_images_user_without_privileges(
    manifests: dict[str, dict[str, Any]],
) -> None:
    spec = pod(manifests)
    (container,) = spec["containers"]
    uid, gid = (int(x) for x in IMAGE_USER.split(":"))
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}
