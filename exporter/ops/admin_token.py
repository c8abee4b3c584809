"""The admin API's bearer token when none is configured: made once, kept in the state folder.

`/metrics` and `/v1/*` always need a token, on loopback too: any local process (or a browser
page, through DNS rebinding) could otherwise submit exports. Without `admin.token_file`, the
daemon makes one on its first start in `<daemon.state_dir>/admin-token` (mode 0600, beside
the journal) and reuses it; `aep-exporter probe` reads it from there, found through the same
settings. The token itself is never logged, only the file's path.

A token file that others could have read (any group or other permission bit), that this user
does not own, or that is not a regular file is refused, not repaired: whoever could read it
may hold the token, so the fix is to delete the file (a new token is made at the next start)
or, if no one else can have read it, `chmod 600` it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from exporter.daemon.config import MIN_TOKEN_CHARS
from exporter.errors import ConfigError
from exporter.settings import Settings

FILE_NAME = "admin-token"


def token_path(state_dir: Path) -> Path:
    """Where the daemon keeps the token it made, for settings whose state is `state_dir`."""
    return state_dir / FILE_NAME


def read_token(path: Path, *, owner: int | None = None) -> str:
    """The token in `path`, which must be a regular file readable by its owner only (and,
    given `owner`, owned by that user id); `ConfigError` saying what to do otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the admin token file {path}: {exc.strerror or exc}"
            + (" (run as the daemon's user)" if isinstance(exc, PermissionError) else "")
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the admin token file {path} is not a regular file")
        if owner is not None and info.st_uid != owner:
            raise ConfigError(
                f"the admin token file {path} belongs to uid {info.st_uid}, not to this "
                f"process's user (uid {owner}): delete it to have a new one made"
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"the admin token file {path} has mode {stat.S_IMODE(info.st_mode):04o}: "
                "others may have read the token. Delete the file to have a new token made "
                "at the next start (or, if no one else can have read it, chmod 600 it)"
            )
        token = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"the admin token file {path} does not hold a token ({MIN_TOKEN_CHARS} or more "
            "characters, no spaces): delete it to have a new one made"
        )
    return token


def ensure_token(path: Path) -> tuple[str, bool]:
    """The token in `path`, made first if there is none; and whether it was made now.

    The file appears whole or not at all: written under a temporary name (mode 0600 from the
    start, whatever the umask), then linked into place, which fails if another process got
    there first (then its token is the one)."""
    owner = os.geteuid()
    if not path.exists() and not path.is_symlink():
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_urlsafe(32).encode() + b"\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return read_token(path, owner=owner), False
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        return read_token(path, owner=owner), True
    return read_token(path, owner=owner), False


def client_token(settings: Settings) -> str:
    """The token a command that calls the admin API sends: `admin.token` if configured,
    otherwise the one the daemon made in its state folder."""
    if settings.admin.token is not None:
        return settings.admin.token.get_secret_value()
    path = token_path(settings.daemon.state_dir)
    if not path.exists():
        raise ConfigError(
            f"no admin token: admin.token_file is not set and {path} does not exist (the "
            "daemon makes it on its first start; is it running with this configuration?)"
        )
    return read_token(path)
