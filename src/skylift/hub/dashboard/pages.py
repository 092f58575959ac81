"""The dashboard's plumbing: templates, visitors, forms, CSRF, errors, security headers.

Pages (:func:`page`) and form actions (:func:`action`) wrap endpoint
functions that run in a worker thread with a database session:

- a page finds the visitor from the session cookie (else: to the login
  page), checks the role it needs, and renders its template;
- an action also refuses a cross-site ``Origin``, reads the form (bounded,
  ``application/x-www-form-urlencoded`` only), checks the CSRF token and then
  the role, all before the endpoint sees anything. So a viewer who forges
  the request a hidden button would have sent is refused by the server,
  not just by the missing button.

A :class:`~skylift.errors.SkyliftError` becomes a page with the status the
API would give (:func:`skylift.hub.web.status_for`) and the error's one line.
Every answer carries a strict Content-Security-Policy (scripts and styles
from this hub only, no inline code), ``nosniff``, no framing, and
``Cache-Control: no-store`` on pages (they show fleet data).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from skylift.errors import SkyliftError, UserInputError
from skylift.hub import web
from skylift.hub.auth import AuthError, Forbidden, Role
from skylift.hub.dashboard import charts
from skylift.hub.dashboard.sessions import (
    CsrfError,
    Visitor,
    cookie_name,
    csrf_matches,
    find_session,
    same_origin,
)
from skylift.hub.web import HubContext

__all__ = [
    "FLASH_COOKIE",
    "LIVE_INTERVAL_MS",
    "Form",
    "PageContext",
    "action",
    "error_page",
    "page",
    "read_form",
    "redirect",
    "render",
    "security_headers",
    "static_files",
]

FLASH_COOKIE = "skylift_flash"
#: How often live regions ask for fresh figures (the script reads it from the page).
LIVE_INTERVAL_MS = 2000
#: Form bodies: a pasted list of device ids is the largest thing a form sends.
MAX_FORM_BYTES = 512 * 1024
_MAX_FORM_FIELDS = 64
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


R = TypeVar("R", bound=Response)


def security_headers(response: R, *, cache: bool = False) -> R:
    """Set the dashboard's security headers on ``response``."""
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if not cache:
        response.headers["Cache-Control"] = "no-store"
    return response


# -- static files and templates ---------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _when(value: datetime | None) -> str:
    return "never" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = int((now - value).total_seconds())
    if seconds < 0:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@functools.cache
