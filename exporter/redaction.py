"""The configured secret values, and scrubbing them out of text wherever they would be kept.

AEP's validation errors echo the rejected value (docs/aep-notes.md, "Errors that echo
values"), so an error answer may hold a secret we sent. Every secret field of the settings is
declared as `Secret`, which adds its value to `SECRETS` when it is validated: loading or
reloading the settings fills the registry, and nothing has to thread the values around.
Values are only ever added (a secret replaced by a reload may still be on its way back in an
answer), never removed.

What is scrubbed for each value: the value itself, its JSON-escaped forms (a PEM key's
newlines as `\\n`, once or twice escaped), its URL-encoded forms, its base64 forms (standard
and URL-safe, with and without padding), the text a base64 value decodes to (an SFTP key is
configured base64-encoded), and the key parts of an Azure connection string.

Values shorter than `MIN_SCRUB_CHARS` are not scrubbed by value: replacing every occurrence
of a short password ("redis", "admin1") would blank ordinary words in every message and make
errors unreadable, while a value that short is guessed sooner than leaked. They are still
covered by the log pipeline's redaction of secret-sounding keys; the admin token is held to
16 characters, and cloud keys are far longer than 8.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from typing import Annotated
from urllib.parse import quote, quote_plus

from pydantic import AfterValidator, SecretStr

REDACTED = "[redacted]"
MIN_SCRUB_CHARS = 8
# Parts of an Azure Storage connection string (and of a SAS) that are secret on their own.
_AZURE_KEYS = (
    re.compile(r"(?:^|;)(?:AccountKey|SharedAccessKey|SharedAccessSignature)=([^;]+)"),
    re.compile(r"(?:^|[;&?])sig=([^;&]+)"),
)


def forms(value: str) -> set[str]:
    """`value` as it may appear in text: raw, escaped, URL-encoded, base64-encoded."""
    found: set[str] = set()
    for text in _parts(value):
        escaped = json.dumps(text)[1:-1]
        found |= {
            text,
            escaped,
            json.dumps(text, ensure_ascii=False)[1:-1],
            json.dumps(escaped)[1:-1],
            repr(text)[1:-1],
            quote(text),
            quote(text, safe=""),
            quote_plus(text),
        }
        raw = text.encode()
        for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
            found |= {encoded.decode(), encoded.decode().rstrip("=")}
    return {f for f in found if len(f) >= MIN_SCRUB_CHARS}


def _parts(value: str) -> list[str]:
    parts = [value]
    try:
        decoded = base64.b64decode("".join(value.split()), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if len(decoded) >= MIN_SCRUB_CHARS:
        parts.append(decoded)
        # A PEM body line by line (its -----BEGIN/END----- lines are no secret).
        parts += [line for line in decoded.splitlines() if not line.startswith("-----")]
    parts += [m.group(1) for pattern in _AZURE_KEYS for m in pattern.finditer(value)]
    return [p for p in parts if len(p) >= MIN_SCRUB_CHARS]


class SecretRegistry:
    """The secret values this process knows, and one regular expression that finds them."""

    def __init__(self) -> None:
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()  # settings are loaded in a worker thread on reload

    def add(self, value: str) -> bool:
        """Remember `value`; False if it is too short to be scrubbed (see the module doc)."""
        if len(value) < MIN_SCRUB_CHARS:
            return False
        new = forms(value) - self._forms
        if new:
            with self._lock:
                self._forms |= new
                # Longest first: a value's form must not be cut by a shorter one inside it.
                ordered = sorted(self._forms, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(f) for f in ordered))
        return True

    def scrub(self, text: str) -> str:
        """`text` with every known secret, in every form, replaced by `[redacted]`."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(REDACTED, text)


SECRETS = SecretRegistry()
"""The process's registry, filled by every `Secret` field the settings validate."""


def _register(value: SecretStr) -> SecretStr:
    SECRETS.add(value.get_secret_value())
    return value


Secret = Annotated[SecretStr, AfterValidator(_register)]
"""A secret setting: a `SecretStr` whose value is scrubbed from errors, outcomes and logs."""


Scrubbed = Annotated[str, AfterValidator(SECRETS.scrub)]
"""Text that is kept or sent on (a job's outcome message): scrubbed of every known secret."""
