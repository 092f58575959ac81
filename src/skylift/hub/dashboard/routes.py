"""The dashboard's pages and form actions, served on the management port at ``/``.

Reads come from :mod:`skylift.hub.dashboard.queries`; every change goes
through the same functions as the management API (``set_tags``,
``revoke``, ``create_deployment``, :mod:`skylift.hub.rollouts`' pause, resume
and abort, ``revoke_provisioning_key``, ``revoke_signer_ca``), so that the
rules, the audit entries and the gateway's caches are the same whichever
door an operator uses. Roles are the API's: viewers read, operators change
devices and deployments, admins manage keys.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from skylift.errors import SkyliftError, UserInputError
from skylift.hub import gateway, rollouts, web
from skylift.hub.api import deployments as api_deployments
from skylift.hub.api import devices as api_devices
from skylift.hub.api import products as api_products
from skylift.hub.api.common import (
    MAX_BIGINT_ID,
    MAX_INT_ID,
    MAX_TIME_KEY,
    PRODUCT_NAME,
    TAG,
    Query,
    decode_cursor,
    encode_cursor,
    find_device,
    time_from_key,
    time_key,
)
from skylift.hub.auth import AuthError, Role
from skylift.hub.dashboard import queries
from skylift.hub.dashboard.pages import (
    Form,
    action,
    error_page,
    json_answer,
    page,
    read_form,
    redirect,
    render,
    security_headers,
    static_files,
)
from skylift.hub.dashboard.sessions import (
    ABSOLUTE,
    LOGIN_CSRF_COOKIE,
    LoginThrottle,
    Visitor,
    cookie_name,
    csrf_matches,
    end_session,
    is_secure,
    log_in,
    new_token,
    same_origin,
)
from skylift.hub.db.models import (
    DeploymentStatus,
    DeviceState,
    Product,
    Release,
)
from skylift.hub.web import HubContext, NotFound

__all__ = ["SNAPSHOT_INTERVAL_KEY", "background", "not_found", "routes", "snapshot_versions"]

log = logging.getLogger("skylift.hub.dashboard")

#: ``ctx.extra`` key: seconds between snapshots of devices per version (default 600).
SNAPSHOT_INTERVAL_KEY = "dashboard_snapshot_interval_s"
_DEVICES_PER_PAGE = 50
_EVENTS_PER_PAGE = 50
_AUDIT_PER_PAGE = 100
_RELEASES_PER_PRODUCT = 20
_STATES = (*(s.value for s in DeviceState), "revoked")
_SEEN = ("1h", "24h", "7d", "stale", "never")
_SINCE = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7),
          "30d": timedelta(days=30)}  # fmt: skip
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_DEPLOYMENT_STATUSES = tuple(s.value for s in DeploymentStatus)
_RELEASE_CHOICE = re.compile(r"([a-z0-9][a-z0-9._-]{0,62})/([0-9A-Za-z][0-9A-Za-z.+~_-]{0,63})")
_MAX_REASON_CHARS = 1024
_WORDS = re.compile(r"[\s,]+")


def _words(text: str) -> list[str]:
    return [w for w in _WORDS.split(text.strip()) if w]


# -- filters from query strings -------------------------------------------------------------------


def _device_filters(query: Query) -> queries.DeviceFilters:
    tags = query.string("tags", max_chars=1100)
    tag_list = _words(tags) if tags else []
    if len(tag_list) > 16:
        raise UserInputError("at most 16 tags")
    for t in tag_list:
        if not TAG.fullmatch(t):
            raise UserInputError(f"tag {t[:64]!r} must match {TAG.pattern}")
    return queries.DeviceFilters(
        q=query.string("q"),
        product=query.string("product", pattern=PRODUCT_NAME),
        tags=tuple(dict.fromkeys(tag_list)),
        hardware=query.string("hardware"),
        version=query.string("version"),
        state=query.choice("state", _STATES),
        seen=query.choice("seen", _SEEN),
    )


def _time_cursor(query: Query, kind: str) -> tuple[datetime, int] | None:
    value = query.string("before", max_chars=200)
    if value is None:
        return None
    created, entry_id = decode_cursor(value, kind, (MAX_TIME_KEY, MAX_BIGINT_ID))
    return time_from_key(created), entry_id


def _encode_time_cursor(kind: str, position: tuple[datetime, int] | None) -> str | None:
    return None if position is None else encode_cursor(kind, (time_key(position[0]), position[1]))


# -- the deployment form --------------------------------------------------------------------------


def _phases_from_text(text: str) -> list[dict[str, Any]]:
    """``tag:ring=canary, 10, 100`` -> phases as the API takes them."""
    phases: list[dict[str, Any]] = []
    for item in _words(text):
        if item.startswith("tag:"):
            phases.append({"tag": item.removeprefix("tag:")})
            continue
        try:
            value = float(item.rstrip("%"))
        except ValueError:
            raise UserInputError(
                f"phase {item[:40]!r} is neither a percentage nor tag:NAME (e.g. 10, 50, 100)"
            ) from None
        phases.append({"percent": int(value) if value.is_integer() else value})
    if not phases:
        raise UserInputError("give at least one phase, e.g. 10, 100")
    return phases


def _number(form: Form, key: str, what: str) -> float:
    text = form.get(key)
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"{what} must be a number, not {text[:40]!r}") from None


def _selector_from(values: dict[str, str]) -> dict[str, Any]:
    selector: dict[str, Any] = {}
    if values.get("tags", "").strip():
        selector["tags"] = _words(values["tags"])
    if values.get("hardware", "").strip():
        selector["hardware"] = values["hardware"].strip()
    if values.get("versions", "").strip():
        selector["versions"] = _words(values["versions"])
    if values.get("devices", "").strip():
        selector["devices"] = _words(values["devices"])
    if values.get("q", "").strip():
        selector["q"] = values["q"].strip()
    return selector


def _spec_from_form(form: Form) -> api_deployments.DeploymentSpec:
    """The create form as the API's body, validated by the API's own parser."""
    choice = _RELEASE_CHOICE.fullmatch(form.get("release"))
    if choice is None:
        raise UserInputError("choose a release")
    soak_min = _number(form, "min_soak_min", "the minimum soak time")
    if not 0 <= soak_min <= 525_600:
        raise UserInputError("the minimum soak time must be 0 to 525600 minutes (a year)")
    doc = {
        "name": form.get("name"),
        "product": choice.group(1),
        "version": choice.group(2),
        "selector": _selector_from(form.values),
        "phases": _phases_from_text(form.get("phases")),
        "failure_gate_percent": _number(form, "failure_gate_percent", "the failure gate"),
        "min_soak_s": round(soak_min * 60),
        "allow_downgrade": form.checked("allow_downgrade"),
    }
    return api_deployments.parse_spec(doc)


def _release_choices(session: Session, org_id: int) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Product.name, Release.version)
        .join(Release, Release.product_id == Product.id)
        .where(Product.org_id == org_id)
        .order_by(Product.name, Release.id.desc())
    ).all()
    return [(f"{p}/{v}", f"{p} {v}") for p, v in rows]


# -- fleet figures --------------------------------------------------------------------------------


class FleetFigures:
    """The overview's fleet figures per organisation, kept fresh while people look at them.

    Counting a 100k-device fleet by state, last-seen time and version costs
    about half a second on SQLite, and every open overview asks again every
    two seconds. So the figures are computed at most once per
    :data:`MAX_AGE_S` per process: the background loop recomputes them every
    :data:`REFRESH_S` for each organisation whose overview was requested in
    the last minute, and a page only computes them itself when they are
    older than :data:`MAX_AGE_S` (the first view, or no background loop).
    The page says when they were counted.
    """

    MAX_AGE_S = 15.0
    REFRESH_S = 5.0
    _WATCHED_S = 60.0

    def __init__(self, ctx: HubContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._figures: dict[int, tuple[float, datetime, queries.FleetOverview]] = {}
        self._asked: dict[int, float] = {}

    def _compute(self, org_id: int) -> tuple[datetime, queries.FleetOverview]:
        now = self._ctx.clock()
        with self._ctx.sessions() as session:
            figures = queries.fleet_overview(session, org_id, now)
        with self._lock:
            self._figures[org_id] = (time.monotonic(), now, figures)
        return now, figures

    def get(self, org_id: int) -> tuple[datetime, queries.FleetOverview]:
        """When the figures were counted, and the figures. Blocking."""
        with self._lock:
            self._asked[org_id] = time.monotonic()
            entry = self._figures.get(org_id)
        if entry is not None and time.monotonic() - entry[0] < self.MAX_AGE_S:
            return entry[1], entry[2]
        return self._compute(org_id)

    def refresh(self) -> None:
        """Recompute the figures of the organisations someone looked at lately. Blocking."""
        now = time.monotonic()
        with self._lock:
            watched = [o for o, t in self._asked.items() if now - t < self._WATCHED_S]
            for org in [o for o, t in self._asked.items() if now - t >= self._WATCHED_S]:
                del self._asked[org]
                self._figures.pop(org, None)
        for org_id in watched:
            self._compute(org_id)


_FIGURES_KEY = "dashboard_fleet_figures"


def _fleet_figures(ctx: HubContext) -> FleetFigures:
    figures = ctx.extra.get(_FIGURES_KEY)
    if not isinstance(figures, FleetFigures):
        figures = ctx.extra[_FIGURES_KEY] = FleetFigures(ctx)
    return figures


# -- background -----------------------------------------------------------------------------------


def snapshot_versions(ctx: HubContext) -> int:
    """Record today's devices per version for every organisation. Blocking."""
    with ctx.transaction() as session:
        return queries.record_all_version_counts(session, ctx.clock().date())


