"""What the dashboard's pages read: one function per page, a bounded number of queries each.

No page issues a query per row: lists fetch their rows, then the tags,
slots or counts of exactly those rows in one query each. Lists page by
keyset (the API's cursors, :mod:`skylift.hub.api.common`), never ``OFFSET``.
Fleet-wide counts are grouped queries over the indexes the models declare
(``devices (org_id, state)``, ``(org_id, last_seen)``, ``device_slots
(slot_class, version, device_id)``), and the adoption chart reads the daily
:class:`~skylift.hub.db.models.VersionCount` rows instead of the event log.
``bench/dashboard.py`` times every page at 100k devices and 1M events.

Tenancy: every query is bounded to the visitor's organisation, with
:func:`~skylift.hub.api.common.device_visible` for devices, as in the API.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from skylift.bundle import BundleError, read_head
from skylift.chunks import ChunkError, PageChainVerifier
from skylift.chunks.index import PAGE_HEADER_SIZE, parse_page_header
from skylift.hub import bandwidth, deltas
from skylift.hub.api.common import DELETED_TAG, encode_cursor
from skylift.hub.content import MAX_INDEX_BYTES, version_segment
from skylift.hub.db.models import (
    AuditEntry,
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    DeploymentStatus,
    Device,
    DeviceEvent,
    DeviceSlot,
    DeviceState,
    DeviceTag,
    Organisation,
    Product,
    ProvisioningKey,
    Release,
    RolloutStatus,
    SignerCA,
    VersionCount,
)
from skylift.hub.repositories import MAX_HEAD_BYTES
from skylift.hub.storage import ObjectStore, StorageError

__all__ = [
    "ADOPTION_DAYS",
    "COUNT_CAP",
    "DeviceFilters",
    "DeviceRow",
    "FleetOverview",
    "ReleaseInfo",
    "audit_page",
    "deployment_failures",
    "deployment_history",
    "deployments_page",
    "device_events",
    "devices_page",
    "fleet_overview",
    "live_deployments",
    "matching_devices",
    "record_version_counts",
    "release_infos",
]

#: The device list counts matches up to this many, then says "more than".
COUNT_CAP = 10_000
#: Days of history the adoption chart shows.
ADOPTION_DAYS = 30
#: Versions the chart draws; the rest are summed as "other".
_CHART_VERSIONS = 6
_SEEN_WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}
_FAILED = (RolloutStatus.FAILED, RolloutStatus.ROLLED_BACK)
_LIVE = (DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED)


def visible(org_id: int) -> ColumnElement[bool]:
    """The devices an organisation sees: :func:`~skylift.hub.api.common.device_visible`'s rule.

    Written as ``NOT IN`` rather than the API's ``NOT EXISTS``: both
    databases compute the (small) set of deleted devices once, from the
    ``(tag, device_id)`` index, instead of probing it once per device, which
    is what a count over the whole fleet would otherwise pay 100k times.
    """
    deleted = select(DeviceTag.device_id).where(DeviceTag.tag == DELETED_TAG)
    return and_(Device.org_id == org_id, Device.id.not_in(deleted))


def _live_devices(org_id: int) -> ColumnElement[bool]:
    """The organisation's devices that count in fleet figures: visible and not revoked."""
    return and_(visible(org_id), Device.revoked.is_(False))


# -- overview -------------------------------------------------------------------------------------


@dataclass
class FleetOverview:
    """The figures of the overview page."""

    devices: int
    revoked: int
    by_state: dict[str, int]
    seen_hour: int
    seen_day: int
    never_seen: int
    by_version: list[tuple[str, str, int]]  # slot class, version, devices
    chart_class: str | None
    chart_days: list[date]
    chart_series: dict[str, list[int]]

    @property
    def failed(self) -> int:
        """Devices whose last report is a failure."""
        return self.by_state.get(DeviceState.FAILED.value, 0)

    @property
    def rolled_back(self) -> int:
        """Devices whose last report is a rollback."""
        return self.by_state.get(DeviceState.ROLLED_BACK.value, 0)


