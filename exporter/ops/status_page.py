"""The admin server's status page: jobs, lanes, schedules and recent failures, as HTML.

    GET  /status           the page; filters as query parameters (links and Back work)
    GET  /status/login     a form that asks for the admin token
    POST /status/login     the token, checked: a session cookie, then back to the page
    POST /status/logout    the session forgotten

A browser cannot send `Authorization: Bearer` when it follows a link, so the page takes the
admin token once, in a form posted to this server, and answers with a session cookie: a
random id (not the token) known only to this process, `HttpOnly` (no script reads it),
`SameSite=Strict` (no other site's page or form sends it) and `Path=/status` (the jobs API
and /metrics still want the bearer token). A session lasts `SESSION_TTL_S` on the daemon's
clock and ends with the process. Posts whose `Origin` names another site are refused (login
CSRF), and the server's `Host` check still runs first (DNS rebinding). A bearer header works
too, for scripts and tests.

Everything shown is escaped by the template engine (Jinja2, autoescaping): job ids, file
names and AEP's messages come from outside. The page runs no script at all and says so in its
Content-Security-Policy; it reloads itself with a meta refresh every `REFRESH_S` seconds.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from exporter.daemon.admission import Admissions
from exporter.daemon.journal import JobRecord
from exporter.engine.lanes import LaneManager
from exporter.jobs import JobState
from exporter.sources.http import BadQuery, decode_cursor, encode_cursor, page_limit
from exporter.sources.schedules import iso, upcoming, utc

log = structlog.get_logger("exporter.admin")

PAGE = "/status"
LOGIN = "/status/login"
LOGOUT = "/status/logout"
COOKIE = "aep_exporter_session"
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 100  # the oldest is forgotten past this many
REFRESH_S = 10
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
FAILURES_SHOWN = 20
MAX_SEARCH = 200
PARAMS = frozenset({"state", "source", "destination", "q", "limit", "cursor"})
FAILED = (JobState.FAILED, JobState.TIMED_OUT)
CROSS_SITE = "refused: posted from another site"
HEADERS = {
    # No script runs, nothing is framed, forms post only here.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # (no-referrer makes Origin "null" on posts)
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class StatusPage:
    """The routes and the sessions; `check_token` tells whether a string is the admin token."""

    def __init__(
        self, admissions: Admissions, lanes: LaneManager, check_token: Callable[[str], bool]
    ) -> None:
        self.admissions = admissions
        self.lanes = lanes
        self.check_token = check_token
        self.refresh_s = REFRESH_S
        """Seconds between the page's reloads of itself."""
        self._sessions: OrderedDict[str, float] = OrderedDict()  # id -> expiry (monotonic)
        self._templates = Environment(
            loader=PackageLoader("exporter.ops", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(PAGE, self.page, allow_head=False)
        router.add_get(LOGIN, self.login_form, allow_head=False)
        router.add_post(LOGIN, self.login)
        router.add_post(LOGOUT, self.logout)

    @staticmethod
    def owns(path: str) -> bool:
        return path == PAGE or path.startswith(PAGE + "/")

    async def guard(
        self, request: web.Request, handler: Handler, *, bearer: bool
    ) -> web.StreamResponse:
        """The admin server's auth for /status paths: the login form is open; the rest want a
        session (or the bearer token), else the browser is sent to the form."""
        if request.path == LOGIN or bearer or self._session(request) is not None:
            return await handler(request)
        if request.method != "GET":
            return self._html("login.html", 403, error="log in first", next=PAGE)
        raise web.HTTPSeeOther(f"{LOGIN}?{urlencode({'next': request.path_qs})}")

    # -- sessions --------------------------------------------------------------------------

    def _now(self) -> float:
        return self.admissions.clock.monotonic()

    def _session(self, request: web.Request) -> str | None:
        given = request.cookies.get(COOKIE, "")
        expiry = self._sessions.get(given) if given else None
        if expiry is None:
            return None
        if expiry <= self._now():
            del self._sessions[given]
            return None
        return given

    def _new_session(self) -> str:
        now = self._now()
        for sid, expiry in list(self._sessions.items()):
            if expiry <= now:
                del self._sessions[sid]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + SESSION_TTL_S
        return sid

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """A post made by a page of this server: its `Origin`, when sent, names this host."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not sent by older browsers on same-origin posts; SameSite guards
        parts = urlsplit(origin)
        return hmac.compare_digest(parts.netloc.lower(), request.host.lower())

    @staticmethod
    def _next(target: str | None) -> str:
        """Where to go after logging in: a /status address of this server, nothing else."""
        if (
            target
            and target.startswith(PAGE)
            and StatusPage.owns(urlsplit(target).path)
            and "\\" not in target
            and ".." not in target
        ):
            return target
        return PAGE

    async def login_form(self, request: web.Request) -> web.Response:
        return self._html("login.html", 200, error="", next=self._next(request.query.get("next")))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        target = self._next(str(form.get("next") or ""))
        if not self._same_origin(request):
            log.warning("status_login_refused", why="cross-site post")
            return self._html("login.html", 403, error=CROSS_SITE, next=PAGE)
        token = form.get("token")
        if not isinstance(token, str) or not self.check_token(token.strip()):
            log.warning("status_login_refused", why="wrong token" if token else "no token")
            return self._html("login.html", 401, error="wrong admin token", next=target)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            COOKIE,
            self._new_session(),
            max_age=int(SESSION_TTL_S),
            path=PAGE,
            httponly=True,
            samesite="Strict",
        )
        log.info("status_login")
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return self._html("login.html", 403, error=CROSS_SITE, next=PAGE)
        sid = self._session(request)
        if sid is not None:
            del self._sessions[sid]
        response = web.HTTPSeeOther(LOGIN)
        response.del_cookie(COOKIE, path=PAGE)
        raise response

    # -- the page --------------------------------------------------------------------------

    def _filters(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        unknown = sorted(set(query) - PARAMS)
        if unknown:
            raise BadQuery(
                f"unknown filter {unknown[0]!r}; filters are {', '.join(sorted(PARAMS))}"
            )
        state = query.get("state", "")
        if state and state not in {s.value for s in JobState}:
            raise BadQuery(
                f"state: {state!r} is not a job state; states are "
                + ", ".join(s.value for s in JobState)
            )
        destination = query.get("destination", "")
        search = query.get("q", "").strip()
        if len(search) > MAX_SEARCH:
            raise BadQuery(f"search: at most {MAX_SEARCH} characters")
        limit = page_limit(query.get("limit"), default=DEFAULT_LIMIT, most=MAX_LIMIT)
        cursor = query.get("cursor")
        return {
            "state": state,
            "source": query.get("source", ""),
            "destination": destination,
            "q": search,
            "limit": limit,
            "before": decode_cursor(cursor) if cursor else None,
        }

    async def page(self, request: web.Request) -> web.Response:
        try:
            wanted = self._filters(request)
        except BadQuery as exc:
            return await self._render(request, 400, error=str(exc), wanted=None)
        return await self._render(request, 200, error="", wanted=wanted)

    async def _render(
        self, request: web.Request, status: int, *, error: str, wanted: dict[str, Any] | None
    ) -> web.Response:
        admissions = self.admissions
        journal = admissions.journal
        settings = admissions.settings
        jobs: list[dict[str, Any]] = []
        next_link = None
        filters = {"state": "", "source": "", "destination": "", "q": "", "limit": DEFAULT_LIMIT}
        if wanted is not None:
            filters = {k: wanted[k] for k in filters}
            limit = wanted["limit"]
            records = await journal.search(
                states=[JobState(wanted["state"])] if wanted["state"] else (),
                source=wanted["source"] or None,
                destination=wanted["destination"] or None,
                text=wanted["q"],
                before=wanted["before"],
                limit=limit + 1,
            )
            if len(records) > limit:
                records = records[:limit]
                kept = {k: v for k, v in filters.items() if v and k != "limit"}
                kept["limit"] = limit
                kept["cursor"] = encode_cursor(records[-1])
                next_link = f"{PAGE}?{urlencode(kept)}"
            jobs = [
                self._job(r)
                | {
                    "created": _when(r.created),
                    "run_id": r.run_id or "",
                }
                for r in records
            ]
        failures = [self._job(r) for r in await journal.recent(FAILED, limit=FAILURES_SHOWN)]
        now = admissions.clock.time()
        last = await journal.schedule_slots()
        schedules = []
        for config in settings.schedules:
            done = last.get(config.name)
            previous = utc(done) if done is not None else None
            slots = upcoming(config, previous, now, 3) if config.enabled else []
            schedules.append(
                {
                    "name": config.name,
                    "trigger": config.describe(),
                    "enabled": config.enabled,
                    "last": iso(previous) if previous else "",
                    "next": [iso(s) for s in slots],
                    "destination": config.job.destination,
                    "dataset": config.job.dataset_id,
                }
            )
        sources = sorted({"spool", "http", "schedule", *(["redis"] if settings.redis else [])})
        body = self._templates.get_template("status.html").render(
            error=error,
            filters=filters,
            states=[s.value for s in JobState],
            sources=sources,
            destinations=sorted(settings.destinations),
            jobs=jobs,
            next_link=next_link,
            failures=failures,
            lanes=self.lanes.loaded_lanes(),
            schedules=schedules,
            in_flight=len(admissions.running),
            max_in_flight=settings.daemon.max_in_flight,
            ready=admissions.ready.is_set(),
            stopping=admissions.stopping,
            now=_when(now),
            refresh_s=self.refresh_s,
            page=PAGE,
            logout=LOGOUT,
        )
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS
        )

    @staticmethod
    def _job(record: JobRecord) -> dict[str, Any]:
        outcome, spec = record.outcome, record.spec
        done = outcome or {}
        return {
            "job_id": record.job_id,
            "source": record.source,
            "state": record.state.value,
            "updated": _when(record.updated),
            "destination": str(spec.get("destination", "")),
            "dataset": str(spec.get("dataset_id", "")),
            "files": done.get("files", 0) if outcome else "",
            "records": done.get("records", 0) if outcome else "",
            "bytes": _size(int(done.get("bytes", 0))) if outcome else "",
            "message": str(done.get("message", "")),
            "errors": [
                f"{e.get('code', '')}: {e.get('message', '')}" for e in done.get("errors") or ()
            ],
        }

    def _html(self, template: str, status: int, **context: Any) -> web.Response:
        body = self._templates.get_template(template).render(page=PAGE, login=LOGIN, **context)
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS
        )