def static_files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, media type, etag) of the stylesheet and script, read once."""
    types = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
    out = {}
    for entry in resources.files("skylift.hub.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if suffix in types:
            data = entry.read_bytes()
            out[entry.name] = (data, types[suffix], hashlib.sha256(data).hexdigest()[:16])
    return out


def _asset(name: str) -> str:
    # The content's hash in the URL: cacheable forever, and a new release is a new URL.
    return f"/static/{name}?v={static_files()[name][2]}"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("skylift.hub.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["size"] = _size
    env.filters["when"] = _when
    env.globals["progress_bar"] = charts.progress_bar
    env.globals["adoption_chart"] = charts.adoption_chart
    env.globals["BAR_ORDER"] = charts.BAR_ORDER
    env.globals["asset"] = _asset
    env.globals["live_interval_ms"] = LIVE_INTERVAL_MS
    return env


class PageContext:
    """What every template sees besides its own values: the visitor, the time, helpers."""

    def __init__(self, request: Request, visitor: Visitor | None, now: datetime) -> None:
        self.request = request
        self.visitor = visitor
        self.now = now

    def ago(self, value: datetime | None) -> str:
        """``5 min ago``."""
        return _ago(value, self.now)

    def may(self, role_name: str) -> bool:
        """Whether the visitor may use controls that need ``role_name``."""
        return self.visitor is not None and self.visitor.may(Role.parse(role_name))

    def url(self, path: str, **params: Any) -> str:
        """``path`` with the non-empty ``params`` as a query string."""
        query = {k: v for k, v in params.items() if v not in (None, "")}
        return path + ("?" + urlencode(query) if query else "")


def render(
    request: Request,
    visitor: Visitor | None,
    template: str,
    *,
    http_status: int = 200,
    now: datetime | None = None,
    **values: Any,
) -> HTMLResponse:
    """``template`` rendered with ``values`` as an HTML page (or fragment)."""
    started = time.perf_counter()
    flash = request.cookies.get(FLASH_COOKIE)
    page = PageContext(request, visitor, now or datetime.now(UTC))
    html = _environment().get_template(template).render(page=page, flash=flash, **values)
    response = HTMLResponse(html, http_status)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.1f}"
    return security_headers(response)


def error_page(request: Request, visitor: Visitor | None, status: int, message: str) -> Response:
    """An error as a page: its status, its one line, a way back."""
    line = message.splitlines()[0][:500] if message else "error"
    if _wants_fragment(request):
        return security_headers(Response(line, status, media_type="text/plain"))
    return render(
        request, visitor, "error.html", http_status=status, status_code=status, message=line
    )


def redirect(url: str, *, flash: str | None = None) -> Response:
    """303 to ``url`` (a local path), with a one-line message for the next page."""
    if not url.startswith("/") or url.startswith("//"):
        url = "/"
    response = RedirectResponse(url, 303)
    if flash:
        response.set_cookie(
            FLASH_COOKIE, flash[:300], max_age=60, path="/", httponly=True, samesite="strict"
        )
    return security_headers(response)


def _wants_fragment(request: Request) -> bool:
    return request.url.path.endswith("/live") or request.url.path.endswith("/count")


# -- visitors -------------------------------------------------------------------------------------


def _visitor(ctx: HubContext, request: Request) -> Visitor:
    token = request.cookies.get(cookie_name(request))
    with ctx.transaction() as session:
        return find_session(ctx, session, token, now=ctx.clock())


def _to_login(request: Request, message: str) -> Response:
    if _wants_fragment(request):
        return security_headers(Response(message, 401, media_type="text/plain"))
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = redirect(f"/login?next={quote(target, safe='')}")
    return response


PageFn = Callable[[Request, Session, Visitor], Response]


def page(
    ctx: HubContext, role: Role = Role.VIEWER, doing: str = "this page"
) -> Callable[[PageFn], Callable[[Request], Awaitable[Response]]]:
    """Wrap a page: visitor from the session, role check, a read-only session, errors as pages."""

    def wrap(fn: PageFn) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            def work() -> Response:
                try:
                    visitor = _visitor(ctx, request)
                except AuthError as e:
                    return _to_login(request, e.diagnostics())
                try:
                    visitor.role.require(role, doing)
                    # Reads only: a plain session (on SQLite no write lock is taken).
                    with ctx.sessions() as session:
                        return fn(request, session, visitor)
                except SkyliftError as e:
                    return error_page(request, visitor, web.status_for(e), e.diagnostics())

            return await web.run(work)

        return endpoint

    return wrap


class Form:
    """A submitted form: one value per field, strictly.

    Raises:
        UserInputError: on a repeated field or too many fields.
    """

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        if len(pairs) > _MAX_FORM_FIELDS:
            raise UserInputError(f"more than {_MAX_FORM_FIELDS} form fields")
        self.values: dict[str, str] = {}
        for key, value in pairs:
            if key in self.values:
                raise UserInputError(f"form field {key[:40]!r} is given more than once")
            self.values[key] = value

    def get(self, key: str, default: str = "") -> str:
        """A field's value, stripped ('' if absent)."""
        return self.values.get(key, default).strip()

    def checked(self, key: str) -> bool:
        """Whether a checkbox was ticked."""
        return key in self.values


async def read_form(request: Request) -> Form:
    body = await web.read_body(request, MAX_FORM_BYTES)
    if not body:
        return Form([])  # a button alone; the CSRF check refuses it if it lacks the token
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise UserInputError("send the form as application/x-www-form-urlencoded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserInputError("the form is not UTF-8") from e
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS)
    except ValueError as e:
        raise UserInputError(f"more than {_MAX_FORM_FIELDS} form fields") from e
    return Form(pairs)


ActionFn = Callable[[Request, Visitor, Form], Response]


def action(
    ctx: HubContext, role: Role, doing: str
) -> Callable[[ActionFn], Callable[[Request], Awaitable[Response]]]:
    """Wrap a form action: same origin, visitor, form, CSRF token, then the role."""

    def wrap(fn: ActionFn) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            visitor: Visitor | None = None
            try:
                if not same_origin(request):
                    raise CsrfError("refused: the form was sent from another site")
                try:
                    visitor = await web.run(_visitor, ctx, request)
                except AuthError as e:
                    return _to_login(request, e.diagnostics())
                form = await read_form(request)
                if not csrf_matches(form.values.get("csrf"), visitor.csrf_token):
                    raise CsrfError("the form has expired or was not sent by this dashboard")
                visitor.role.require(role, doing)
                return await web.run(fn, request, visitor, form)
            except CsrfError as e:
                return error_page(request, visitor, 403, e.diagnostics())
            except Forbidden as e:
                return error_page(request, visitor, 403, e.diagnostics())
            except SkyliftError as e:
                return error_page(request, visitor, web.status_for(e), e.diagnostics())

        return endpoint

    return wrap


def json_answer(doc: dict[str, Any], status: int = 200) -> Response:
    """A small JSON answer for the dashboard's own script (the live device count)."""
    return security_headers(JSONResponse(doc, status))
