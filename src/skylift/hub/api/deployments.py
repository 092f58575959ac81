"""Deployments: a release, a frozen device selection, phases, and the operator's controls.

``POST /deployments`` validates everything before it touches anything, then,
in one transaction: selects the devices (locked, so that two deployments
created at once cannot both take a device), freezes them into phases
(:func:`skylift.hub.rollouts.plan_phases`), starts phase 0 and offers the
release to its devices. Pause, resume and abort are
:mod:`skylift.hub.rollouts`'s; this module checks who may, and shows the
result.

The selection, all within the product and the caller's organisation:

- ``tags`` (all must match), ``hardware``, ``versions`` (any slot class runs
  one of them), ``devices`` (explicit ids; an unknown one is refused),
  ``q`` (the id contains it, ignoring case); ``{}`` selects the product's
  whole fleet;
- revoked devices are left out, and so are devices that run the release
  already: every slot class the release writes reports its version;
- a device that runs a *newer* version in a slot class the release writes
  refuses the deployment (409) unless ``allow_downgrade``;
- a device that is in another active or paused deployment refuses it (409):
  one device follows one rollout at a time, so that its director target and
  the failure gate its failure counts against are never in doubt.

A product or release named in the body that the caller's organisation does
not have is a 400 (the request names something unknown), as are the other
body errors; a deployment id of another organisation is a 404.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, select
from sqlalchemy.orm import Session, selectinload
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from skylift.errors import UserInputError
from skylift.hub import bandwidth, rollouts, web
from skylift.hub.api.common import (
    DEVICE_ID,
    NAME,
    PRODUCT_NAME,
    TAG,
    Body,
    Query,
    authorize,
    device_visible,
    rfc3339,
    route,
)
from skylift.hub.auth import Role
from skylift.hub.db.models import (
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    DeploymentStatus,
    Device,
    DeviceSlot,
    DeviceTag,
    Product,
    Release,
    RolloutStatus,
)
from skylift.hub.rollouts import PhaseCounts, PhasePlan
from skylift.hub.web import Conflict, HubContext, NotFound, Principal

__all__ = [
    "MAX_PHASES",
    "MAX_SELECTED_IDS",
    "DeploymentSpec",
    "Selector",
    "create_deployment",
    "deployment_status",
    "find_deployment",
    "parse_spec",
    "routes",
    "selection_filters",
]

MAX_PHASES = 10
#: Explicit device ids in one selector; larger fleets are selected by tag or hardware.
MAX_SELECTED_IDS = 10_000
_MAX_TAGS = 16
_MAX_VERSIONS = 64
_MAX_SOAK_S = 2**31 - 1
#: deployments.id is a 32-bit INTEGER on PostgreSQL: a larger id would be a database error.
_MAX_ID = 2**31 - 1
_MAX_REASON_CHARS = 1024
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
#: Device ids a refusal names; the rest are counted.
_SHOWN = 5
_LIVE = (DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED)
_STATUSES = tuple(s.value for s in DeploymentStatus)
_VERSION_ORDER = functools.cmp_to_key(rollouts.compare_versions)


@dataclass(frozen=True)
class Selector:
    """Which devices of the product a deployment is for (see the module docstring)."""

    tags: tuple[str, ...] = ()
    hardware: str | None = None
    versions: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    q: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The selector as stored and shown: only the fields given."""
        out: dict[str, Any] = {}
        if self.tags:
            out["tags"] = list(self.tags)
        if self.hardware is not None:
            out["hardware"] = self.hardware
        if self.versions:
            out["versions"] = list(self.versions)
        if self.devices:
            out["devices"] = list(self.devices)
        if self.q is not None:
            out["q"] = self.q
        return out


@dataclass(frozen=True)
class DeploymentSpec:
    """A validated ``POST /deployments`` body."""

    name: str
    product: str
    version: str
    selector: Selector
    phases: tuple[PhasePlan, ...]
    failure_gate_percent: float
    min_soak_s: int
    allow_downgrade: bool


def _number(doc: Mapping[str, Any], key: str, *, lo: float, hi: float) -> float:
    value = doc.get(key)
    # bool is an int in Python, never in JSON; json.loads accepts NaN and Infinity.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserInputError(f"{key} must be a number")
    if not lo <= value <= hi:
        raise UserInputError(f"{key} must be between {lo:g} and {hi:g}")
    return float(value)


