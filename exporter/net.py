"""What counts as this machine: where plain HTTP, an unauthenticated admin server, a Redis
password in the clear or an unchecked SSH host key may be allowed (test servers only)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str | None) -> bool:
    """Whether `host` reaches this machine only: a loopback name, 127.0.0.0/8 or ::1 (with or
    without brackets). A host name, "" (every interface) or None is assumed reachable."""
    if not host:
        return False
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