def background(ctx: HubContext) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """The adoption chart's daily history, and fresh overview figures while people look."""
    interval = float(ctx.extra.get(SNAPSHOT_INTERVAL_KEY, 600.0))
    figures = _fleet_figures(ctx)

    async def snapshots() -> None:
        while True:
            try:
                await web.run(snapshot_versions, ctx)
            except (SkyliftError, SQLAlchemyError, OSError):
                log.exception("recording devices per version failed; retrying later")
            await asyncio.sleep(interval)

    async def overview() -> None:
        while True:
            await asyncio.sleep(FleetFigures.REFRESH_S)
            try:
                await web.run(figures.refresh)
            except (SkyliftError, SQLAlchemyError, OSError):
                log.exception("counting the fleet for the overview failed; retrying")

    return [snapshots, overview]


# -- routes ---------------------------------------------------------------------------------------


def routes(ctx: HubContext) -> list[BaseRoute]:
    """Every dashboard page, fragment and form action."""
    throttle = LoginThrottle()
    release_cache = queries.ReleaseCache()
    static = static_files()

    def show(request: Request, visitor: Visitor | None, template: str, **values: Any) -> Response:
        return render(request, visitor, template, now=ctx.clock(), **values)

    # -- static, login, logout

    async def static_file(request: Request) -> Response:
        entry = static.get(request.path_params["name"])
        if entry is None:
            return error_page(request, None, 404, "no such file")
        data, media, etag = entry
        if request.headers.get("if-none-match") == f'"{etag}"':
            return security_headers(Response(status_code=304), cache=True)
        response = Response(data, media_type=media)
        response.headers["ETag"] = f'"{etag}"'
        # URLs carry the content hash (?v=), so a new release is a new URL.
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return security_headers(response, cache=True)

    def login_form(request: Request, *, error: str | None = None, status: int = 200) -> Response:
        token = new_token()
        nxt = request.query_params.get("next", "/")
        response = show(
            request, None, "login.html", login_csrf=token, next=_local(nxt), error=error,
            http_status=status, email=request.query_params.get("email", ""),
        )  # fmt: skip
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", httponly=True,
            secure=is_secure(request), samesite="strict",
        )  # fmt: skip
        return response

    async def login_page(request: Request) -> Response:
        return await web.run(login_form, request)

    async def login_submit(request: Request) -> Response:
        if not same_origin(request):
            return error_page(request, None, 403, "refused: the form was sent from another site")
        try:
            form = await read_form(request)
        except SkyliftError as e:
            return await web.run(login_form, request, error=e.diagnostics(), status=400)
        if not csrf_matches(form.values.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
            return await web.run(
                login_form, request, error="the login form expired; try again", status=403
            )
        email, password = form.get("email").lower(), form.values.get("password", "")
        try:
            throttle.check(email)
            token, _ = await web.run(log_in, ctx, email, password, now=ctx.clock())
        except AuthError as e:
            if "too many" not in e.message:
                throttle.failed(email)
            log.info("dashboard login refused for %r: %s", email[:100], e.message)
            return await web.run(login_form, request, error=e.diagnostics(), status=401)
        throttle.succeeded(email)
        log.info("dashboard login: %s", email)
        response = redirect(_local(form.get("next") or "/"))
        response.set_cookie(
            cookie_name(request), token, max_age=int(ABSOLUTE.total_seconds()), path="/",
            httponly=True, secure=is_secure(request), samesite="lax",
        )  # fmt: skip
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @action(ctx, Role.VIEWER, "logging out")
    def logout(request: Request, visitor: Visitor, form: Form) -> Response:
        end_session(ctx, request.cookies.get(cookie_name(request)))
        response = redirect("/login", flash="You are logged out.")
        response.delete_cookie(cookie_name(request), path="/")
        return response

    # -- overview

    fleet_figures = _fleet_figures(ctx)

    def overview_values(session: Session, visitor: Visitor) -> dict[str, Any]:
        counted, figures = fleet_figures.get(visitor.org_id)
        return {
            "fleet": figures,
            "counted": counted,
            "live": queries.live_deployments(session, visitor.org_id),
        }

    @page(ctx)
    def overview(request: Request, session: Session, visitor: Visitor) -> Response:
        Query(request, allowed=())
        return show(request, visitor, "overview.html", **overview_values(session, visitor))

    @page(ctx)
    def overview_live(request: Request, session: Session, visitor: Visitor) -> Response:
        return show(request, visitor, "_overview_live.html", **overview_values(session, visitor))

    # -- devices

    @page(ctx)
    def devices(request: Request, session: Session, visitor: Visitor) -> Response:
        query = Query(
            request,
            allowed=("q", "product", "tags", "hardware", "version", "state", "seen", "cursor"),
        )
        filters = _device_filters(query)
        after = query.cursor("devices", (MAX_INT_ID,))
        rows, cursor, total = queries.devices_page(
            session, visitor.org_id, filters, after=after[0] if after else None,
            limit=_DEVICES_PER_PAGE, now=ctx.clock(),
        )  # fmt: skip
        products = list(
            session.scalars(
                select(Product.name).where(Product.org_id == visitor.org_id).order_by(Product.name)
            )
        )
        return show(
            request, visitor, "devices.html", rows=rows, total=total, filters=filters,
            next_cursor=cursor, paged=after is not None, products=products, states=_STATES,
            seen_choices=_SEEN, count_cap=queries.COUNT_CAP,
        )  # fmt: skip

    def device_values(
        request: Request, session: Session, visitor: Visitor, device_id: str
    ) -> dict[str, Any]:
        query = Query(request, allowed=("before",))
        before = _time_cursor(query, "events")
        device = find_device(session, visitor.principal, device_id)
        events, older = queries.device_events(
            session, device.id, before=before, limit=_EVENTS_PER_PAGE
        )
        return {
            "device": device,
            "events": events,
            "older": _encode_time_cursor("events", older),
            "paged": before is not None,
            "deployments": api_devices.device_deployments(session, device),
        }

    @page(ctx)
    def device_detail(request: Request, session: Session, visitor: Visitor) -> Response:
        values = device_values(request, session, visitor, request.path_params["device_id"])
        return show(request, visitor, "device.html", **values)

    @page(ctx)
    def device_live(request: Request, session: Session, visitor: Visitor) -> Response:
        values = device_values(request, session, visitor, request.path_params["device_id"])
        return show(request, visitor, "_device_live.html", **values)

    @action(ctx, Role.OPERATOR, "tagging a device")
    def device_tags(request: Request, visitor: Visitor, form: Form) -> Response:
        tags = list(dict.fromkeys(_words(form.get("tags"))))
        if len(tags) > api_devices.MAX_TAGS:
            raise UserInputError(f"at most {api_devices.MAX_TAGS} tags")
        for t in tags:
            if not TAG.fullmatch(t):
                raise UserInputError(f"tag {t[:64]!r} must match {TAG.pattern}")
        with ctx.transaction() as session:
            device = find_device(session, visitor.principal, request.path_params["device_id"])
            api_devices.set_tags(session, visitor.principal, device, tags)
            device_id = device.device_id
        return redirect(f"/devices/{device_id}", flash=f"Tags of {device_id} saved.")

    @action(ctx, Role.OPERATOR, "revoking a device")
    def device_revoke(request: Request, visitor: Visitor, form: Form) -> Response:
        reason = form.get("reason")
        if not reason:
            raise UserInputError("say why the device is revoked")
        if len(reason) > _MAX_REASON_CHARS or not reason.isprintable():
            raise UserInputError(f"the reason must be one line of at most {_MAX_REASON_CHARS}")
        with ctx.transaction() as session:
            device = find_device(session, visitor.principal, request.path_params["device_id"])
            api_devices.revoke(session, visitor.principal, device, reason, now=ctx.clock())
            device_id = device.device_id
        gateway.invalidate(device_id)
        return redirect(f"/devices/{device_id}", flash=f"{device_id} is revoked.")

    # -- releases

    @page(ctx)
    def releases(request: Request, session: Session, visitor: Visitor) -> Response:
        Query(request, allowed=())
        infos = queries.release_infos(
            session, ctx.store, release_cache, visitor.org_id, per_product=_RELEASES_PER_PRODUCT
        )
        return show(request, visitor, "releases.html", products=infos)

    # -- deployments

    @page(ctx)
    def deployments(request: Request, session: Session, visitor: Visitor) -> Response:
        query = Query(request, allowed=("status", "cursor"))
        status = query.choice("status", _DEPLOYMENT_STATUSES)
        after = query.cursor("deployments", (MAX_INT_ID,))
        lines, cursor = queries.deployments_page(
            session, visitor.org_id,
            statuses=[DeploymentStatus(status)] if status else [],
            after=after[0] if after else None,
        )  # fmt: skip
        return show(
            request, visitor, "deployments.html", lines=lines, status=status,
            statuses=_DEPLOYMENT_STATUSES, next_cursor=cursor,
        )  # fmt: skip

    def new_form(
        request: Request, session: Session, visitor: Visitor, values: dict[str, str],
        error: str | None = None, status: int = 200,
    ) -> Response:  # fmt: skip
        return show(
            request, visitor, "deployment_new.html", values=values, error=error,
            http_status=status,
            releases=_release_choices(session, visitor.org_id),
        )  # fmt: skip

    @page(ctx, Role.OPERATOR, "creating a deployment")
    def deployment_new(request: Request, session: Session, visitor: Visitor) -> Response:
        query = Query(request, allowed=("release", "tags", "hardware", "versions", "q"))
        values = {k: query.string(k, max_chars=1000) or "" for k in
                  ("release", "tags", "hardware", "versions", "q")}  # fmt: skip
        values |= {"phases": "10, 100", "failure_gate_percent": "5", "min_soak_min": "10",
                   "name": "", "devices": ""}  # fmt: skip
        return new_form(request, session, visitor, values)

    @page(ctx, Role.OPERATOR, "creating a deployment")
    def deployment_count(request: Request, session: Session, visitor: Visitor) -> Response:
        keys = ("release", "tags", "hardware", "versions", "q", "devices")
        query = Query(request, allowed=keys)
        values = {k: query.string(k, max_chars=200_000 if k == "devices" else 1000) or ""
                  for k in keys}  # fmt: skip
        try:
            choice = _RELEASE_CHOICE.fullmatch(values["release"])
            if choice is None:
                raise UserInputError("choose a release to count the devices it would go to")
            spec_doc = {"name": "count", "product": choice.group(1), "version": choice.group(2),
                        "selector": _selector_from(values), "phases": [{"percent": 100}],
                        "failure_gate_percent": 0, "min_soak_s": 0}  # fmt: skip
            spec = api_deployments.parse_spec(spec_doc)
            product = session.scalars(
                select(Product).where(
                    Product.org_id == visitor.org_id, Product.name == spec.product
                )
            ).one_or_none()
            if product is None:
                raise UserInputError(f"no product {spec.product}")
            where = api_deployments.selection_filters(visitor.principal, product, spec.selector)
            matched, current = queries.matching_devices(session, where, spec.version)
        except UserInputError as e:
            return json_answer({"error": e.diagnostics()}, 400)
        text = f"{matched} device{'s' if matched != 1 else ''} match"
        if current:
            text += f"; {current} run {spec.version} already"
        return json_answer({"matched": matched, "current": current, "text": text})

    @action(ctx, Role.OPERATOR, "creating a deployment")
    def deployment_create(request: Request, visitor: Visitor, form: Form) -> Response:
        try:
            spec = _spec_from_form(form)
            with ctx.transaction() as session:
                status, changed = api_deployments.create_deployment(
                    ctx, session, visitor.principal, spec, now=ctx.clock()
                )
        except SkyliftError as e:
            # The form again, as filled in, with the one line that says what to fix.
            with ctx.sessions() as session:
                values = {k: v for k, v in form.values.items() if k != "csrf"}
                return new_form(
                    request, session, visitor, values, error=e.diagnostics(),
                    status=web.status_for(e),
                )  # fmt: skip
        rollouts.notify(changed)
        return redirect(
            f"/deployments/{status['id']}",
            flash=f"Deployment {status['name']} created: {status['devices']} devices.",
        )

    def deployment_values(request: Request, session: Session, visitor: Visitor) -> dict[str, Any]:
        Query(request, allowed=())
        deployment_id = request.path_params["id"]
        deployment = api_deployments.find_deployment(
            session, visitor.principal, deployment_id, lock=False
        )
        status = api_deployments.deployment_status(session, deployment)
        return {
            "d": status,
            "phases": {p.phase: p for p in deployment.phases},
            "failures": queries.deployment_failures(session, deployment.id),
            "history": queries.deployment_history(session, visitor.org_id, deployment.id),
        }

    @page(ctx)
    def deployment_detail(request: Request, session: Session, visitor: Visitor) -> Response:
        values = deployment_values(request, session, visitor)
        return show(request, visitor, "deployment.html", **values)

    @page(ctx)
    def deployment_live(request: Request, session: Session, visitor: Visitor) -> Response:
        values = deployment_values(request, session, visitor)
        return show(request, visitor, "_deployment_live.html", **values)

    def transition(doing: str, verb: str) -> Any:
        @action(ctx, Role.OPERATOR, f"{doing} a deployment")
        def endpoint(request: Request, visitor: Visitor, form: Form) -> Response:
            deployment_id = request.path_params["id"]
            with ctx.transaction() as session:
                deployment = api_deployments.find_deployment(
                    session, visitor.principal, deployment_id, lock=True
                )
                now, who = ctx.clock(), visitor.principal
                if verb == "pause":
                    reason = form.get("reason")[:_MAX_REASON_CHARS] or f"paused by {who.actor}"
                    changed = rollouts.pause(ctx, session, deployment, by=who, reason=reason,
                                             now=now)  # fmt: skip
                elif verb == "resume":
                    changed = rollouts.resume(ctx, session, deployment, by=who, now=now)
                else:
                    changed = rollouts.abort(ctx, session, deployment, by=who, now=now)
                name = deployment.name
            rollouts.notify(changed)
            done = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[verb]
            return redirect(f"/deployments/{deployment_id}", flash=f"{name} {done}.")

        return endpoint

    # -- audit, keys

    @page(ctx)
    def audit(request: Request, session: Session, visitor: Visitor) -> Response:
        query = Query(request, allowed=("action", "actor", "target", "since", "before"))
        act = query.string("action", max_chars=64)
        actor = query.string("actor", max_chars=255)
        target_text = query.string("target", max_chars=200)
        target = None
        if target_text is not None:
            kind, sep, ident = target_text.partition(":")
            if not sep or not kind or not ident:
                raise UserInputError("target must be TYPE:ID, e.g. deployment:3 or device:gw-17")
            target = (kind, ident)
        since_key = query.choice("since", tuple(_SINCE))
        since = ctx.clock() - _SINCE[since_key] if since_key else None
        before = _time_cursor(query, "audit")
        entries, older = queries.audit_page(
            session, visitor.org_id, action=act, actor=actor, target=target, since=since,
            before=before, limit=_AUDIT_PER_PAGE,
        )  # fmt: skip
        return show(
            request, visitor, "audit.html", entries=entries,
            older=_encode_time_cursor("audit", older), paged=before is not None,
            actions=queries.audit_actions(session, visitor.org_id),
            filters={"action": act or "", "actor": actor or "", "target": target_text or "",
                     "since": since_key or ""}, since_choices=tuple(_SINCE),
        )  # fmt: skip

    @page(ctx)
    def keys(request: Request, session: Session, visitor: Visitor) -> Response:
        Query(request, allowed=())
        # The API lists provisioning keys to admins only: so does the dashboard.
        provisioning = (
            queries.provisioning_keys(session, visitor.org_id) if visitor.may(Role.ADMIN) else None
        )
        cas = []
        for row, product in queries.signer_cas(session, visitor.org_id):
            cas.append((api_products.signer_ca_json(row, product), row))
        return show(request, visitor, "keys.html", provisioning=provisioning, cas=cas)

    @action(ctx, Role.ADMIN, "revoking a provisioning key")
    def key_revoke(request: Request, visitor: Visitor, form: Form) -> Response:
        key_id = request.path_params["id"]
        if key_id > MAX_INT_ID:
            raise NotFound(f"no provisioning key {key_id}")
        with ctx.transaction() as session:
            api_products.revoke_provisioning_key(session, visitor.principal, key_id)
        return redirect("/keys", flash=f"Provisioning key {key_id} is revoked.")

    @action(ctx, Role.ADMIN, "removing a signer CA")
    def ca_revoke(request: Request, visitor: Visitor, form: Form) -> Response:
        ca_id = request.path_params["id"]
        if ca_id > MAX_INT_ID:
            raise NotFound(f"no signer CA {ca_id}")
        with ctx.transaction() as session:
            api_products.revoke_signer_ca(session, visitor.principal, ca_id)
        return redirect("/keys", flash=f"Signer CA {ca_id} is revoked.")

    return [
        Route("/", overview, methods=["GET"]),
        Route("/overview/live", overview_live, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/devices", devices, methods=["GET"]),
        Route("/devices/{device_id}", device_detail, methods=["GET"]),
        Route("/devices/{device_id}/live", device_live, methods=["GET"]),
        Route("/devices/{device_id}/tags", device_tags, methods=["POST"]),
        Route("/devices/{device_id}/revoke", device_revoke, methods=["POST"]),
        Route("/releases", releases, methods=["GET"]),
        Route("/deployments", deployments, methods=["GET"]),
        Route("/deployments", deployment_create, methods=["POST"]),
        Route("/deployments/new", deployment_new, methods=["GET"]),
        Route("/deployments/new/count", deployment_count, methods=["GET"]),
        Route("/deployments/{id:int}", deployment_detail, methods=["GET"]),
        Route("/deployments/{id:int}/live", deployment_live, methods=["GET"]),
        Route("/deployments/{id:int}/pause", transition("pausing", "pause"), methods=["POST"]),
        Route("/deployments/{id:int}/resume", transition("resuming", "resume"), methods=["POST"]),
        Route("/deployments/{id:int}/abort", transition("aborting", "abort"), methods=["POST"]),
        Route("/audit", audit, methods=["GET"]),
        Route("/keys", keys, methods=["GET"]),
        Route("/keys/provisioning/{id:int}/revoke", key_revoke, methods=["POST"]),
        Route("/keys/signer-cas/{id:int}/revoke", ca_revoke, methods=["POST"]),
    ]


def _local(target: str) -> str:
    """``target`` if it is a path on this site, else ``/``: no open redirect after login."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target[:2000]
    return "/"


def not_found(request: Request) -> Response:
    """The 404 page for paths outside the API and the gateway."""
    return error_page(request, None, 404, f"no page {request.url.path[:200]}")
