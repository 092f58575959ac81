"""The fleet: listing and selecting devices, one device, its tags, revocation, deletion, events.

Deletion keeps the row: a device id that existed can never enroll again
(the gateway refuses an id it has a row for), which is the point, since a
cloned or stolen device would otherwise come back under the same name. So
``DELETE`` revokes the device (the gateway refuses its certificate), drops
what describes it (tags, slots, events) and marks it with the reserved tag
:data:`~skylift.hub.api.common.DELETED_TAG`, which hides it from every list
and lookup here. Its deployment rows stay, so that deployment history still
adds up; the audit log records who deleted it.

The list filters run as index probes on both databases (device_tags'
``(tag, device_id)``, device_slots, the devices indexes) and page by keyset
on the device's surrogate id, never ``OFFSET``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session, selectinload
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from skylift.errors import UserInputError
from skylift.hub import gateway, web
from skylift.hub.api.common import (
    DELETED_TAG,
    MAX_BIGINT_ID,
    MAX_INT_ID,
    MAX_TIME_KEY,
    PRODUCT_NAME,
    TAG,
    Body,
    Query,
    authorize,
    device_visible,
    find_device,
    next_cursor,
    rfc3339,
    route,
    time_from_key,
    time_key,
)
from skylift.hub.auth import Role
from skylift.hub.db.models import (
    Deployment,
    DeploymentDevice,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    Product,
)
from skylift.hub.web import HubContext, Principal

__all__ = [
    "MAX_TAGS",
    "device_deployments",
    "device_json",
    "event_json",
    "revoke",
    "routes",
    "set_tags",
]

#: Tags per device: enough for site, ring, customer and a few more.
MAX_TAGS = 64
#: Tags one list request may require (all of them).
_MAX_TAG_FILTERS = 16
#: A device page shows its newest deployments; older ones are in each deployment.
_MAX_DEPLOYMENTS_SHOWN = 50
_MAX_REASON_CHARS = 1024
_STATES = tuple(s.value for s in DeviceState)
_LIST_PARAMS = (
    "product", "tag", "hardware", "version", "state", "seen_since", "seen_before", "q",
    "limit", "cursor",
)  # fmt: skip


def device_json(device: Device) -> dict[str, Any]:
    """A device as lists and pages show it (product, tags and slots must be loaded)."""
    return {
        "device_id": device.device_id,
        "product": device.product.name,
        "hardware_id": device.hardware_id,
        "tags": [t.tag for t in device.tags],
        "slots": {s.slot_class: s.version for s in device.slots},
        "state": str(device.state),
        "state_reason": device.state_reason,
        "progress": device.progress,
        "last_seen": rfc3339(device.last_seen),
        "revoked": device.revoked,
        "revoked_at": rfc3339(device.revoked_at),
        "revoke_reason": device.revoke_reason,
        "certificate": {
            "fingerprint": device.cert_fingerprint,
            "not_after": rfc3339(device.cert_not_after),
        },
        "enrolled_via": str(device.enrolled_via),
        "created": rfc3339(device.created),
    }


def device_deployments(session: Session, device: Device) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            Deployment.id,
            Deployment.name,
            Deployment.status,
            DeploymentDevice.phase,
            DeploymentDevice.status,
            DeploymentDevice.reason,
        )
        .join(DeploymentDevice, DeploymentDevice.deployment_id == Deployment.id)
        .where(DeploymentDevice.device_id == device.id, Deployment.org_id == device.org_id)
        .order_by(Deployment.id.desc())
        .limit(_MAX_DEPLOYMENTS_SHOWN)
    )
    return [
        {
            "id": dep_id,
            "name": name,
            "status": str(status),
            "phase": phase,
            "device_status": str(device_status),
            "device_reason": reason,
        }
        for dep_id, name, status, phase, device_status, reason in rows
    ]


def event_json(event: DeviceEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "report_id": event.report_id,
        "kind": event.kind,
        "state": None if event.state is None else str(event.state),
        "progress": event.progress,
        "result": event.result,
        "reason": event.reason,
        "details": event.details,
        "created": rfc3339(event.created),
        "device_time": rfc3339(event.device_time),
    }


def set_tags(session: Session, who: Principal, device: Device, tags: list[str]) -> None:
    """Make ``tags`` the device's tags (validated by the caller), audited if they change."""
    before = {t.tag for t in device.tags}
    wanted = set(tags)
    for t in list(device.tags):
        if t.tag not in wanted:
            device.tags.remove(t)  # delete-orphan: the row goes
    for tag in sorted(wanted - before):
        device.tags.append(DeviceTag(tag=tag))
    if wanted != before:
        web.audit(
            session,
            who,
            "device.tags",
            "device",
            device.device_id,
            {
                "tags": sorted(wanted),
                "added": sorted(wanted - before),
                "removed": sorted(before - wanted),
            },
        )
    session.flush()


