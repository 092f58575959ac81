"""``POST /device/v1/reports``: what devices say about their updates, stored exactly once.

Agents queue reports on disk and send them again until the hub confirms, so
the same ``report_id`` arrives more than once. Storing is idempotent per
device, portably on SQLite and PostgreSQL (no ``ON CONFLICT`` dialects): the
ids already stored are selected in one query, the rest inserted; a
concurrent request that inserted one of them in between makes the insert
fail on the unique ``(device_id, report_id)``, and the whole batch is tried
once more, which then sees it as a duplicate.

Besides the event rows, the newest report updates the device's state, and
its state moves the device's rows in active or paused deployments, which the
rollout engine (``skylift.hub.rollouts``) reads for its failure gates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from skylift.errors import UserInputError
from skylift.hub.db.models import (
    Deployment,
    DeploymentDevice,
    DeploymentStatus,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    Release,
    RolloutStatus,
)
from skylift.hub.web import Conflict, HubContext

__all__ = [
    "MAX_DETAILS_BYTES",
    "MAX_REASON_CHARS",
    "MAX_REPORTS",
    "ROLLOUT_STATUS",
    "Report",
    "parse_reports",
    "store_reports",
]

MAX_REPORTS = 100
MAX_REASON_CHARS = 2000
#: The largest byte count a report's sizes may give (an exabyte: anything above is a lie).
_MAX_SIZE = 2**60
#: ``details`` serialised as compact JSON.
MAX_DETAILS_BYTES = 16 * 1024

#: What a device's reported state means for its row in a deployment.
ROLLOUT_STATUS: dict[DeviceState, RolloutStatus] = {
    DeviceState.DOWNLOADING: RolloutStatus.DOWNLOADING,
    # Still on its way: writing the slot counts as in progress, like downloading.
    DeviceState.INSTALLING: RolloutStatus.DOWNLOADING,
    DeviceState.INSTALLED: RolloutStatus.INSTALLED,
    DeviceState.REBOOTING: RolloutStatus.INSTALLED,
    DeviceState.TRIAL: RolloutStatus.INSTALLED,
    DeviceState.COMMITTED: RolloutStatus.COMMITTED,
    DeviceState.FAILED: RolloutStatus.FAILED,
    DeviceState.ROLLED_BACK: RolloutStatus.ROLLED_BACK,
}

_REPORT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHORT = re.compile(r"[\x21-\x7e]{1,32}")  # printable ASCII, no spaces
_FIELDS = frozenset(
    {"report_id", "kind", "state", "progress", "result", "reason", "details", "device_time"}
)
_SLOT_CLASS = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_MAX_TIME_CHARS = 40


@dataclass(frozen=True)
class Report:
    """One validated report."""

    report_id: str
    kind: str
    state: DeviceState | None = None
    progress: int | None = None
    result: str | None = None
    reason: str | None = None
    details: dict[str, Any] | None = None
    device_time: datetime | None = None

    @property
    def slot(self) -> tuple[str, str] | None:
        """``(slot_class, version)`` a committed report's details name, if any."""
        if self.state is not DeviceState.COMMITTED or not self.details:
            return None
        slot_class, version = self.details.get("slot_class"), self.details.get("version")
        if isinstance(slot_class, str) and isinstance(version, str):
            return slot_class, version
        return None

    @property
    def sizes(self) -> tuple[int, int] | None:
        """``(downloaded_bytes, image_bytes)`` an installed or committed report names, if valid.

        The details are the device's word, free-form: sizes that are not
        integers in range are left out of the accounting (the event keeps them).
        """
        details = self.details or {}
        down, image = details.get("downloaded_bytes"), details.get("image_bytes")
        if self.state not in (DeviceState.INSTALLED, DeviceState.COMMITTED):
            return None
        if not all(type(v) is int and 0 <= v <= _MAX_SIZE for v in (down, image)):
            return None
        assert isinstance(down, int)
        assert isinstance(image, int)
        return down, image

    @property
    def version(self) -> str | None:
        """The release version the report is about, when its details say."""
        value = (self.details or {}).get("version")
        return value if isinstance(value, str) else None


def _fail(index: int, message: str) -> UserInputError:
    return UserInputError(f"reports[{index}]: {message}")


