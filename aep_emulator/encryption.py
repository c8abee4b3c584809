"""PGP/GPG file encryption of exported files, as a base connection's `encryption` asks.

AEP's cloud storage connection specs carry one encryption spec, "File PGP/GPG Encryption"
(type `FileAsymmetric`): `encryptionAlgo` (`PGPGPG` or `NONE`) and `publicKey`, a base64-encoded
public key (Adobe's "Export datasets" and "Activate audiences to file-based destinations" API
pages, section "Add encryption to exported files"; docs/aep-notes.md#destination-options).

Encryption runs the `gpg` binary (GnuPG 2.2 or newer, Debian's `gnupg`) with
`--recipient-file`, so the key never enters a keyring and each call has a throwaway home folder.
Why not a Python library: PGPy, the pure-Python choice, has had no release since 2022 and warns
under current `cryptography` releases; python-gnupg only wraps the same binary and needs a
keyring to import into. Every call has a deadline.
"""

from __future__ import annotations

import base64
import binascii
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GPG_DEADLINE_S = 120.0
ENCRYPTION_SPEC_NAME = "File PGP/GPG Encryption"
ALGORITHMS = ("PGPGPG", "NONE")
# Encrypted files keep their name and take GnuPG's own suffix (Adobe names none: our choice).
SUFFIX = ".gpg"


class EncryptionError(Exception):
    """The key is not a usable OpenPGP public key, or gpg failed."""


def encryption_spec() -> dict[str, Any]:
    """The encryption spec of AEP's cloud storage connection specs (JSON Schema inside)."""
    return {
        "name": ENCRYPTION_SPEC_NAME,
        "type": "FileAsymmetric",
        "spec": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "description": "Defines parameters required for capturing user's inputs for encryption",
            "type": "object",
            "properties": {
                "publicKey": {
                    "description": "Base64 encoded RSA public key",
                    "type": "string",
                    "contentEncoding": "base64",
                    "minLength": 1,
                },
                "encryptionAlgo": {
                    "description": "Algorithm for encryption.",
                    "type": "string",
                    "default": "PGPGPG",
                    "enum": list(ALGORITHMS),
                },
            },
            "required": ["encryptionAlgo", "publicKey"],
        },
    }


def gpg_binary() -> str:
    found = shutil.which("gpg")
    if found is None:
        raise EncryptionError("gpg (GnuPG) is not installed: encrypted exports need it")
    return found


def decode_public_key(text: str) -> bytes:
    """The key bytes from AEP's base64 `publicKey` (an armored or binary OpenPGP key).
    Raises EncryptionError if it is not base64 or holds no OpenPGP public key."""
    try:
        key = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionError("publicKey is not base64") from None
    if b"PRIVATE KEY BLOCK" in key:
        raise EncryptionError("publicKey holds a private key: give the public key only")
    with tempfile.TemporaryDirectory(prefix="aep-gpg-") as home:
        key_file = Path(home) / "key"
        key_file.write_bytes(key)
        try:
            listed = _gpg(home, "--with-colons", "--show-keys", str(key_file))
        except EncryptionError:
            raise EncryptionError("publicKey holds no OpenPGP public key") from None
    if not any(line.startswith("pub:") for line in listed.splitlines()):
        raise EncryptionError("publicKey holds no OpenPGP public key")
    return key


def encrypt_files(files: Sequence[Path], public_key: bytes) -> tuple[Path, ...]:
    """Replace each file with `<name>.gpg`, encrypted to `public_key`; return the new paths.
    On failure, the encrypted files made so far are removed and the originals stay."""
    done: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="aep-gpg-") as home:
        key_file = Path(home) / "recipient"
        key_file.write_bytes(public_key)
        try:
            for path in files:
                target = path.with_name(path.name + SUFFIX)
                _gpg(
                    home,
                    "--trust-model",
                    "always",
                    "--recipient-file",
                    str(key_file),
                    "--output",
                    str(target),
                    "--encrypt",
                    str(path),
                )
                done.append(target)
        except BaseException:
            for target in done:
                target.unlink(missing_ok=True)
            raise
    for path in files:
        path.unlink(missing_ok=True)
    return tuple(done)


def _gpg(home: str, *args: str) -> str:
    command = [gpg_binary(), "--batch", "--no-tty", "--yes", "--homedir", home, *args]
    try:
        done = subprocess.run(  # noqa: S603 - fixed binary, arguments we built
            command, capture_output=True, timeout=GPG_DEADLINE_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise EncryptionError(f"gpg did not finish within {GPG_DEADLINE_S:g} s") from None
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise EncryptionError(f"gpg failed: {reason[-1] if reason else done.returncode}")
    return done.stdout.decode(errors="replace")