def _version_counts(session: Session, org_id: int) -> list[tuple[str, str, int]]:
    rows = session.execute(
        select(DeviceSlot.slot_class, DeviceSlot.version, func.count())
        .join(Device, Device.id == DeviceSlot.device_id)
        .where(_live_devices(org_id))
        .group_by(DeviceSlot.slot_class, DeviceSlot.version)
    ).all()
    return sorted(((c, v, n) for c, v, n in rows), key=lambda r: (r[0], -r[2], r[1]))


def record_version_counts(session: Session, org_id: int, day: date) -> int:
    """Write today's (``day``'s) devices per version for ``org_id``; how many rows.

    Replaces that day's rows: a later run of the same day has the newer
    figures. Two hub processes doing it at once: one of them fails on the
    primary key and leaves the other's rows, which are as recent.
    """
    counts = _version_counts(session, org_id)
    try:
        with session.begin_nested():
            session.execute(
                delete(VersionCount).where(VersionCount.org_id == org_id, VersionCount.day == day)
            )
            session.add_all(
                VersionCount(org_id=org_id, day=day, slot_class=c, version=v, devices=n)
                for c, v, n in counts
            )
            session.flush()
    except IntegrityError:
        return 0
    return len(counts)


def record_all_version_counts(session: Session, day: date) -> int:
    """:func:`record_version_counts` for every organisation."""
    return sum(
        record_version_counts(session, org_id, day)
        for org_id in session.scalars(select(Organisation.id))
    )


def fleet_overview(session: Session, org_id: int, now: datetime) -> FleetOverview:
    """Fleet figures for the overview page: four grouped queries."""
    live = _live_devices(org_id)
    # One pass over the fleet for states and last-seen times.
    by_state: dict[str, int] = {}
    seen_hour = seen_day = never = 0
    for state, n, in_hour, in_day, unseen in session.execute(
        select(
            Device.state,
            func.count(),
            func.count().filter(Device.last_seen >= now - timedelta(hours=1)),
            func.count().filter(Device.last_seen >= now - timedelta(days=1)),
            func.count().filter(Device.last_seen.is_(None)),
        )
        .where(live)
        .group_by(Device.state)
    ):
        by_state[str(state)] = n
        seen_hour, seen_day, never = seen_hour + in_hour, seen_day + in_day, never + unseen
    revoked = session.scalar(select(func.count()).where(visible(org_id), Device.revoked.is_(True)))
    by_version = _version_counts(session, org_id)
    # The chart follows the slot class most devices report (rootfs, typically).
    per_class: dict[str, int] = defaultdict(int)
    for c, _, n in by_version:
        per_class[c] += n
    chart_class = max(per_class, key=lambda c: (per_class[c], c)) if per_class else None
    today = now.date()
    days = [today - timedelta(days=ADOPTION_DAYS - 1 - i) for i in range(ADOPTION_DAYS)]
    history: dict[date, dict[str, int]] = defaultdict(dict)
    if chart_class is not None:
        for day, version, n in session.execute(
            select(VersionCount.day, VersionCount.version, VersionCount.devices).where(
                VersionCount.org_id == org_id,
                VersionCount.slot_class == chart_class,
                VersionCount.day >= days[0],
                VersionCount.day < today,
            )
        ):
            history[day][version] = n
        # Today is what the fleet runs now, not the last snapshot.
        history[today] = {v: n for c, v, n in by_version if c == chart_class}
    shown = [d for d in days if d in history]
    totals: dict[str, int] = defaultdict(int)
    for d in shown:
        for v, n in history[d].items():
            totals[v] += n
    top = sorted(totals, key=lambda v: (-totals[v], v))[:_CHART_VERSIONS]
    series: dict[str, list[int]] = {v: [history[d].get(v, 0) for d in shown] for v in top}
    rest = [sum(n for v, n in history[d].items() if v not in top) for d in shown]
    if any(rest):
        series["other"] = rest
    return FleetOverview(
        devices=sum(by_state.values()),
        revoked=revoked or 0,
        by_state=by_state,
        seen_hour=seen_hour,
        seen_day=seen_day,
        never_seen=never,
        by_version=by_version,
        chart_class=chart_class,
        chart_days=shown,
        chart_series=series,
    )