def revoke(session: Session, who: Principal, device: Device, reason: str, *, now: datetime) -> None:
    """Revoke ``device`` for ``reason``, audited; revoking twice changes nothing.

    The caller tells the gateway after the commit (``gateway.invalidate``).
    """
    # The first time and reason stand.
    if not device.revoked:
        device.revoked = True
        device.revoked_at = now
        device.revoke_reason = reason
        web.audit(session, who, "device.revoke", "device", device.device_id, {"reason": reason})


def routes(ctx: HubContext) -> list[BaseRoute]:
    """Devices: list, show, tags, revoke, delete, events."""

    async def list_devices(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "listing devices")
        query = Query(request, allowed=_LIST_PARAMS, repeatable=("tag",))
        product = query.string("product", pattern=PRODUCT_NAME)
        tags = query.strings("tag", pattern=TAG, max_items=_MAX_TAG_FILTERS)
        hardware = query.string("hardware")
        version = query.string("version")
        state = query.choice("state", _STATES)
        seen_since, seen_before = query.time("seen_since"), query.time("seen_before")
        text = query.string("q")
        limit = query.limit()
        after = query.cursor("devices", (MAX_INT_ID,))

        stmt = select(Device).where(device_visible(who.org_id))
        if product is not None:
            # An unknown product selects nothing, like any other filter.
            stmt = stmt.where(
                Device.product_id.in_(
                    select(Product.id).where(Product.org_id == who.org_id, Product.name == product)
                )
            )
        for tag in tags:
            stmt = stmt.where(
                Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag))
            )
        if hardware is not None:
            stmt = stmt.where(Device.hardware_id == hardware)
        if version is not None:
            # Any slot class running that version (rootfs, app, ...).
            stmt = stmt.where(
                Device.id.in_(select(DeviceSlot.device_id).where(DeviceSlot.version == version))
            )
        if state is not None:
            stmt = stmt.where(Device.state == DeviceState(state))
        if seen_since is not None:
            stmt = stmt.where(Device.last_seen >= seen_since)
        if seen_before is not None:
            stmt = stmt.where(Device.last_seen < seen_before)
        if text is not None:
            # lower() on both sides: PostgreSQL's LIKE is case-sensitive,
            # SQLite's is not; autoescape makes % and _ in the text literal.
            stmt = stmt.where(func.lower(Device.device_id).contains(text.lower(), autoescape=True))
        if after is not None:
            stmt = stmt.where(Device.id > after[0])
        stmt = (
            stmt.options(
                selectinload(Device.product), selectinload(Device.tags), selectinload(Device.slots)
            )
            .order_by(Device.id)
            .limit(limit + 1)
        )

        def work() -> tuple[list[dict[str, Any]], str | None]:
            with ctx.transaction() as session:
                rows = list(session.scalars(stmt))
                page, cursor = next_cursor(rows, limit, "devices", lambda d: (d.id,))
                return [device_json(d) for d in page], cursor

        items, cursor = await web.run(work)
        return JSONResponse({"items": items, "next_cursor": cursor})

    async def show_device(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading a device")
        Query(request, allowed=())

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                device = find_device(session, who, request.path_params["device_id"])
                return {**device_json(device), "deployments": device_deployments(session, device)}

        return JSONResponse(await web.run(work))

    async def put_tags(request: Request) -> Response:
        who = await authorize(ctx, request, Role.OPERATOR, "tagging a device")
        Query(request, allowed=())
        body = Body(await web.read_json(request), required=("tags",))
        tags = body.strings("tags", pattern=TAG, max_items=MAX_TAGS)

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                device = find_device(session, who, request.path_params["device_id"])
                set_tags(session, who, device, tags)
                session.refresh(device, ["tags"])
                return device_json(device)

        return JSONResponse(await web.run(work))

    async def revoke_device(request: Request) -> Response:
        who = await authorize(ctx, request, Role.OPERATOR, "revoking a device")
        Query(request, allowed=())
        body = Body(await web.read_json(request), required=("reason",))
        reason = body.string("reason", max_chars=_MAX_REASON_CHARS).strip()
        if not reason:
            raise UserInputError("reason must say why the device is revoked")

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                device = find_device(session, who, request.path_params["device_id"])
                revoke(session, who, device, reason, now=ctx.clock())
                return device_json(device)

        answer = await web.run(work)
        # This process refuses the device's next request at once; the others
        # within a second (they re-read devices.revoked_at).
        gateway.invalidate(answer["device_id"])
        return JSONResponse(answer)

    async def delete_device(request: Request) -> Response:
        who = await authorize(ctx, request, Role.ADMIN, "deleting a device")
        Query(request, allowed=())

        def work() -> str:
            with ctx.transaction() as session:
                device = find_device(session, who, request.path_params["device_id"])
                was_revoked = device.revoked
                if not device.revoked:
                    device.revoked = True
                    device.revoked_at = ctx.clock()
                    device.revoke_reason = "deleted"
                for table in (DeviceTag, DeviceSlot, DeviceEvent):
                    session.execute(delete(table).where(table.device_id == device.id))
                session.add(DeviceTag(device_id=device.id, tag=DELETED_TAG))
                web.audit(
                    session,
                    who,
                    "device.delete",
                    "device",
                    device.device_id,
                    {
                        "product": device.product.name,
                        "hardware_id": device.hardware_id,
                        "was_revoked": was_revoked,
                    },
                )
                return device.device_id

        gateway.invalidate(await web.run(work))
        return Response(status_code=204)

    async def device_events(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "reading device events")
        query = Query(request, allowed=("limit", "cursor"))
        limit = query.limit()
        after = query.cursor("events", (MAX_TIME_KEY, MAX_BIGINT_ID))

        def work() -> tuple[list[dict[str, Any]], str | None]:
            with ctx.transaction() as session:
                device = find_device(session, who, request.path_params["device_id"])
                # Newest first by the hub's clock; the (device_id, created)
                # index serves it, the id breaks ties.
                stmt = select(DeviceEvent).where(DeviceEvent.device_id == device.id)
                if after is not None:
                    created = time_from_key(after[0])
                    stmt = stmt.where(
                        or_(
                            DeviceEvent.created < created,
                            and_(DeviceEvent.created == created, DeviceEvent.id < after[1]),
                        )
                    )
                stmt = stmt.order_by(DeviceEvent.created.desc(), DeviceEvent.id.desc())
                rows = list(session.scalars(stmt.limit(limit + 1)))
            page, cursor = next_cursor(rows, limit, "events", lambda e: (time_key(e.created), e.id))
            return [event_json(e) for e in page], cursor

        items, cursor = await web.run(work)
        return JSONResponse({"items": items, "next_cursor": cursor})

    return [
        route("/devices", list_devices, "GET"),
        route("/devices/{device_id}", show_device, "GET"),
        route("/devices/{device_id}", delete_device, "DELETE"),
        route("/devices/{device_id}/tags", put_tags, "PUT"),
        route("/devices/{device_id}/revoke", revoke_device, "POST"),
        route("/devices/{device_id}/events", device_events, "GET"),
    ]
