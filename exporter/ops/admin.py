"""The admin server: liveness, readiness, metrics and the jobs API, over HTTP (aiohttp).

    GET  /healthz          200 while alive; 503 if the event loop stalled or a task died
    GET  /readyz           200 once recovered, with an AEP token and a writable journal
    GET  /metrics          Prometheus text exposition of the daemon's metrics registry
    GET  /v1/openapi.json  the OpenAPI document of all of this (`admin_openapi.json`)
    /v1/jobs...            submit, list, get and cancel jobs (`exporter.sources.http`)
    /v1/lanes...           list the export lanes and prune idle ones (`admin_lanes`)
    /status...             the status page for a browser, behind a login (`status_page`)

It listens on 127.0.0.1 by default. Every route but /healthz and /readyz asks for
`Authorization: Bearer <token>`, on loopback too (any local process could call it): the
configured `admin.token_file`, or else the token the daemon keeps in its state folder
(`admin_token`). Probes rarely can send one and those two say nothing private; /metrics and
/v1 do. Every request must name this server in its `Host` header (a loopback name or the
address it was reached at, with the port, or one of `admin.allowed_hosts`), or it is refused
421 before anything else: a web page whose host name an attacker points at 127.0.0.1 (DNS
rebinding) sends its own name, so it reaches nothing, not even the probes. Every error is a
JSON body `{"error", "message"}`.

Connections are capped (`admin.max_connections`, `admin_site`), closed after
`admin.idle_timeout_s` without a request under way (also when the headers have not all
come), and a request body must arrive within `admin.read_timeout_s` (else 408).

The event-loop monitor is a task that asks to wake every fraction of `loop_stall_s` and
notes how late it is: a stall is remembered for `loop_stall_window_s`, so a probe that comes
after a stall still sees it. It measures the real event loop, so it reads real time, not the
daemon's `Clock`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from exporter.aep.api import AepApi
from exporter.daemon.admission import Admissions
from exporter.daemon.config import AdminConfig
from exporter.daemon.journal import JobRecord
from exporter.engine.lanes import LaneManager
from exporter.errors import ConfigError
from exporter.ops.admin_lanes import LanesApi
from exporter.ops.admin_site import CappedSite
from exporter.ops.admin_token import ensure_token, token_path
from exporter.ops.status_page import StatusPage
from exporter.redaction import SECRETS
from exporter.sources.http import JobsApi, error_response

log = structlog.get_logger("exporter.admin")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
OPENAPI_FILE = "admin_openapi.json"
REALM = 'Bearer realm="aep-exporter"'
SHUTDOWN_TIMEOUT_S = 1.0  # requests still open at close get this long
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names to recognise, not to bind

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoopMonitor:
    """How late the event loop wakes a task that sleeps `interval` seconds at a time."""

    def __init__(
        self,
        *,
        threshold: float,
        window: float,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.observe = observe
        self.window = window
        self.interval = min(1.0, threshold / 4)
        self._due: float | None = None  # when the monitor should wake next; None: not running
        self._stalls: deque[tuple[float, float]] = deque()  # (noted at, lag) over threshold

    async def run(self) -> None:
        try:
            while True:
                self._due = time.monotonic() + self.interval
                await asyncio.sleep(self.interval)
                now = time.monotonic()
                lag = now - self._due
                if self.observe is not None:
                    self.observe(lag)
                while self._stalls and self._stalls[0][0] < now - self.window:
                    self._stalls.popleft()
                if lag > self.threshold:
                    self._stalls.append((now, lag))
                    log.warning("event_loop_stalled", lag_s=round(lag, 3))
        finally:
            self._due = None

    def worst(self) -> float:
        """The longest stall within the window, counting one that is still going on (the
        monitor overdue right now: a request served just after a block sees it)."""
        now = time.monotonic()
        while self._stalls and self._stalls[0][0] < now - self.window:
            self._stalls.popleft()
        current = now - self._due if self._due is not None else 0.0
        return max([current, 0.0, *(lag for _, lag in self._stalls)])


class AdminServer:
    """The admin server as a daemon `Service`: bound at `start()`, served until `close()`."""

    name = "admin"
    sources: Iterable[str] = ()  # http jobs need nothing from it to resume: they are `Quiet`

    def __init__(
        self,
        admissions: Admissions,
        config: AdminConfig,
        *,
        dead: Sequence[str],
        api: AepApi,
        lanes: LaneManager,
    ) -> None:
        """`dead`: the supervised tasks that died (`Health.dead`), for /healthz; `api` for
        the AEP token check of /readyz; `lanes` for the jobs and lanes APIs."""
        self.admissions = admissions
        self.config = config
        self.dead = dead
        self.api = api
        self.port: int | None = None
        """The bound port, once started (the configured one, or the one picked for 0)."""
        self.monitor = LoopMonitor(
            threshold=config.loop_stall_s,
            window=config.loop_stall_window_s,
            observe=admissions.metrics.loop_lag,
        )
        self.openapi = resources.files("exporter.ops").joinpath(OPENAPI_FILE).read_bytes()
        self._token = config.token.get_secret_value().encode() if config.token is not None else b""
        self.token_file: Path | None = None
        """The token file the daemon made or reused, when no token is configured."""
        self.lanes = LanesApi(admissions, lanes)
        self._jobs = JobsApi(admissions, lanes=lanes, api=api)
        self.status_page = StatusPage(admissions, lanes, self._is_token)
        self._runner: web.AppRunner | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self._hosts: frozenset[str] = frozenset()

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._host, self._auth, self._read_body],
            client_max_size=self.config.max_body_bytes,
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/openapi.json", self._openapi)
        self._jobs.add_routes(app.router)
        self.lanes.add_routes(app.router)
        self.status_page.add_routes(app.router)
        return app

    # -- Service ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._token:
            await self._own_token()
        self._monitor = asyncio.create_task(self.monitor.run(), name="admin-loop-monitor")
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=self.config.idle_timeout_s,
        )
        await runner.setup()
        try:
            site = CappedSite(
                runner, self.config.host, self.config.port, limit=self.config.max_connections
            )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._monitor.cancel()
            log.error(
                "admin_bind_failed", host=self.config.host, port=self.config.port, error=str(exc)
            )
            raise OSError(
                exc.errno,
                f"the admin server cannot listen on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc} (change admin.host / admin.port, or set "
                "admin.enabled = false)",
            ) from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else self.config.port
        self._hosts = self._known_hosts()
        log.info(
            "admin_listening",
            host=self.config.host,
            port=self.port,
            auth="bearer",
            bearer_file=str(self.token_file) if self.token_file else "admin.token_file",
            max_connections=self.config.max_connections,
        )

    async def _own_token(self) -> None:
        """Make or reuse the token in the state folder (never logged: only its path)."""
        path = token_path(self.admissions.settings.daemon.state_dir)
        try:
            token, made = await asyncio.to_thread(ensure_token, path)
        except ConfigError as exc:
            log.error("admin_token_refused", path=str(path), error=str(exc))
            raise
        except OSError as exc:
            log.error("admin_token_refused", path=str(path), error=str(exc))
            raise ConfigError(f"cannot make the admin token file {path}: {exc}") from exc
        SECRETS.add(token)  # scrubbed from every output, like the configured secrets
        if made:
            log.info("admin_token_created", path=str(path))
        self._token, self.token_file = token.encode(), path

    def _known_hosts(self) -> frozenset[str]:
        """`Host` values that name this server whatever connection they come on."""
        port = self.port
        names = {*LOOPBACK_NAMES}
        if self.config.host not in WILDCARDS:
            host = self.config.host.lower()
            names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
        hosts = {f"{name}:{port}" for name in names}
        if port == 80:  # a client leaves out the default port
            hosts |= names
        return frozenset(hosts | {h.lower() for h in self.config.allowed_hosts})

    @property
    def _any_port(self) -> frozenset[str]:
        """`admin.allowed_hosts` entries without a port: accepted with any port."""
        return frozenset(
            h.lower() for h in self.config.allowed_hosts if not (h.count(":") == 1 or "]:" in h)
        )

    async def recover(self, records: list[JobRecord]) -> None:
        return None

    async def run(self) -> None:
        """Supervised: the loop monitor (the site serves by itself once started)."""
        assert self._monitor is not None, "start() first"
        await self._monitor

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        await self.lanes.aclose()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("admin_closed")

    # -- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors (404, 405, 413, ...) as JSON; a bug as a JSON 500, logged."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {
                k: v
                for k, v in exc.headers.items()
                if k.lower() not in ("content-type", "content-length")
            }
            code = exc.reason.lower().replace(" ", "_").replace("-", "_")
            message = exc.text or exc.reason
            if isinstance(exc, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(exc.allowed_methods))
                message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
            elif isinstance(exc, web.HTTPNotFound):
                message = f"no such resource: {request.path}"
            return error_response(
                exc.status, code, message.removeprefix(f"{exc.status}: "), headers=headers
            )
        except Exception as exc:
            log.exception("admin_request_failed", method=request.method, path=request.path)
            return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    @web.middleware
    async def _host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a request that names another server (see the module's docstring)."""
        given = request.headers.get("Host", "").strip().lower()
        name = given.rsplit(":", 1)[0] if given.count(":") == 1 or "]:" in given else given
        if given in self._hosts or name in self._any_port or given == self._local_host(request):
            return await handler(request)
        shown = given[:100] or "(none)"
        log.warning("admin_host_refused", method=request.method, path=request.path, host=shown)
        return error_response(
            421,
            "misdirected_request",
            f"Host {shown!r} does not name this server: ask http://127.0.0.1:{self.port} "
            "(or list the name in admin.allowed_hosts)",
            headers={"Connection": "close"},
        )

    def _local_host(self, request: web.Request) -> str | None:
        """The address the request came to, as a `Host` value (bound to every interface,
        this is the interface it came on)."""
        local = request.transport.get_extra_info("sockname") if request.transport else None
        if not isinstance(local, tuple) or len(local) < 2:
            return None
        address = ipaddress.ip_address(str(local[0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket: the client used IPv4
        shown = f"[{address}]" if address.version == 6 else str(address)
        return f"{shown}:{local[1]}"

    @web.middleware
    async def _read_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Read the body within `read_timeout_s` (a slow sender holds no handler longer)."""
        if request.body_exists:
            limit = self.config.read_timeout_s
            try:
                async with asyncio.timeout(limit):
                    await request.read()  # kept by aiohttp: the handler's read() returns it
            except TimeoutError:
                log.warning("admin_body_timeout", method=request.method, path=request.path)
                return error_response(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {limit:g} s (admin.read_timeout_s)",
                    headers={"Connection": "close"},
                )
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        bearer = scheme.lower() == "bearer" and self._is_token(given.strip())
        if StatusPage.owns(request.path):  # a browser's: a session cookie, or the login form
            return await self.status_page.guard(request, handler, bearer=bearer)
        if bearer:
            return await handler(request)
        problem = "wrong" if given else "missing"
        log.warning("admin_unauthorized", method=request.method, path=request.path, given=problem)
        challenge = REALM if problem == "missing" else f'{REALM}, error="invalid_token"'
        return error_response(
            401,
            "unauthorized",
            f"{problem} bearer token: send Authorization: Bearer <the admin token>",
            headers={"WWW-Authenticate": challenge},
        )

    def _is_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "backslashreplace"), self._token)

    # -- probes ----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        reasons = []
        lag = self.monitor.worst()
        if lag > self.config.loop_stall_s:
            reasons.append(
                f"the event loop was blocked for {lag:.2f} s within the last "
                f"{self.config.loop_stall_window_s:g} s (limit {self.config.loop_stall_s:g} s)"
            )
        if self.dead:
            reasons.append(f"supervised task died: {', '.join(self.dead)}")
        if reasons:
            return web.json_response({"status": "unhealthy", "reasons": reasons}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        admissions = self.admissions
        recovered = (
            "stopping"
            if admissions.stopping
            else "ok"
            if admissions.ready.is_set()
            else "recovering unfinished jobs"
        )
        token, writable = await asyncio.gather(
            self._check(self.api.check_token()),
            self._check(admissions.journal.check_writable()),
        )
        checks = {"recovered": recovered, "aep_token": token, "journal": writable}
        ready = all(v == "ok" for v in checks.values())
        if ready != self._ready:
            self._ready = ready
            (log.info if ready else log.warning)("admin_readiness", ready=ready, checks=checks)
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        return web.json_response(body, status=200 if ready else 503)

    async def _check(self, probe: Awaitable[object] | None) -> str:
        """ "ok", or why not, within the deadline."""
        if probe is None:
            return "not open"
        limit = self.config.check_timeout_s
        try:
            async with asyncio.timeout(limit):
                await probe
        except TimeoutError:
            return f"no answer within {limit:g} s"
        except Exception as exc:
            # /readyz answers without the token even when bound beyond loopback: the kind of
            # failure is the answer, the details (which may name the client id) go to the log.
            log.warning("admin_readiness_check_failed", error=f"{type(exc).__name__}: {exc}")
            return f"failed ({type(exc).__name__}; see the daemon's log)"
        return "ok"

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.admissions.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")


def document() -> dict[str, Any]:
    """The OpenAPI document the server serves, parsed."""
    loaded: dict[str, Any] = json.loads(
        resources.files("exporter.ops").joinpath(OPENAPI_FILE).read_text()
    )
    return loaded
