"""A GnuPG key pair for the tests that encrypt exports (the gpg binary, GnuPG 2.2+)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

GPG_DEADLINE_S = 60
GPG = shutil.which("gpg") or "/usr/bin/gpg"
GPGCONF = shutil.which("gpgconf") or "/usr/bin/gpgconf"


class Keypair:
    """A GnuPG home holding one key pair (no passphrase). `armored` is the public key as
    `gpg --armor --export` writes it; `public_b64` is that, base64-encoded, as AEP's
    `publicKey` parameter takes it."""

    def __init__(self, home: Path, email: str = "exports@example.com") -> None:
        self.home = home
        self.gpg("--passphrase", "", "--quick-gen-key", email, "future-default")
        self.armored = self.gpg("--armor", "--export", email)
        self.binary = self.gpg("--export", email)
        self.armored_private = self.gpg(
            "--passphrase", "", "--armor", "--export-secret-keys", email
        )
        self.public_b64 = base64.b64encode(self.armored).decode()

    def gpg(self, *args: str, data: bytes | None = None) -> bytes:
        command = [GPG, "--batch", "--no-tty", "--pinentry-mode", "loopback"]
        done = subprocess.run(  # noqa: S603 - fixed binary, our arguments
            [*command, "--homedir", str(self.home), *args],
            input=data,
            capture_output=True,
            timeout=GPG_DEADLINE_S,
            check=True,
        )
        return done.stdout

    def decrypt(self, blob: bytes) -> bytes:
        return self.gpg("--passphrase", "", "--decrypt", data=blob)

    def close(self) -> None:
        """Stop the agent this home started."""
        subprocess.run(  # noqa: S603 - fixed binary, our arguments
            [GPGCONF, "--homedir", str(self.home), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=GPG_DEADLINE_S,
            check=False,
        )


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keypair]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    pair = Keypair(home)
    yield pair
    pair.close()
