"""The one settings object, built once at the edge (the CLI) and passed down in parts.

Sources, strongest first: environment variables (`EXPORTER_`, nested with `__`, e.g.
`EXPORTER_AEP__CLIENT_ID`), the TOML file, then secret files. The AEP client secret comes
from `aep.client_secret`, `aep.client_secret_file`, or a file named `aep_client_secret` in
`$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) or `/run/secrets` (containers).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, model_validator
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
NESTED_PATHS = ("known_hosts", "root")  # paths in a destination's verify section


class _FromToml(BaseSettings):
    """What both settings models share: init values, then `EXPORTER_` variables, then the
    TOML file; paths in it relative to the file's folder."""

    config_dir: ClassVar[Path | None] = None

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

    @classmethod
    def _resolve(cls, value: Any) -> Path:
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and cls.config_dir is not None:
            path = cls.config_dir / path
        return path

    @classmethod
    def _resolve_dirs(cls, daemon: Mapping[str, Any]) -> dict[str, Any]:
        """A section with its `*_dir` paths made relative to the file."""
        return {k: (str(cls._resolve(v)) if k.endswith("_dir") else v) for k, v in daemon.items()}


class Settings(_FromToml):
    """Everything aep-exporter reads from its configuration."""

    model_config = SettingsConfigDict(
        env_prefix="EXPORTER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    secret_dirs: ClassVar[tuple[Path, ...]] = ()

    aep: AepConfig
    engine: EngineConfig = EngineConfig()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    daemon: DaemonConfig = DaemonConfig()
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    redis: RedisConfig | None = None
    """The Redis Streams intake; off unless a [redis] section is given."""
    schedules: list[ScheduleConfig] = Field(default_factory=list)

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
        for section in ("daemon", "engine"):  # state_dir, spool_dir; queries_dir
            if isinstance(data.get(section), Mapping):
                data[section] = cls._resolve_dirs(data[section])
        admin = data.get("admin")
        if isinstance(admin, Mapping) and "token_file" in admin:
            data["admin"] = {**admin, "token_file": str(cls._resolve(admin["token_file"]))}
        redis = data.get("redis")
        if isinstance(redis, Mapping) and "password_file" in redis:
            data["redis"] = {**redis, "password_file": str(cls._resolve(redis["password_file"]))}
        dests = data.get("destinations")
        if isinstance(dests, Mapping):
            data["destinations"] = {
                name: cls._paths(dest) if isinstance(dest, Mapping) else dest
                for name, dest in dests.items()
            }
        return data

    @classmethod
    def _paths(cls, section: Mapping[str, Any], also: tuple[str, ...] = ()) -> dict[str, Any]:
        """A destination's `*_file` paths, and in its sections (`verify`, its `webhook`) the
        `*_file` paths and `known_hosts` and `root` too, made relative to the file."""
        out: dict[str, Any] = {}
        for key, value in section.items():
            if isinstance(value, Mapping):
                out[key] = cls._paths(value, also=NESTED_PATHS)
            elif isinstance(value, str) and (key.endswith("_file") or key in also):
                out[key] = str(cls._resolve(value))
            else:
                out[key] = value
        return out

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


def describe_errors(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """A readable list of what is wrong, never echoing a value that may be a secret. With
    `model`, an unknown key gets a "did you mean" from the keys allowed where it stands."""
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        message = error["msg"].removeprefix("Value error, ")
        if model is not None and error["type"] == "extra_forbidden" and error["loc"]:
            *parent, unknown = error["loc"]
            close = difflib.get_close_matches(str(unknown), known_keys(model, parent), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        lines.append(f"  {where or '(top level)'}: {message}")
    return "\n".join(lines)


def known_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys allowed at `loc` (a validation error's path) under `model`: a step that is
    no field (a table's own name, a list index) is passed over; a union's tag (a
    destination's `type`) picks its member."""
    models = [model]
    for step in loc:
        fields = [m.model_fields[str(step)] for m in models if str(step) in m.model_fields]
        if fields:
            models = [found for f in fields for found in _models(f.annotation)]
            continue
        tagged = [m for m in models if _tag(m) == step]
        models = tagged or models
    return sorted({name for m in models for name in m.model_fields})


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = get_args(annotation)
    if get_origin(annotation) is dict:
        args = args[1:]  # (the values, not the keys)
    return [found for arg in args for found in _models(arg)]


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    return None if field is None else field.default


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
        problems = describe_errors(exc, str(path or "configuration"), Settings)
        if path is None:
            problems = f"{NO_FILE}\n{problems}"
        raise ConfigError(problems) from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None
    return Settings.model_construct(**{k: getattr(loaded, k) for k in Settings.model_fields})


class LocalSettings(_FromToml):
    """The settings that concern only this machine's files (the state folder, the schedules'
    names): what `status` reads, with no AEP credentials needed. Other sections are ignored
    here, not checked; `validate` checks them."""

    model_config = SettingsConfigDict(
        env_prefix="EXPORTER_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    daemon: DaemonConfig = DaemonConfig()
    schedules: list[ScheduleConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _dirs(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("daemon"), Mapping):
            data = {**data, "daemon": cls._resolve_dirs(data["daemon"])}
        return data


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


SYSTEM_CONFIG = Path("/etc/aep-exporter/exporter.toml")
NO_FILE = (
    f"no configuration file found: --config was not given, $EXPORTER_CONFIG is not set and "
    f"{SYSTEM_CONFIG} does not exist (settings came from EXPORTER_* variables alone; "
    "config/exporter.toml is a commented example, config/quick.toml one for the emulator)"
)


def default_config() -> Path | None:
    if "EXPORTER_CONFIG" in os.environ:
        return Path(os.environ["EXPORTER_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None
