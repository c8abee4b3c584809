"""`aep-exporter probe`: ask the running daemon's admin server whether it is alive (or ready).

For container health checks and scripts: it finds the admin server from the same
configuration the daemon reads (or `--url`), asks `/healthz` (or `/readyz`, or any `--path`)
and exits 0 when the answer is 200, 1 otherwise, printing the answer. It needs no AEP access,
and it gives up after `--timeout` seconds. The two probes are open; for any other path it
sends the admin token: `admin.token_file`, or the one the daemon made in its state folder
(`admin_token`), found through the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from exporter.errors import ConfigError
from exporter.ops.admin_token import client_token
from exporter.settings import Settings, add_config_argument, load_settings

EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - a lookup


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (not 200), never followed: the token must not travel on."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(_NoRedirect)


def add_parser(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="ask the running daemon's admin server /healthz (or /readyz); exit 0 if healthy",
        description="Exit 0 when the daemon's admin server answers 200, 1 when it answers "
        "anything else or nothing, 2 on a configuration problem.",
    )
    add_config_argument(probe)
    probe.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    probe.add_argument(
        "--path",
        help="ask this path instead, with the admin token (e.g. /metrics or /v1/jobs?limit=1)",
    )
    probe.add_argument("--url", help="the admin server's base URL (default: from the config)")
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    probe.set_defaults(func=cmd_probe)


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY"))


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    admin = settings_of(args).admin
    if not admin.enabled:
        raise ConfigError("the admin server is disabled (admin.enabled = false): nothing to ask")
    host = WILDCARDS.get(admin.host, admin.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{admin.port}"


def path_of(args: argparse.Namespace) -> str:
    path = str(args.path or ("/readyz" if args.ready else "/healthz"))
    if not path.startswith("/"):
        raise ConfigError(f"--path {path}: a path starts with /")
    return path


def cmd_probe(args: argparse.Namespace) -> int:
    headers = {}
    try:
        path = path_of(args)
        url = base_url(args) + path
        if path.partition("?")[0] not in ("/healthz", "/readyz"):
            headers["Authorization"] = f"Bearer {client_token(settings_of(args))}"
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not url.startswith(("http://", "https://")):
        print(f"error: {url}: not an http(s) URL", file=sys.stderr)
        return EXIT_CONFIG
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - checked
        with OPENER.open(request, timeout=args.timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"unhealthy: {url}: no answer ({reason})")
        return EXIT_UNHEALTHY
    try:
        shown = json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        shown = " ".join(body.decode(errors="replace")[:500].split())
    print(f"{'ok' if status == 200 else 'unhealthy'}: {url}: {status} {shown}")
    return 0 if status == 200 else EXIT_UNHEALTHY