# -- devices --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFilters:
    """The device list's filters, validated by the page."""

    q: str | None = None
    product: str | None = None
    tags: tuple[str, ...] = ()
    hardware: str | None = None
    version: str | None = None
    state: str | None = None
    seen: str | None = None  # 1h, 24h, 7d, stale, never

    def where(self, org_id: int, now: datetime) -> list[ColumnElement[bool]]:
        """The filters as WHERE clauses (index probes, as the API's list)."""
        where = [visible(org_id)]
        if self.product is not None:
            where.append(
                Device.product_id.in_(
                    select(Product.id).where(Product.org_id == org_id, Product.name == self.product)
                )
            )
        for tag in self.tags:
            where.append(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
        if self.hardware is not None:
            where.append(Device.hardware_id == self.hardware)
        if self.version is not None:
            where.append(
                Device.id.in_(
                    select(DeviceSlot.device_id).where(DeviceSlot.version == self.version)
                )
            )
        if self.state == "revoked":
            where.append(Device.revoked.is_(True))
        elif self.state is not None:
            where.append(Device.state == DeviceState(self.state))
        if self.seen in _SEEN_WINDOWS:
            where.append(Device.last_seen >= now - _SEEN_WINDOWS[self.seen])
        elif self.seen == "stale":
            where.append(Device.last_seen < now - timedelta(days=1))
        elif self.seen == "never":
            where.append(Device.last_seen.is_(None))
        if self.q is not None:
            where.append(func.lower(Device.device_id).contains(self.q.lower(), autoescape=True))
        return where

    def query(self) -> dict[str, str]:
        """The filters as query parameters (for the next page's link)."""
        out = {
            "q": self.q,
            "product": self.product,
            "tags": " ".join(self.tags) or None,
            "hardware": self.hardware,
            "version": self.version,
            "state": self.state,
            "seen": self.seen,
        }
        return {k: v for k, v in out.items() if v}


@dataclass
class DeviceRow:
    """One line of the device list."""

    device_id: str
    product: str
    hardware_id: str
    state: str
    state_reason: str | None
    last_seen: datetime | None
    revoked: bool
    tags: list[str] = field(default_factory=list)
    slots: dict[str, str] = field(default_factory=dict)


def devices_page(
    session: Session,
    org_id: int,
    filters: DeviceFilters,
    *,
    after: int | None,
    limit: int,
    now: datetime,
) -> tuple[list[DeviceRow], str | None, int | None]:
    """A page of the device list, the next page's cursor, and how many devices match.

    At most four queries whatever the page size: the page, its tags, its
    slots, the count (capped at :data:`COUNT_CAP`; skipped when one page holds
    every match, and for text searches over several pages: None).
    """
    where = filters.where(org_id, now)
    stmt = (
        select(
            Device.id,
            Device.device_id,
            Product.name,
            Device.hardware_id,
            Device.state,
            Device.state_reason,
            Device.last_seen,
            Device.revoked,
        )
        .join(Product, Product.id == Device.product_id)
        .where(*where)
    )
    if after is not None:
        stmt = stmt.where(Device.id > after)
    rows = session.execute(stmt.order_by(Device.id).limit(limit + 1)).all()
    cursor = encode_cursor("devices", (rows[limit - 1][0],)) if len(rows) > limit else None
    rows = rows[:limit]
    page = {
        pk: DeviceRow(d, p, h, str(s), r, seen, revoked)
        for pk, d, p, h, s, r, seen, revoked in rows
    }
    if page:
        for pk, tag in session.execute(
            select(DeviceTag.device_id, DeviceTag.tag)
            .where(DeviceTag.device_id.in_(list(page)))
            .order_by(DeviceTag.tag)
        ):
            page[pk].tags.append(tag)
        for pk, slot_class, version in session.execute(
            select(DeviceSlot.device_id, DeviceSlot.slot_class, DeviceSlot.version)
            .where(DeviceSlot.device_id.in_(list(page)))
            .order_by(DeviceSlot.slot_class)
        ):
            page[pk].slots[slot_class] = version
    if cursor is None and after is None:
        total = len(page)  # it all fits on this page: no count needed
    elif filters.q is not None:
        # A text search is a scan of every id: a count would scan them all
        # again. The page says "more than one page" instead.
        total = None
    else:
        # Counting stops at COUNT_CAP: "10000+" says enough, and an exact count
        # of a 100k fleet per page view would cost more than the page.
        matches = select(Device.id).where(*where).limit(COUNT_CAP + 1).subquery()
        total = session.scalar(select(func.count()).select_from(matches)) or 0
    return list(page.values()), cursor, total


def device_events(
    session: Session, device_pk: int, *, before: tuple[datetime, int] | None, limit: int
) -> tuple[list[DeviceEvent], tuple[datetime, int] | None]:
    """A device's reports, newest first, and the position of the next (older) page."""
    stmt = select(DeviceEvent).where(DeviceEvent.device_id == device_pk)
    if before is not None:
        created, event_id = before
        stmt = stmt.where(
            or_(
                DeviceEvent.created < created,
                and_(DeviceEvent.created == created, DeviceEvent.id < event_id),
            )
        )
    stmt = stmt.order_by(DeviceEvent.created.desc(), DeviceEvent.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    older = (rows[limit - 1].created, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], older


# -- deployments ----------------------------------------------------------------------------------


@dataclass
class DeploymentLine:
    """One deployment in a list, with its devices by rollout status."""

    id: int
    name: str
    product: str
    version: str
    status: str
    paused_reason: str | None
    current_phase: int
    phases: int
    failure_gate_percent: float
    created: datetime
    created_by: str
    counts: dict[str, int]

    @property
    def devices(self) -> int:
        """Devices in the deployment."""
        return sum(self.counts.values())

    @property
    def failures(self) -> int:
        """Devices that failed or rolled back."""
        return self.counts.get("failed", 0) + self.counts.get("rolled_back", 0)


def deployments_page(
    session: Session,
    org_id: int,
    *,
    statuses: Sequence[DeploymentStatus] = (),
    after: int | None = None,
    limit: int = 50,
) -> tuple[list[DeploymentLine], str | None]:
    """Deployments newest first, with per-status device counts: three queries."""
    stmt = (
        select(Deployment, Product.name, Release.version)
        .join(Product, Product.id == Deployment.product_id)
        .join(Release, Release.id == Deployment.release_id)
        .where(Deployment.org_id == org_id)
    )
    if statuses:
        stmt = stmt.where(Deployment.status.in_(list(statuses)))
    if after is not None:
        stmt = stmt.where(Deployment.id < after)
    rows = session.execute(stmt.order_by(Deployment.id.desc()).limit(limit + 1)).all()
    cursor = encode_cursor("deployments", (rows[limit - 1][0].id,)) if len(rows) > limit else None
    rows = rows[:limit]
    ids = [d.id for d, _, _ in rows]
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    phases: dict[int, int] = {}
    if ids:
        for dep_id, status, n in session.execute(
            select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
            .where(DeploymentDevice.deployment_id.in_(ids))
            .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status)
        ):
            counts[dep_id][str(status)] = n
        phases = dict(
            session.execute(
                select(DeploymentPhase.deployment_id, func.count())
                .where(DeploymentPhase.deployment_id.in_(ids))
                .group_by(DeploymentPhase.deployment_id)
            ).all()
        )
    return [
        DeploymentLine(
            id=d.id,
            name=d.name,
            product=product,
            version=version,
            status=str(d.status),
            paused_reason=d.paused_reason,
            current_phase=d.current_phase,
            phases=phases.get(d.id, 0),
            failure_gate_percent=d.failure_gate_percent,
            created=d.created,
            created_by=d.created_by,
            counts=counts.get(d.id, {}),
        )
        for d, product, version in rows
    ], cursor


def live_deployments(session: Session, org_id: int) -> list[DeploymentLine]:
    """Active and paused deployments, for the overview."""
    lines, _ = deployments_page(session, org_id, statuses=_LIVE, limit=20)
    return lines


def deployment_failures(
    session: Session, deployment_id: int, *, limit: int = 50
) -> list[tuple[str, int, str, str | None]]:
    """Devices of a deployment that failed or rolled back: (device id, phase, status, reason)."""
    rows = session.execute(
        select(
            Device.device_id,
            DeploymentDevice.phase,
            DeploymentDevice.status,
            DeploymentDevice.reason,
        )
        .join(Device, Device.id == DeploymentDevice.device_id)
        .where(
            DeploymentDevice.deployment_id == deployment_id,
            DeploymentDevice.status.in_(_FAILED),
        )
        .order_by(DeploymentDevice.updated.desc(), Device.id)
        .limit(limit)
    ).all()
    return [(d, p, str(s), r) for d, p, s, r in rows]


def deployment_history(
    session: Session, org_id: int, deployment_id: int, *, limit: int = 50
) -> list[AuditEntry]:
    """The audit entries of one deployment, newest first (created, paused, resumed, ...)."""
    return list(
        session.scalars(
            select(AuditEntry)
            .where(
                AuditEntry.org_id == org_id,
                AuditEntry.target_type == "deployment",
                AuditEntry.target_id == str(deployment_id),
            )
            .order_by(AuditEntry.id.desc())
            .limit(limit)
        )
    )


def matching_devices(
    session: Session, where: Iterable[ColumnElement[bool]], version: str | None
) -> tuple[int, int]:
    """(devices a selection matches, of which already run ``version``), revoked left out."""
    base = [*where, Device.revoked.is_(False)]
    matched = session.scalar(select(func.count()).select_from(Device).where(*base)) or 0
    current = 0
    if version is not None and matched:
        current = (
            session.scalar(
                select(func.count())
                .select_from(Device)
                .where(
                    *base,
                    Device.id.in_(
                        select(DeviceSlot.device_id).where(DeviceSlot.version == version)
                    ),
                )
            )
            or 0
        )
    return matched, current


# -- audit ----------------------------------------------------------------------------------------


def audit_page(
    session: Session,
    org_id: int,
    *,
    action: str | None,
    actor: str | None,
    target: tuple[str, str] | None,
    since: datetime | None,
    before: tuple[datetime, int] | None,
    limit: int,
) -> tuple[list[AuditEntry], tuple[datetime, int] | None]:
    """Audit entries newest first, filtered; the position of the next page."""
    stmt = select(AuditEntry).where(AuditEntry.org_id == org_id)
    if action is not None:
        stmt = stmt.where(AuditEntry.action == action)
    if actor is not None:
        stmt = stmt.where(AuditEntry.actor == actor)
    if target is not None:
        stmt = stmt.where(AuditEntry.target_type == target[0], AuditEntry.target_id == target[1])
    if since is not None:
        stmt = stmt.where(AuditEntry.created >= since)
    if before is not None:
        created, entry_id = before
        stmt = stmt.where(
            or_(
                AuditEntry.created < created,
                and_(AuditEntry.created == created, AuditEntry.id < entry_id),
            )
        )
    stmt = stmt.order_by(AuditEntry.created.desc(), AuditEntry.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    older = (rows[limit - 1].created, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], older


def audit_actions(session: Session, org_id: int) -> list[str]:
    """The actions the organisation's log holds, for the filter's choices (index-only)."""
    return list(
        session.scalars(
            select(AuditEntry.action)
            .where(AuditEntry.org_id == org_id)
            .group_by(AuditEntry.action)
            .order_by(AuditEntry.action)
        )
    )


# -- keys -----------------------------------------------------------------------------------------


def provisioning_keys(session: Session, org_id: int) -> list[tuple[ProvisioningKey, str]]:
    """The organisation's provisioning keys with their product names."""
    return [
        (k, name)
        for k, name in session.execute(
            select(ProvisioningKey, Product.name)
            .join(Product, Product.id == ProvisioningKey.product_id)
            .where(ProvisioningKey.org_id == org_id)
            .order_by(ProvisioningKey.id)
        )
    ]


def signer_cas(session: Session, org_id: int) -> list[tuple[SignerCA, str | None]]:
    """The organisation's signer CAs with their product names (None: any product)."""
    names = dict(
        session.execute(select(Product.id, Product.name).where(Product.org_id == org_id)).all()
    )
    rows = session.scalars(select(SignerCA).where(SignerCA.org_id == org_id).order_by(SignerCA.id))
    return [(r, names.get(r.product_id) if r.product_id else None) for r in rows]


# -- releases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadInfo:
    """One payload of a release's bundle."""

    name: str
    slot_class: str
    size: int
    chunks: int
    stored: int  # bytes of its chunks as stored (compressed), duplicates counted once


@dataclass(frozen=True)
class ReleaseContentInfo:
    """What a release's bundle holds, read from the object store (immutable: cached)."""

    payloads: tuple[PayloadInfo, ...]
    signer_keyids: tuple[str, ...]
    download: int  # every distinct chunk as stored: a full download
    error: str | None = None


@dataclass
class ReleaseInfo:
    """One release as the releases page shows it."""

    product: str
    version: str
    created: datetime
    created_by: str
    length: int
    payload_size: int
    stored_size: int
    hardware_ids: list[str]
    sha256: str
    content: ReleaseContentInfo
    previous: str | None = None
    delta_download: int | None = None  # bytes a device on `previous` fetches
    bandwidth: dict[str, Any] | None = None  # what the fleet reported (skylift.hub.bandwidth)
    #: The per-pair deltas the hub made (or tried to) for it (skylift.hub.deltas).
    deltas: list[deltas.DeltaSummary] = field(default_factory=list)

    @property
    def delta_saved(self) -> int | None:
        """Bytes a device on the previous release does not fetch."""
        if self.delta_download is None:
            return None
        return self.content.download - self.delta_download


def _read_index(data: bytes, payload: Any) -> dict[bytes, int]:
    chain = PageChainVerifier(
        bytes.fromhex(payload.index.first_page_sha256),
        chunks=payload.chunks,
        payload_length=payload.size,
        max_chunk_bytes=payload.chunking.max_size,
    )
    chunks: dict[bytes, int] = {}
    view, pos = memoryview(data), 0
    while not chain.done:
        body = parse_page_header(
            bytes(view[pos : pos + PAGE_HEADER_SIZE]), max_entries=payload.index.entries_per_page
        )
        page = bytes(view[pos : pos + PAGE_HEADER_SIZE + body])
        pos += len(page)
        for e in chain.accept(page).entries:
            chunks[e.digest] = e.stored_length
    return chunks


def _release_chunks(
    store: ObjectStore, product: str, version: str
) -> tuple[ReleaseContentInfo, dict[bytes, int]]:
    prefix = f"releases/{product}/{version_segment(version)}/"
    try:
        head = read_head(io.BytesIO(store.get(prefix + "head", max_bytes=MAX_HEAD_BYTES)))
        # The hub verified the signatures when it took the release in.
        manifest = head.unverified_manifest()
        keyids = tuple(sorted({s.keyid for s in head.signatures}))
        chunks: dict[bytes, int] = {}
        payloads = []
        for p in manifest.payloads:
            data = store.get(prefix + f"{p.name}.index", max_bytes=MAX_INDEX_BYTES)
            mine = _read_index(data, p)
            chunks |= mine
            payloads.append(PayloadInfo(p.name, p.slot_class, p.size, p.chunks, sum(mine.values())))
    except (StorageError, BundleError, ChunkError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0][:200]
        return ReleaseContentInfo((), (), 0, f"content unreadable: {message}"), {}
    return ReleaseContentInfo(tuple(payloads), keyids, sum(chunks.values())), chunks


class ReleaseCache:
    """Release contents and deltas by (product, version): releases never change once published.

    Bounded: at most ``max_entries`` of each; the oldest go first.
    """

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self.contents: dict[tuple[str, str], ReleaseContentInfo] = {}
        self.deltas: dict[tuple[str, str, str], int] = {}

    def _bound(self, table: dict[Any, Any]) -> None:
        while len(table) > self.max_entries:
            del table[next(iter(table))]

    def compute(
        self, store: ObjectStore, product: str, versions: Sequence[str]
    ) -> dict[str, tuple[ReleaseContentInfo, int | None]]:
        """Content of each of ``versions`` (oldest first) and the delta from the one before.

        The store is read only for what the cache lacks: once warm, nothing.
        """
        out: dict[str, tuple[ReleaseContentInfo, int | None]] = {}
        prev_version: str | None = None
        prev_chunks: dict[bytes, int] | None = None
        for version in versions:
            key = (product, version)
            chunks: dict[bytes, int] | None = None
            if key not in self.contents:
                self.contents[key], chunks = _release_chunks(store, product, version)
                self._bound(self.contents)
            info = self.contents[key]
            delta = None
            if prev_version is not None and not info.error:
                pair = (product, prev_version, version)
                if pair not in self.deltas:
                    if chunks is None:
                        chunks = _release_chunks(store, product, version)[1]
                    if prev_chunks is None:
                        prev_chunks = _release_chunks(store, product, prev_version)[1]
                    if prev_chunks:
                        self.deltas[pair] = sum(
                            n for d, n in chunks.items() if d not in prev_chunks
                        )
                        self._bound(self.deltas)
                delta = self.deltas.get(pair)
            out[version] = (info, delta)
            prev_version, prev_chunks = version, chunks
        return out


def release_infos(
    session: Session, store: ObjectStore, cache: ReleaseCache, org_id: int, *, per_product: int
) -> dict[str, list[ReleaseInfo]]:
    """Each product's newest releases, newest first, with content and delta figures."""
    out: dict[str, list[ReleaseInfo]] = {}
    products = session.execute(
        select(Product.id, Product.name).where(Product.org_id == org_id).order_by(Product.name)
    ).all()
    for product_id, name in products:
        rows = list(
            session.scalars(
                select(Release)
                .where(Release.product_id == product_id)
                .order_by(Release.id.desc())
                .limit(per_product + 1)  # one more: the delta base of the oldest shown
            )
        )
        rows.reverse()
        contents = cache.compute(store, name, [r.version for r in rows])
        fleet = bandwidth.by_release(session, [r.id for r in rows])
        made = deltas.release_deltas(session, [r.id for r in rows])
        infos = []
        for i, r in enumerate(rows):
            info, delta = contents[r.version]
            hardware = r.custom.get("hardware_ids")
            infos.append(
                ReleaseInfo(
                    product=name,
                    version=r.version,
                    created=r.created,
                    created_by=r.created_by,
                    length=r.length,
                    payload_size=r.payload_size,
                    stored_size=r.stored_size,
                    hardware_ids=[str(h) for h in hardware] if isinstance(hardware, list) else [],
                    sha256=str(r.hashes.get("sha256", "")),
                    content=info,
                    previous=rows[i - 1].version if i else None,
                    delta_download=delta if i else None,
                    bandwidth=fleet[r.id],
                    deltas=made[r.id],
                )
            )
        infos.reverse()
        out[name] = infos[:per_product]
    return out