def _parse_time(value: Any, index: int) -> datetime:
    if not isinstance(value, str) or len(value) > _MAX_TIME_CHARS:
        raise _fail(index, "device_time must be an RFC 3339 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _fail(index, "device_time must be an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise _fail(index, "device_time needs a time zone (Z)")
    return parsed.astimezone(UTC)


def _parse_one(doc: Any, index: int) -> Report:
    if not isinstance(doc, dict):
        raise _fail(index, "a report is a JSON object")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _fail(index, f"unknown field {unknown[0][:40]!r}")
    report_id, kind = doc.get("report_id"), doc.get("kind")
    if not isinstance(report_id, str) or not _REPORT_ID.fullmatch(report_id):
        raise _fail(index, "report_id must be 1-64 characters from A-Z a-z 0-9 . _ -")
    if not isinstance(kind, str) or not _SHORT.fullmatch(kind):
        raise _fail(index, "kind must be 1-32 printable characters")
    state = None
    if doc.get("state") is not None:
        try:
            state = DeviceState(doc["state"])
        except ValueError:
            raise _fail(index, "state is not an agent state") from None
    progress = doc.get("progress")
    if progress is not None and (
        type(progress) is not int or not 0 <= progress <= 100  # bool is not a progress
    ):
        raise _fail(index, "progress must be an integer from 0 to 100")
    result = doc.get("result")
    if result is not None and (not isinstance(result, str) or not _SHORT.fullmatch(result)):
        raise _fail(index, "result must be 1-32 printable characters")
    reason = doc.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise _fail(index, f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    details = doc.get("details")
    if details is not None:
        if not isinstance(details, dict):
            raise _fail(index, "details must be a JSON object")
        size = len(json.dumps(details, separators=(",", ":")).encode())
        if size > MAX_DETAILS_BYTES:
            raise _fail(index, f"details are {size} bytes; at most {MAX_DETAILS_BYTES}")
    device_time = None
    if doc.get("device_time") is not None:
        device_time = _parse_time(doc["device_time"], index)
    report = Report(report_id, kind, state, progress, result, reason, details, device_time)
    slot = report.slot
    if slot is not None and (not _SLOT_CLASS.fullmatch(slot[0]) or not _VERSION.fullmatch(slot[1])):
        raise _fail(index, "details.slot_class or details.version is not valid")
    return report


def parse_reports(doc: dict[str, Any]) -> list[Report]:
    """The reports of a ``POST /reports`` body, all validated before any is stored.

    Raises:
        UserInputError: the body or any report is malformed (nothing is stored).
    """
    if set(doc) != {"reports"} or not isinstance(doc["reports"], list):
        raise UserInputError('the body must be {"reports": [...]}')
    items = doc["reports"]
    if len(items) > MAX_REPORTS:
        raise UserInputError(f"{len(items)} reports in one request; at most {MAX_REPORTS}")
    return [_parse_one(item, i) for i, item in enumerate(items)]


def store_reports(ctx: HubContext, device_pk: int, reports: list[Report]) -> tuple[int, int]:
    """Store the reports not stored before; ``(stored, duplicates)``. Blocking.

    Raises:
        Conflict: the same reports were being stored concurrently twice over.
    """
    for attempt in range(2):
        try:
            with ctx.transaction() as session:
                return _store(ctx, session, device_pk, reports)
        except IntegrityError:
            if attempt:
                raise Conflict("reports were stored concurrently; send them again") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _store(
    ctx: HubContext, session: Session, device_pk: int, reports: list[Report]
) -> tuple[int, int]:
    now = ctx.clock()
    ids = {r.report_id for r in reports}
    seen = set(
        session.scalars(
            select(DeviceEvent.report_id).where(
                DeviceEvent.device_id == device_pk, DeviceEvent.report_id.in_(ids)
            )
        )
    )
    new: list[Report] = []
    for report in reports:
        if report.report_id not in seen:
            seen.add(report.report_id)  # the same id twice in one batch counts once
            new.append(report)
    if not new:
        return 0, len(reports)
    session.add_all(
        DeviceEvent(
            device_id=device_pk,
            report_id=r.report_id,
            kind=r.kind,
            state=r.state,
            progress=r.progress,
            result=r.result,
            reason=r.reason,
            details=r.details,
            created=now,
            device_time=r.device_time,
        )
        for r in new
    )
    session.flush()
    values: dict[str, Any] = {"last_report_at": now, "last_seen": now}
    with_state = [r for r in new if r.state is not None]
    if with_state:
        newest = with_state[-1]  # agents send their queue in order
        values |= {
            "state": newest.state,
            "state_reason": newest.reason,
            "progress": newest.progress,
        }
        _move_rollouts(session, device_pk, newest)
    session.execute(
        update(Device)
        .where(Device.id == device_pk)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    for r in new:
        if r.slot is not None:
            _set_slot(session, device_pk, *r.slot, now=now)
        _record_sizes(session, device_pk, r)
    return len(new), len(reports) - len(new)


def _move_rollouts(session: Session, device_pk: int, report: Report) -> None:
    assert report.state is not None
    status = ROLLOUT_STATUS.get(report.state)
    if status is None:
        return
    deployments = _live_deployments(report)
    statement = update(DeploymentDevice).where(
        DeploymentDevice.device_id == device_pk,
        DeploymentDevice.deployment_id.in_(deployments),
    )
    if status in (RolloutStatus.DOWNLOADING, RolloutStatus.INSTALLED):
        # A late progress report must not take back a commit.
        statement = statement.where(DeploymentDevice.status != RolloutStatus.COMMITTED)
    session.execute(
        statement.values(status=status, reason=report.reason).execution_options(
            synchronize_session=False
        )
    )


def _live_deployments(report: Report) -> Select[int]:
    """The live deployments a report is about: of its release when it names a version.

    (A device in two live deployments: only the one the report is about moves.)
    """
    deployments = select(Deployment.id).where(
        Deployment.status.in_([DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED])
    )
    if report.version is not None:
        deployments = deployments.join(Release, Release.id == Deployment.release_id).where(
            Release.version == report.version
        )
    return deployments


def _record_sizes(session: Session, device_pk: int, report: Report) -> None:
    """Keep what an installed/committed report says the device downloaded, on its rollout row.

    Every report of a batch counts here, not only the newest: a device that
    rolled back sends ``installed`` and ``rolled_back`` together after its
    reboot, and its download was spent all the same.
    """
    sizes = report.sizes
    if sizes is None:
        return
    deployments = _live_deployments(report)
    session.execute(
        update(DeploymentDevice)
        .where(
            DeploymentDevice.device_id == device_pk,
            DeploymentDevice.deployment_id.in_(deployments),
        )
        .values(downloaded_bytes=sizes[0], image_bytes=sizes[1])
        .execution_options(synchronize_session=False)
    )


def _set_slot(
    session: Session, device_pk: int, slot_class: str, version: str, *, now: datetime
) -> None:
    slot = session.get(DeviceSlot, (device_pk, slot_class))
    if slot is None:
        session.add(
            DeviceSlot(device_id=device_pk, slot_class=slot_class, version=version, updated=now)
        )
    else:
        slot.version = version
        slot.updated = now
    session.flush()