def _device_ids(values: object) -> tuple[str, ...]:
    # Not Body.strings: its order-keeping de-duplication is quadratic, and
    # this list may hold thousands of ids.
    if not isinstance(values, list):
        raise UserInputError("selector.devices must be a list of device ids")
    if len(values) > MAX_SELECTED_IDS:
        raise UserInputError(f"selector.devices has {len(values)} ids; at most {MAX_SELECTED_IDS}")
    for value in values:
        if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
            raise UserInputError(f"selector.devices: {str(value)[:80]!r} is not a device id")
    return tuple(dict.fromkeys(values))


def _selector(doc: Mapping[str, Any]) -> Selector:
    body = Body(doc, optional=("tags", "hardware", "versions", "devices", "q"), where="selector")
    return Selector(
        tags=tuple(body.strings("tags", pattern=TAG, max_items=_MAX_TAGS))
        if "tags" in body
        else (),
        hardware=body.optional_string("hardware", max_chars=128),
        versions=tuple(body.strings("versions", pattern=_VERSION, max_items=_MAX_VERSIONS))
        if "versions" in body
        else (),
        devices=_device_ids(doc["devices"]) if "devices" in body else (),
        q=body.optional_string("q", max_chars=128),
    )


def _phases(value: object) -> tuple[PhasePlan, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PHASES:
        raise UserInputError(f"phases must be a list of 1 to {MAX_PHASES} phases")
    plans: list[PhasePlan] = []
    for i, item in enumerate(value):
        where = f"phase {i}"
        if not isinstance(item, dict):
            raise UserInputError(f'{where} must be {{"percent": n}} or {{"tag": name}}')
        if set(item) == {"percent"}:
            plans.append(PhasePlan(percent=_number(item, "percent", lo=0, hi=100)))
            if plans[-1].percent == 0:
                raise UserInputError(f"{where}: percent must be above 0")
        elif set(item) == {"tag"}:
            tag = Body(item, required=("tag",), where=where).string("tag", pattern=TAG)
            if any(p.tag == tag for p in plans):
                raise UserInputError(f"{where}: tag {tag} has a phase already")
            plans.append(PhasePlan(tag=tag))
        else:
            raise UserInputError(f'{where} must be {{"percent": n}} or {{"tag": name}}')
    percents = [p.percent for p in plans if p.percent is not None]
    if any(b <= a for a, b in itertools.pairwise(percents)):
        raise UserInputError(
            "percent phases are cumulative shares of the selection: they must increase"
        )
    if plans[-1].percent != 100:
        raise UserInputError(
            'the last phase must be {"percent": 100}, so that every selected device has a phase'
        )
    return tuple(plans)


def parse_spec(doc: Mapping[str, Any]) -> DeploymentSpec:
    """Validate a ``POST /deployments`` body. Pure.

    Raises:
        UserInputError: an unknown or missing field, or a value out of bounds.
    """
    required = (
        "name", "product", "version", "selector", "phases", "failure_gate_percent", "min_soak_s",
    )  # fmt: skip
    body = Body(doc, required=required, optional=("allow_downgrade",))
    return DeploymentSpec(
        name=body.string("name", pattern=NAME),
        product=body.string("product", pattern=PRODUCT_NAME),
        version=body.string("version", pattern=_VERSION),
        selector=_selector(body.object("selector")),
        phases=_phases(doc["phases"]),
        failure_gate_percent=_number(doc, "failure_gate_percent", lo=0, hi=100),
        min_soak_s=body.integer("min_soak_s", lo=0, hi=_MAX_SOAK_S),
        allow_downgrade=body.boolean("allow_downgrade") if "allow_downgrade" in body else False,
    )


# -- the selection --------------------------------------------------------------------------------


def _few(ids: Sequence[str]) -> str:
    shown = ", ".join(sorted(ids)[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


@dataclass
class _Selection:
    devices: dict[int, str]  # pk -> device id, the devices that get the release
    tags: dict[int, set[str]]
    revoked: int
    current: int  # already run the release


def selection_filters(who: Principal, product: Product, sel: Selector) -> list[ColumnElement[bool]]:
    """The selector as WHERE clauses on devices (index probes, as in the device list)."""
    where = [device_visible(who.org_id), Device.product_id == product.id]
    for tag in sel.tags:
        where.append(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if sel.hardware is not None:
        where.append(Device.hardware_id == sel.hardware)
    if sel.versions:
        where.append(
            Device.id.in_(
                select(DeviceSlot.device_id).where(DeviceSlot.version.in_(list(sel.versions)))
            )
        )
    if sel.devices:
        where.append(Device.device_id.in_(list(sel.devices)))
    if sel.q is not None:
        where.append(func.lower(Device.device_id).contains(sel.q.lower(), autoescape=True))
    return where


def _select(
    session: Session, who: Principal, product: Product, release: Release, spec: DeploymentSpec
) -> _Selection:
    """The devices ``spec`` selects, locked until the transaction ends.

    The follow-up queries take the selection as a subquery rather than a
    list of ids: a fleet of 100k devices would exceed the bind-parameter
    limits of both databases.

    Raises:
        UserInputError: an explicitly named device is not in the product.
        Conflict: a device would be downgraded, or is in another live deployment.
    """
    sel = spec.selector
    where = selection_filters(who, product, sel)
    # FOR UPDATE on PostgreSQL: a concurrent creation that selects the same
    # devices waits here, then sees this one's rows in its busy check below.
    rows = session.execute(
        select(Device.id, Device.device_id, Device.revoked).where(*where).with_for_update(of=Device)
    ).all()
    if sel.devices:
        unknown = set(sel.devices) - {device_id for _, device_id, _ in rows}
        if unknown:
            raise UserInputError(f"no device {_few(sorted(unknown))} in product {product.name}")

    live = {pk: device_id for pk, device_id, revoked in rows if not revoked}
    selected = select(Device.id).where(*where, Device.revoked.is_(False))
    slots: dict[int, dict[str, str]] = {}
    for pk, slot_class, version in session.execute(
        select(DeviceSlot.device_id, DeviceSlot.slot_class, DeviceSlot.version).where(
            DeviceSlot.device_id.in_(selected)
        )
    ):
        slots.setdefault(pk, {})[slot_class] = version
    classes = {
        p.get("slot_class")
        for p in (release.custom.get("payloads") or {}).values()
        if isinstance(p, dict)
    }
    current, newer = set(), {}
    for pk in live:
        # The slot classes this release writes; with none known, every slot.
        versions = [v for c, v in slots.get(pk, {}).items() if not classes or c in classes]
        if versions and all(v == release.version for v in versions):
            current.add(pk)
        ahead = [v for v in versions if rollouts.compare_versions(v, release.version) > 0]
        if ahead:
            newer[pk] = max(ahead, key=_VERSION_ORDER)
    if newer and not spec.allow_downgrade:
        named = [f"{live[pk]} ({v})" for pk, v in newer.items()]
        raise Conflict(
            f"{len(newer)} selected device(s) run a newer version than {release.version}: "
            f"{_few(named)}",
            hint="narrow the selection, or set allow_downgrade",
        )
    devices = {pk: d for pk, d in live.items() if pk not in current}
    busy = [
        device_id
        for pk, device_id in session.execute(
            select(Device.id, Device.device_id)
            .join(DeploymentDevice, DeploymentDevice.device_id == Device.id)
            .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
            .where(Deployment.status.in_(_LIVE), Device.id.in_(selected))
            .distinct()
        )
        if pk in devices
    ]
    if busy:
        raise Conflict(
            f"{len(busy)} selected device(s) are in another active or paused deployment: "
            f"{_few(busy)}",
            hint="wait for it to complete, abort it, or narrow the selection",
        )
    tags: dict[int, set[str]] = {}
    wanted = [p.tag for p in spec.phases if p.tag is not None]
    if wanted:
        for pk, tag in session.execute(
            select(DeviceTag.device_id, DeviceTag.tag).where(
                DeviceTag.tag.in_(wanted), DeviceTag.device_id.in_(selected)
            )
        ):
            tags.setdefault(pk, set()).add(tag)
    return _Selection(devices, tags, revoked=len(rows) - len(live), current=len(current))


# -- answers --------------------------------------------------------------------------------------


def deployment_status(session: Session, deployment: Deployment) -> dict[str, Any]:
    counts = rollouts.phase_counts(session, deployment.id)
    release = session.get(Release, deployment.release_id)
    product = session.get(Product, deployment.product_id)
    # Foreign keys guarantee both.
    assert release is not None
    assert product is not None
    phases = []
    for p in deployment.phases:
        c = counts.get(p.phase, PhaseCounts())
        phases.append(
            {
                "phase": p.phase,
                "percent": p.percent,
                "tag": p.tag,
                "started_at": rfc3339(p.started_at),
                "completed_at": rfc3339(p.completed_at),
                "devices": c.devices,
                "counts": c.as_dict(),
                "failure_rate_percent": round(c.failure_rate_percent, 2),
            }
        )
    return {
        "id": deployment.id,
        "name": deployment.name,
        "product": product.name,
        "version": release.version,
        "status": str(deployment.status),
        "paused_reason": deployment.paused_reason,
        "current_phase": deployment.current_phase,
        "failure_gate_percent": deployment.failure_gate_percent,
        "min_soak_s": deployment.min_soak_s,
        "allow_downgrade": deployment.allow_downgrade,
        "selector": deployment.selector,
        "devices": sum(c.devices for c in counts.values()),
        "phases": phases,
        "bandwidth": bandwidth.for_deployment(session, deployment.id),
        "created": rfc3339(deployment.created),
        "created_by": deployment.created_by,
    }


def find_deployment(
    session: Session, who: Principal, deployment_id: int, *, lock: bool
) -> Deployment:
    """The caller's deployment, locked for a change if ``lock``.

    Raises:
        NotFound: no such deployment in the caller's organisation.
    """
    stmt = select(Deployment).where(Deployment.id == deployment_id, Deployment.org_id == who.org_id)
    deployment = None
    if deployment_id <= _MAX_ID:
        deployment = session.scalars(stmt.with_for_update() if lock else stmt).one_or_none()
    if deployment is None:
        raise NotFound(f"no deployment {deployment_id}")
    return deployment


def create_deployment(
    ctx: HubContext, session: Session, who: Principal, spec: DeploymentSpec, *, now: datetime
) -> tuple[dict[str, Any], list[str]]:
    """Create the deployment ``spec`` describes, in the caller's transaction.

    What ``POST /deployments`` and the dashboard's form both do: resolve the
    product and release, select and lock the devices, freeze them into
    phases, audit, start phase 0. Returns the deployment's status (as the
    API shows it) and the device ids whose director targets changed; call
    :func:`skylift.hub.rollouts.notify` with them after the commit.

    Raises:
        UserInputError: unknown product or release, or an unknown device named.
        Conflict: nothing to update, a downgrade, or a device in another live deployment.
    """
    product = session.scalars(
        select(Product).where(Product.org_id == who.org_id, Product.name == spec.product)
    ).one_or_none()
    if product is None:
        # 400, not 404: the path exists; the body names something unknown.
        raise UserInputError(f"no product {spec.product}")
    release = session.scalars(
        select(Release).where(Release.product_id == product.id, Release.version == spec.version)
    ).one_or_none()
    if release is None:
        raise UserInputError(
            f"product {product.name} has no release {spec.version}",
            hint="GET /products/{name}/releases lists them",
        )
    selection = _select(session, who, product, release, spec)
    if not selection.devices:
        raise Conflict(
            f"the selection has no device to update ({selection.current} run "
            f"{release.version} already, {selection.revoked} revoked)"
        )
    deployment = Deployment(
        org_id=who.org_id,
        product_id=product.id,
        release_id=release.id,
        name=spec.name,
        selector=spec.selector.as_json(),
        status=DeploymentStatus.ACTIVE,
        failure_gate_percent=spec.failure_gate_percent,
        min_soak_s=spec.min_soak_s,
        allow_downgrade=spec.allow_downgrade,
        current_phase=0,
        created_by=who.actor,
        phases=[
            DeploymentPhase(phase=i, percent=p.percent, tag=p.tag)
            for i, p in enumerate(spec.phases)
        ],
    )
    session.add(deployment)
    session.flush()
    members = rollouts.plan_phases(deployment.id, selection.devices, selection.tags, spec.phases)
    if members:
        session.execute(
            insert(DeploymentDevice),
            [
                {
                    "deployment_id": deployment.id,
                    "device_id": pk,
                    "phase": phase,
                    "status": RolloutStatus.PENDING,
                }
                for pk, phase in sorted(members.items())
            ],
        )
    web.audit(
        session,
        who,
        "deployment.create",
        "deployment",
        deployment.id,
        {
            "name": spec.name,
            "product": product.name,
            "version": release.version,
            "selector": spec.selector.as_json(),
            "phases": [
                {"percent": p.percent} if p.tag is None else {"tag": p.tag} for p in spec.phases
            ],
            "failure_gate_percent": spec.failure_gate_percent,
            "min_soak_s": spec.min_soak_s,
            "allow_downgrade": spec.allow_downgrade,
            "devices": len(members),
            "skipped": {"current": selection.current, "revoked": selection.revoked},
        },
    )
    # Last: the director is not transactional, so everything that
    # can refuse the deployment has refused it by now.
    target = rollouts.release_target(ctx, session, deployment)
    changed = rollouts.start_phase(ctx, session, deployment, 0, now, target)
    return deployment_status(session, deployment), changed


def routes(ctx: HubContext) -> list[BaseRoute]:
    """Deployments: create, list, show, pause, resume, abort."""

    async def create(request: Request) -> Response:
        who = await authorize(ctx, request, Role.OPERATOR, "creating a deployment")
        spec = parse_spec(await web.read_json(request))

        def work() -> tuple[dict[str, Any], list[str]]:
            with ctx.transaction() as session:
                return create_deployment(ctx, session, who, spec, now=ctx.clock())

        status, changed = await web.run(work)
        rollouts.notify(changed)
        return JSONResponse(status, 201)

    async def list_deployments(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "listing deployments")
        wanted = Query(request, allowed=("status",)).choice("status", _STATUSES)

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                stmt = (
                    select(Deployment, Product.name, Release.version)
                    .join(Product, Product.id == Deployment.product_id)
                    .join(Release, Release.id == Deployment.release_id)
                    .where(Deployment.org_id == who.org_id)
                    .options(selectinload(Deployment.phases))
                    .order_by(Deployment.id.desc())
                )
                if wanted is not None:
                    stmt = stmt.where(Deployment.status == DeploymentStatus(wanted))
                rows = session.execute(stmt).all()
                sizes: dict[int, int] = dict(
                    session.execute(
                        select(DeploymentDevice.deployment_id, func.count())
                        .where(DeploymentDevice.deployment_id.in_([d.id for d, _, _ in rows]))
                        .group_by(DeploymentDevice.deployment_id)
                    ).all()
                )
                return [
                    {
                        "id": d.id,
                        "name": d.name,
                        "product": product,
                        "version": version,
                        "status": str(d.status),
                        "paused_reason": d.paused_reason,
                        "current_phase": d.current_phase,
                        "phases": len(d.phases),
                        "devices": sizes.get(d.id, 0),
                        "created": rfc3339(d.created),
                        "created_by": d.created_by,
                    }
                    for d, product, version in rows
                ]

        return JSONResponse({"items": await web.run(work)})

    async def show(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading a deployment")
        Query(request, allowed=())

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                deployment = find_deployment(session, who, request.path_params["id"], lock=False)
                return deployment_status(session, deployment)

        return JSONResponse(await web.run(work))

    Change = Callable[[Session, Deployment, Principal, Body], list[str]]

    def transition(
        doing: str, settled: DeploymentStatus, change: Change, optional: tuple[str, ...] = ()
    ) -> Callable[[Request], Awaitable[Response]]:
        """An action on one deployment: ``change`` unless already ``settled`` (idempotent)."""

        async def endpoint(request: Request) -> Response:
            who = await authorize(ctx, request, Role.OPERATOR, f"{doing} a deployment")
            body = Body(await _optional_json(request), optional=optional)

            def work() -> tuple[dict[str, Any], list[str]]:
                with ctx.transaction() as session:
                    deployment = find_deployment(session, who, request.path_params["id"], lock=True)
                    changed: list[str] = []
                    # Asking again changes nothing (a pause's first reason stands).
                    if deployment.status != settled:
                        changed = change(session, deployment, who, body)
                    return deployment_status(session, deployment), changed

            status, changed = await web.run(work)
            rollouts.notify(changed)
            return JSONResponse(status)

        return endpoint

    def pause(session: Session, deployment: Deployment, who: Principal, body: Body) -> list[str]:
        reason = body.optional_string("reason", max_chars=_MAX_REASON_CHARS)
        return rollouts.pause(
            ctx, session, deployment, by=who, reason=reason or f"paused by {who.actor}",
            now=ctx.clock(),
        )  # fmt: skip

    def resume(session: Session, deployment: Deployment, who: Principal, body: Body) -> list[str]:
        return rollouts.resume(ctx, session, deployment, by=who, now=ctx.clock())

    def abort(session: Session, deployment: Deployment, who: Principal, body: Body) -> list[str]:
        return rollouts.abort(ctx, session, deployment, by=who, now=ctx.clock())

    return [
        route("/deployments", create, "POST"),
        route("/deployments", list_deployments, "GET"),
        route("/deployments/{id:int}", show, "GET"),
        route(
            "/deployments/{id:int}/pause",
            transition("pausing", DeploymentStatus.PAUSED, pause, optional=("reason",)),
            "POST",
        ),
        route(
            "/deployments/{id:int}/resume",
            transition("resuming", DeploymentStatus.ACTIVE, resume),
            "POST",
        ),
        route(
            "/deployments/{id:int}/abort",
            transition("aborting", DeploymentStatus.ABORTED, abort),
            "POST",
        ),
    ]


async def _optional_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; no body at all counts as ``{}`` (the CLI sends either).

    Raises:
        PayloadTooLarge: over the JSON limit.
        UserInputError: not a JSON object.
    """
    raw = await web.read_body(request, web.MAX_JSON_BYTES)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserInputError("the request body is not valid JSON") from e
    if not isinstance(doc, dict):
        raise UserInputError("the request body must be a JSON object")
    return doc
