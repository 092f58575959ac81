"""Fleet bandwidth accounting: what devices downloaded against the size of what they installed.

Each device's ``installed``/``committed`` report carries ``downloaded_bytes``
(pack bytes fetched from the hub, range gaps included) and ``image_bytes``
(the size of the payloads it wrote); the gateway keeps both on the device's
row of the deployment (:class:`~skylift.hub.db.models.DeploymentDevice`).
Totals per deployment and per release are one aggregate each. "Saved" is
against downloading every image whole, uncompressed, as a device without
delta delivery would.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from skylift.hub.db.models import Deployment, DeploymentDevice

__all__ = ["by_release", "for_deployment", "totals_json"]


def totals_json(devices: int, downloaded: int, image: int) -> dict[str, Any]:
    """The API's form of one set of totals (``saved_percent`` None without a report)."""
    return {
        "devices": devices,
        "downloaded_bytes": downloaded,
        "image_bytes": image,
        "saved_bytes": image - downloaded,
        "saved_percent": round(100 * (image - downloaded) / image, 1) if image else None,
    }


def _totals(session: Session, *where: ColumnElement[bool]) -> dict[str, Any]:
    dd = DeploymentDevice
    devices, downloaded, image = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(dd.downloaded_bytes), 0),
            func.coalesce(func.sum(dd.image_bytes), 0),
        ).where(dd.downloaded_bytes.is_not(None), *where)
    ).one()
    return totals_json(int(devices), int(downloaded or 0), int(image or 0))


def for_deployment(session: Session, deployment_id: int) -> dict[str, Any]:
    """The totals of the devices of one deployment that reported their sizes."""
    return _totals(session, DeploymentDevice.deployment_id == deployment_id)


def by_release(session: Session, release_ids: Collection[int]) -> dict[int, dict[str, Any]]:
    """The totals of every deployment of each release in ``release_ids`` (all of them present)."""
    dd = DeploymentDevice
    out = {rid: totals_json(0, 0, 0) for rid in release_ids}
    if not release_ids:
        return out
    rows = session.execute(
        select(
            Deployment.release_id,
            func.count(),
            func.coalesce(func.sum(dd.downloaded_bytes), 0),
            func.coalesce(func.sum(dd.image_bytes), 0),
        )
        .join(Deployment, Deployment.id == dd.deployment_id)
        .where(dd.downloaded_bytes.is_not(None), Deployment.release_id.in_(list(release_ids)))
        .group_by(Deployment.release_id)
    )
    for release_id, devices, downloaded, image in rows:
        if release_id is not None:
            out[release_id] = totals_json(int(devices), int(downloaded or 0), int(image or 0))
    return out
