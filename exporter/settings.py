"""The one settings object, built once at the edge (the CLI) and passed down in parts.

Sources, strongest first: environment variables (`EXPORTER_`, nested with `__`, e.g.
`EXPORTER_AEP__CLIENT_ID`), the TOML file, then secret files. The AEP client secret comes
from `aep.client_secret`, `aep.client_secret_file`, or a file named `aep_client_secret` in
`$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) or `/run/secrets` (containers).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from exporter.aep.config import AepConfig
from exporter.daemon.config import (
    AdminConfig,
    DaemonConfig,
    LogConfig,
    RedisConfig,
    ScheduleConfig,
)
from exporter.destinations import Destination, read_secret, unknown_destination
from exporter.engine.config import EngineConfig
from exporter.errors import ConfigError

SECRET_NAME = "aep_client_secret"  # noqa: S105 - a file name, not a secret


class Settings(BaseSettings):
    """Everything aep-exporter reads from its configuration."""

    model_config = SettingsConfigDict(
        env_prefix="EXPORTER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    secret_dirs: ClassVar[tuple[Path, ...]] = ()
    config_dir: ClassVar[Path | None] = None

    aep: AepConfig
    engine: EngineConfig = EngineConfig()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    daemon: DaemonConfig = DaemonConfig()
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    redis: RedisConfig | None = None
    """The Redis Streams intake; off unless a [redis] section is given."""
    schedules: list[ScheduleConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="before")
    @classmethod
    def _files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        aep = dict(data.get("aep") or {})
        if "client_secret_file" in aep:
            if aep.get("client_secret"):
                raise ValueError("give aep.client_secret or aep.client_secret_file, not both")
            aep["client_secret"] = read_secret(cls._resolve(aep.pop("client_secret_file")))
        elif not aep.get("client_secret"):
            for folder in cls.secret_dirs:
                if (folder / SECRET_NAME).is_file():
                    aep["client_secret"] = read_secret(folder / SECRET_NAME)
                    break
        data["aep"] = aep
        daemon = data.get("daemon")
        if isinstance(daemon, Mapping):
            data["daemon"] = {
                k: (str(cls._resolve(v)) if k.endswith("_dir") else v) for k, v in daemon.items()
            }
        admin = data.get("admin")
        if isinstance(admin, Mapping) and "token_file" in admin:
            data["admin"] = {**admin, "token_file": str(cls._resolve(admin["token_file"]))}
        redis = data.get("redis")
        if isinstance(redis, Mapping) and "password_file" in redis:
            data["redis"] = {**redis, "password_file": str(cls._resolve(redis["password_file"]))}
        dests = data.get("destinations")
        if isinstance(dests, Mapping):
            data["destinations"] = {
                name: {
                    k: (str(cls._resolve(v)) if k.endswith("_file") else v) for k, v in dest.items()
                }
                if isinstance(dest, Mapping)
                else dest
                for name, dest in dests.items()
            }
        return data

    @model_validator(mode="after")
    def _schedules(self) -> Settings:
        names = [s.name for s in self.schedules]
        problems = [
            f"schedule {n!r} is declared twice" for n in sorted(set(names)) if names.count(n) > 1
        ]
        problems += [
            f"schedule {s.name!r}: {unknown_destination(s.job.destination, self.destinations)}"
            for s in self.schedules
            if s.job.destination not in self.destinations
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def _resolve(cls, value: Any) -> Path:
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and cls.config_dir is not None:
            path = cls.config_dir / path
        return path


def describe_errors(exc: ValidationError, source: str) -> str:
    """A readable list of what is wrong, never echoing a value that may be a secret."""
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        lines.append(f"  {where or '(top level)'}: {error['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_settings(path: Path | None, *, credentials_directory: str | None = None) -> Settings:
    """Settings from `path` (TOML, optional) and the process environment (read here, at the
    edge); `credentials_directory` is systemd's `$CREDENTIALS_DIRECTORY`. Raises
    `ConfigError` with every problem listed."""
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    dirs = [Path(d) for d in (credentials_directory or "").split(":") if d]
    dirs.append(Path("/run/secrets"))

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)
        secret_dirs = tuple(dirs)
        config_dir = path.parent if path is not None else None

    try:
        loaded = FromFile(_env_parse_none_str="null")  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, str(path or "configuration"))) from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None
    return Settings.model_construct(**{k: getattr(loaded, k) for k in Settings.model_fields})


class LocalSettings(BaseSettings):
    """The settings that concern only this machine's files (the state folder, the schedules'
    names): what `status` reads, with no AEP credentials needed. Other sections are ignored
    here, not checked; `validate` checks them."""

    model_config = SettingsConfigDict(
        env_prefix="EXPORTER_", env_nested_delimiter="__", extra="ignore", frozen=True
    )
    config_dir: ClassVar[Path | None] = None

    daemon: DaemonConfig = DaemonConfig()
    schedules: list[ScheduleConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="before")
    @classmethod
    def _dirs(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("daemon"), Mapping):
            data = {
                **data,
                "daemon": {
                    k: (str(cls._resolve(v)) if k.endswith("_dir") else v)
                    for k, v in data["daemon"].items()
                },
            }
        return data

    @classmethod
    def _resolve(cls, value: Any) -> Path:  # (as Settings does: relative to the file)
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and cls.config_dir is not None:
            path = cls.config_dir / path
        return path


def load_local_settings(path: Path | None) -> LocalSettings:
    """`LocalSettings` from `path` (TOML, optional) and the environment; `ConfigError` with
    every problem of those sections listed."""
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: no such config file")

    class FromFile(LocalSettings):
        model_config = SettingsConfigDict(toml_file=path)
        config_dir = path.parent if path is not None else None

    try:
        loaded = FromFile(_env_parse_none_str="null")  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, str(path or "configuration"))) from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None
    return LocalSettings.model_construct(daemon=loaded.daemon, schedules=loaded.schedules)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=default_config(),
        help="TOML configuration (default: $EXPORTER_CONFIG, else "
        "/etc/aep-exporter/exporter.toml if it exists)",
    )


def default_config() -> Path | None:
    if "EXPORTER_CONFIG" in os.environ:
        return Path(os.environ["EXPORTER_CONFIG"])
    system = Path("/etc/aep-exporter/exporter.toml")
    return system if system.is_file() else None
