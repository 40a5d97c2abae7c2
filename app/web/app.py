"""The Starlette application: routes, the token, security headers, rendering.

Read-only: every route answers GET and HEAD only, except POST /login, which
changes nothing but the caller's own cookie. Pages are rendered on the
server with Jinja2 (autoescaping on); there is no script at all, so the
Content-Security-Policy allows none.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import pathlib
import re
import urllib.parse
import zoneinfo
from decimal import Decimal
from typing import Any, Callable

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from ..cli.output import safe_text
from ..login import PROTOCOLS, normalize_user, parse_ip
from . import auth, views
from .chart import daily_chart

log = logging.getLogger("lastlogin.web")

HERE = pathlib.Path(__file__).parent
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
MAX_FORM_BYTES = 4096


# --- rendering ---------------------------------------------------------------------

def user_url(name: str, api: bool = False) -> str:
    """The link to a user's page: any name, every byte quoted, so it comes back exact."""
    return ("/api/user" if api else "/user") + "?name=" + urllib.parse.quote(name, safe="")


def _environment(tz: dt.tzinfo) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)

    def when(value: dt.datetime | None) -> str:
        return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if value else ""

    env.filters.update(when=when, shown=lambda v: "" if v is None else safe_text(str(v)),
                       user_url=user_url, q=lambda v: urllib.parse.quote(str(v), safe=""),
                       num=lambda n: f"{n:,}" if isinstance(n, int) else n)
    env.globals.update(daily_chart=daily_chart, protocols=PROTOCOLS,
                       tz_name=lambda: dt.datetime.now(tz).tzname())
    return env


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    raise TypeError(f"not JSON: {type(value).__name__}")


def json_response(data: Any, status: int = 200) -> Response:
    # ensure_ascii: every byte beyond ASCII and every control character is a \u escape
    body = json.dumps(data, default=_json_default, ensure_ascii=True, indent=1)
    return Response(body + "\n", status, media_type="application/json")


def local_zone() -> dt.tzinfo:
    """The system's zone with its rules (summer time included), not the
    offset it has today: TZ when it names a zone, else /etc/localtime; a
    fixed offset only when neither can be read as a zone."""
    name = os.environ.get("TZ", "").lstrip(":")
    candidates = [name] if name else []
    if not name:
        try:
            link = os.path.realpath("/etc/localtime")
            candidates.append(link.split("/zoneinfo/", 1)[1] if "/zoneinfo/" in link else "")
        except OSError:
            pass
    for key in candidates:
        try:
            return zoneinfo.ZoneInfo(key)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            continue
    if not name:
        try:
            with open("/etc/localtime", "rb") as f:
                return zoneinfo.ZoneInfo.from_file(f, key="localtime")
        except (OSError, ValueError):
            pass
    return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc


# --- the token and the headers -----------------------------------------------------

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::[0-9]{1,5})?")


def host_ok(header: str | None, names: frozenset[str] = LOOPBACK_HOSTS) -> bool:
    """A Host header naming one of ``names`` (any port): without a token the
    dashboard answers only to loopback names, so a page of another site whose
    name an attacker points at 127.0.0.1 (DNS rebinding) cannot read it."""
    match = _HOST.fullmatch(header or "")
    return match is not None and match.group(1).lower() in names


def loopback_names(listen: str) -> frozenset[str]:
    """LOOPBACK_HOSTS and web_listen's own address (e.g. 127.0.0.2)."""
    host = listen.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK_HOSTS
    return LOOPBACK_HOSTS | {f"[{address}]" if address.version == 6 else str(address)}


class Guard:
    """ASGI middleware: security headers on every answer; the token checked
    before any page or API (Bearer header or session cookie); without a
    token, the Host header checked instead (only loopback names, else 421)."""

    def __init__(self, app: ASGIApp, token: str,
                 hosts: frozenset[str] = LOOPBACK_HOSTS) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        try:
            hosts = Request(scope).headers.getlist("host")
            if not self.token and not (len(hosts) == 1 and host_ok(hosts[0], self.hosts)):
                await misdirected(scope, receive, with_headers)
                return
            if self.token and not self.allowed(Request(scope)):
                await self.refuse(Request(scope))(scope, receive, with_headers)
                return
            await self.app(scope, receive, with_headers)
        except Exception as exc:  # noqa: BLE001 -- one line, a plain 500 with the headers
            log.error("event=web_request_failed method=%s path=%s error=%s",
                      scope.get("method"), scope.get("path"),
                      f"{type(exc).__name__}: {exc}")
            if not started:         # else Starlette answered 500 already (with the headers)
                await server_error(scope, receive, with_headers)

    def allowed(self, request: Request) -> bool:
        path = request.url.path
        if path == "/login" or path.startswith("/static/"):
            return True
        return (auth.bearer_ok(request.headers.get("authorization"), self.token)
                or auth.session_ok(request.cookies.get(auth.COOKIE), self.token))

    @staticmethod
    def refuse(request: Request) -> Response:
        if request.url.path.startswith("/api/"):
            response = json_response(
                {"error": "a token is needed: Authorization: Bearer <web_token>"}, 401)
            response.headers["www-authenticate"] = 'Bearer realm="lastlogin"'
            return response
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?next=" + urllib.parse.quote(target, safe=""), 303)


misdirected = PlainTextResponse(
    "421 Misdirected Request: without web_token this dashboard answers only to "
    "127.0.0.1, localhost and [::1]\n", 421)


server_error = PlainTextResponse("500 Internal Server Error: see the log\n", 500)


# --- the application ---------------------------------------------------------------

def create_app(settings: Settings, engine: sa.Engine, tz: dt.tzinfo | None = None,
               daily: views.DailyCounts | None = None) -> ASGIApp:
    """The dashboard over ``engine`` (where reports read), in zone ``tz``."""
    tz = tz or local_zone()
    env = _environment(tz)
    daily = daily or views.DailyCounts(engine=engine)
    daily.warm(tz)
    health = views.Health(settings)

    def ctx() -> views.Ctx:
        return views.Ctx(settings, dt.datetime.now(dt.timezone.utc), tz, daily, health)

    Compute = Callable[[sa.Connection, views.Ctx, Request], dict[str, Any]]

    def page(path: str, api: str, template: str, compute: Compute):
        """A route pair: the HTML page and its JSON twin, from one ``compute``."""

        def answer(request: Request, as_json: bool) -> Response:
            with engine.connect() as conn:
                data = compute(conn, ctx(), request)
            status = data.pop("_status", 200)
            if as_json:
                return json_response(data, status)
            query = f"?{request.url.query}" if request.url.query else ""
            html = env.get_template(template).render(data=data, api=api + query,
                                                     path=request.url.path,
                                                     q=data.get("q", ""))
            return HTMLResponse(html, status)

        return (Route(path, lambda r: answer(r, False), methods=["GET"]),
                Route(api, lambda r: answer(r, True), methods=["GET"]))

    routes = [
        *page("/", "/api/overview", "overview.html",
              lambda conn, c, r: {**views.overview(conn, c), "sections": [
                  {"name": s.name, "title": s.title} for s in views.SECTIONS]}),
        *page("/user", "/api/user", "user.html", _user),
        *page("/inactive", "/api/inactive", "inactive.html",
              lambda conn, c, r: views.inactive(
                  conn, c, _int(r, "days", 90, 1, 36600),
                  _int(r, "limit", views.INACTIVE_LIMIT, 1, views.INACTIVE_MAX))),
        *page("/rules", "/api/rules", "rules.html", lambda conn, c, r: views.rules(conn, c)),
        *page("/search", "/api/search", "search.html",
              lambda conn, c, r: views.search(conn, c, normalize_user(_text(r, "q")))),
        Route("/login", _login_page(env, settings), methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: _http_error(env), sa.exc.DBAPIError: _database_error(env)})
    return Guard(app, settings.web_token, loopback_names(settings.web_listen))


def _int(request: Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(key)
    if text is None or text == "":
        return default
    # ASCII digits, a few: int() would take '²' (and fail) or 5,000 digits (and fail)
    if not re.fullmatch(r"[0-9]{1,12}", text) or not low <= int(text) <= high:
        raise HTTPException(400, f"{key} must be a whole number from {low} to {high}")
    return int(text)


def _text(request: Request, key: str) -> str:
    """A text parameter; no NUL (PostgreSQL text cannot hold one, and a stored
    name shows a NUL byte as \\x00, so none has one)."""
    text = request.query_params.get(key, "")
    if "\x00" in text:
        raise HTTPException(400, f"{key} cannot hold a NUL character (a stored name "
                                 "shows a NUL byte as \\x00)")
    return text


def _user(conn: sa.Connection, c: views.Ctx, request: Request) -> dict[str, Any]:
    name = _text(request, "name")
    if not name and "quoted_name" in request.query_params:
        # the check form's: quoted, so a name's CR and LF come back as they were
        try:
            name = urllib.parse.unquote(_text(request, "quoted_name"), errors="strict")
        except UnicodeDecodeError:
            raise HTTPException(400, "quoted_name must be percent-quoted UTF-8") from None
        if "\x00" in name:
            raise HTTPException(400, "quoted_name cannot hold a NUL character")
    if not name:
        raise HTTPException(400, "name is needed: /user?name=...")
    ip = request.query_params.get("ip") or None
    if ip is not None and parse_ip(ip) is None:
        raise HTTPException(400, "ip must be an IPv4 or IPv6 address")
    local_ip = request.query_params.get("local_ip")     # "" is none; absent: the last's
    if local_ip and parse_ip(local_ip) is None:
        raise HTTPException(400, "local_ip must be an IPv4 or IPv6 address")
    protocol = request.query_params.get("protocol") or None
    if protocol is not None and protocol not in PROTOCOLS:
        raise HTTPException(400, f"protocol must be one of {', '.join(PROTOCOLS)}")
    data = views.user(conn, c, name, ip, protocol, local_ip)
    if not data["found"]:
        data["_status"] = 404
    return data


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _http_error(env: jinja2.Environment):
    def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if _wants_json(request):
            return json_response({"error": exc.detail}, exc.status_code)
        html = env.get_template("error.html").render(
            status=exc.status_code, detail=exc.detail, path=request.url.path, api=None)
        return HTMLResponse(html, exc.status_code, headers=exc.headers)
    return handler


def _database_error(env: jinja2.Environment):
    def handler(request: Request, exc: Exception) -> Response:
        # the driver's words (host names, roles, SQL) go to the log, not to the page
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        log.warning("event=web_database_error path=%s error=%s", request.url.path, first)
        return _http_error(env)(request, HTTPException(
            503, "database unavailable: see the dashboard's log"))
    return handler


def _login_page(env: jinja2.Environment, settings: Settings):
    async def login(request: Request) -> Response:
        wanted = auth.safe_next(request.query_params.get("next"))
        if request.method != "POST":          # GET, HEAD
            if not settings.web_token:
                return RedirectResponse(wanted, 303)
            return _login_form(env, wanted, None, 200)
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return _login_form(env, wanted, "form too large", 413)
        try:
            form = urllib.parse.parse_qs(body.decode("latin-1"), max_num_fields=4)
        except ValueError:          # more fields than the form has
            return _login_form(env, wanted, "not this form's fields", 400)
        wanted = auth.safe_next((form.get("next") or [wanted])[0])
        given = (form.get("token") or [""])[0]
        if not settings.web_token or not auth.token_ok(given, settings.web_token):
            return _login_form(env, wanted, "wrong token", 401)
        response = RedirectResponse(wanted, 303)
        response.set_cookie(auth.COOKIE, auth.session_value(settings.web_token),
                            max_age=auth.SESSION_SECONDS, httponly=True, samesite="strict",
                            secure=settings.web_secure_cookie
                            or request.url.scheme == "https", path="/")
        return response
    return login


def _login_form(env: jinja2.Environment, wanted: str, error: str | None, status: int):
    html = env.get_template("login.html").render(next=wanted, error=error, path="/login",
                                                 api=None)
    return HTMLResponse(html, status)
