"""The rollout engine: deployment phases advance, pause by themselves, and the director follows.

A deployment freezes its devices into phases when it is created
(:func:`plan_phases`); from then on this module alone decides which of them
the director offers the release to, and when. The decisions are pure
(:func:`evaluate`, :func:`pause_reason`, :func:`plan_phases`,
:func:`compare_versions`); the rest applies them to the database and the
director and records each change in the audit log.

What a fleet operator can count on:

- **Who is offered the release.** While a deployment is active, every device
  of every *started* phase (``0..current_phase``) has the release as its
  director target; devices of later phases are not touched at all, so they
  keep whatever their director targets said before.
- **Advance.** The current phase is complete, and the next one starts in the
  same tick, when all of these hold:

  1. its failure rate is within the gate (or the operator acknowledged the
     failures by resuming, see below);
  2. at least ``min_soak_s`` seconds have passed since it started;
  3. at least :data:`ADVANCE_QUORUM_PERCENT` of its devices have *finished*
     (committed, failed or rolled back).

  The quorum is what keeps a phase whose devices went silent (a release
  that bricks them cannot report) from widening the rollout on time alone,
  while a few devices that are switched off do not hold the fleet back
  forever; for phases of fewer than ten devices it means every device. A
  phase with no devices (a tag nobody has) completes at once. After the last
  phase the deployment is ``completed``; devices still pending keep their
  target.
- **Automatic pause.** As soon as a started phase's failure rate,
  ``(failed + rolled_back) / devices in the phase``, exceeds
  ``failure_gate_percent`` (strictly: a gate of 0 pauses on the first
  failure, 100 never pauses), the deployment is ``paused`` with a reason that
  names the phase, the rate, the gate and the most common failure reasons.
  The denominator is the whole phase, not the devices heard from so far, so
  two early failures in a phase of a thousand do not stop it.
- **Pause** (automatic or by an operator) stops the spread: no phase starts,
  and devices of started phases that have not begun (``pending``) are no
  longer offered the release. Devices that are downloading or installing
  keep it, so that they finish, roll back by themselves if they must, and
  report; taking a target away from a device half-way gains nothing.
- **Resume** offers the release again to the started phases' unfinished
  devices. It also acknowledges the failures seen so far: the gate does not
  pause the same phase again for them, only for a further failure while the
  rate is still over the gate. The acknowledgement is the resume's audit
  entry (``deployment.resume``, details ``phase`` and ``failures``), so it
  survives restarts and is visible to everyone.
- **Abort** is final: no device that has not committed the release is
  offered it any longer (their director targets become empty); devices
  that committed keep it, as it is what they run.

Ticks are idempotent: :func:`tick` may run in several hub processes at once;
each deployment is handled under a row lock (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite has one writer at a time), re-checked after the lock is
taken, and director assignments that are already right change nothing.

Director changes are made inside the database transaction, after everything
that can refuse the change: if the object store fails half-way, the
transaction rolls back and the next tick (or the operator's retry) does it
again, which :meth:`~skylift.hub.repositories.Director.assign` makes safe.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import math
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from tuf.api.metadata import Metadata, TargetFile

from skylift.errors import SkyliftError
from skylift.hub import deltas, gateway, web
from skylift.hub.auth import Role
from skylift.hub.db.models import (
    AuditEntry,
    DeltaStatus,
    Deployment,
    DeploymentDevice,
    DeploymentPhase,
    DeploymentStatus,
    Device,
    DirectorTargets,
    Product,
    Release,
    ReleaseDelta,
    RolloutStatus,
)
from skylift.hub.web import Conflict, HubContext, Principal
from skylift.versions import compare_versions

__all__ = [
    "ACTOR",
    "ADVANCE_QUORUM_PERCENT",
    "TICK_INTERVAL_KEY",
    "TICK_INTERVAL_S",
    "PhaseCounts",
    "PhasePlan",
    "Verdict",
    "abort",
    "background",
    "compare_versions",
    "evaluate",
    "notify",
    "pause",
    "pause_reason",
    "phase_counts",
    "plan_phases",
    "release_target",
    "resume",
    "start_phase",
    "tick",
]

log = logging.getLogger("skylift.hub.rollouts")

#: Seconds between two ticks of the background loop.
TICK_INTERVAL_S = 2.0
#: ``ctx.extra`` key that overrides :data:`TICK_INTERVAL_S` (tests, busy hubs).
TICK_INTERVAL_KEY = "skylift.rollouts.tick_s"
#: Share of a phase's devices that must have finished before the next phase starts.
ADVANCE_QUORUM_PERCENT = 90
#: Who the audit log names for the engine's own changes.
ACTOR = "rollout"

_FAILED = (RolloutStatus.FAILED, RolloutStatus.ROLLED_BACK)
_FINISHED = (RolloutStatus.COMMITTED, *_FAILED)
#: Devices that still want the release (re-offered on resume).
_UNFINISHED = (RolloutStatus.PENDING, RolloutStatus.DOWNLOADING, RolloutStatus.INSTALLED)
_TOP_REASONS = 3
_REASON_CHARS = 80
_NO_REASON = "no reason given"


# -- phase membership -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhasePlan:
    """One phase as the operator gave it: a cumulative percentage of the selection, or a tag."""

    percent: float | None = None
    tag: str | None = None


def _rank(deployment_id: int, device_id: str) -> bytes:
    return hashlib.sha256(f"{deployment_id}\0{device_id}".encode()).digest()


def plan_phases(
    deployment_id: int,
    devices: Mapping[int, str],
    tags: Mapping[int, Iterable[str]],
    phases: Sequence[PhasePlan],
) -> dict[int, int]:
    """Which phase each selected device belongs to: ``{device pk: phase number}``.

    ``devices`` maps the selection's primary keys to device ids, ``tags`` a
    device's primary key to its tags. Phases are taken in order:

    - a tag phase takes every device with that tag that no earlier phase took;
    - a percent phase is cumulative over the whole selection of ``N``
      devices: in a fixed pseudo-random order (SHA-256 of the deployment id
      and the device id, so the same devices lead however often it is
      computed), it takes the devices among the first ``ceil(percent * N /
      100)`` that no earlier phase took. Rounding up gives a first phase of
      at least one device: a canary, however small the percentage.

    Devices left over (only when the last phase is not 100 %) get no phase.
    """
    order = sorted(devices, key=lambda pk: _rank(deployment_id, devices[pk]))
    tagged = {pk: set(t) for pk, t in tags.items()}
    placed: dict[int, int] = {}
    total = len(order)
    for number, phase in enumerate(phases):
        if phase.tag is not None:
            members: Iterable[int] = (
                pk for pk in order if phase.tag in tagged.get(pk, ()) and pk not in placed
            )
        else:
            assert phase.percent is not None
            # A hair below the exact product, so that 50 % of 20 is 10, not 11.
            upto = min(total, math.ceil(phase.percent * total / 100 - 1e-9))
            members = (pk for pk in order[:upto] if pk not in placed)
        for pk in list(members):
            placed[pk] = number
    return placed


# -- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCounts:
    """How many devices of one phase are in each rollout status."""

    pending: int = 0
    downloading: int = 0
    installed: int = 0
    committed: int = 0
    failed: int = 0
    rolled_back: int = 0

    @classmethod
    def from_statuses(cls, counts: Mapping[RolloutStatus, int]) -> PhaseCounts:
        """From ``{status: count}`` (absent statuses count 0)."""
        return cls(**{str(s): n for s, n in counts.items()})

    @property
    def devices(self) -> int:
        """Devices in the phase."""
        return (
            self.pending
            + self.downloading
            + self.installed
            + self.committed
            + self.failed
            + self.rolled_back
        )

    @property
    def failures(self) -> int:
        """Devices that failed or rolled back."""
        return self.failed + self.rolled_back

    @property
    def finished(self) -> int:
        """Devices with an outcome: committed, failed or rolled back."""
        return self.committed + self.failures

    @property
    def failure_rate_percent(self) -> float:
        """``failures / devices`` in percent; 0 for an empty phase."""
        return 100 * self.failures / self.devices if self.devices else 0.0

    def as_dict(self) -> dict[str, int]:
        """``{"pending": n, ...}`` as the API shows it."""
        return {str(s): getattr(self, str(s)) for s in RolloutStatus}


class Verdict(enum.StrEnum):
    """What the engine does with the current phase of an active deployment."""

    HOLD = "hold"
    PAUSE = "pause"
    ADVANCE = "advance"


def evaluate(
    counts: PhaseCounts,
    *,
    gate_percent: float,
    min_soak_s: int,
    soaked_s: float,
    acknowledged_failures: int = 0,
    quorum_percent: float = ADVANCE_QUORUM_PERCENT,
) -> Verdict:
    """The engine's rule for the current phase (see the module docstring). Pure.

    ``soaked_s`` is the time since the phase started; ``acknowledged_failures``
    the failures the operator accepted by resuming during this phase.
    """
    if counts.devices == 0:
        return Verdict.ADVANCE
    if counts.failure_rate_percent > gate_percent and counts.failures > acknowledged_failures:
        return Verdict.PAUSE
    if soaked_s < min_soak_s:
        return Verdict.HOLD
    if counts.finished * 100 < quorum_percent * counts.devices:
        return Verdict.HOLD
    return Verdict.ADVANCE


def pause_reason(
    phase: int, counts: PhaseCounts, gate_percent: float, reasons: Sequence[tuple[str, int]]
) -> str:
    """``phase 1: 30.0% failed (gate 10%): disk full (2), health check failed (1)``. Pure."""
    text = f"phase {phase}: {counts.failure_rate_percent:.1f}% failed (gate {gate_percent:g}%)"
    if reasons:
        text += ": " + ", ".join(f"{r} ({n})" for r, n in reasons)
    return text


# -- the database side ----------------------------------------------------------------------------


def phase_counts(session: Session, deployment_id: int) -> dict[int, PhaseCounts]:
    """``{phase: counts}`` of one deployment, from one grouped query."""
    rows = session.execute(
        select(DeploymentDevice.phase, DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id == deployment_id)
        .group_by(DeploymentDevice.phase, DeploymentDevice.status)
    )
    by_phase: dict[int, dict[RolloutStatus, int]] = {}
    for phase, status, count in rows:
        by_phase.setdefault(phase, {})[RolloutStatus(status)] = count
    return {p: PhaseCounts.from_statuses(c) for p, c in by_phase.items()}


def _top_reasons(session: Session, deployment_id: int, phase: int) -> list[tuple[str, int]]:
    rows = session.execute(
        select(DeploymentDevice.reason, func.count())
        .where(
            DeploymentDevice.deployment_id == deployment_id,
            DeploymentDevice.phase == phase,
            DeploymentDevice.status.in_(_FAILED),
        )
        .group_by(DeploymentDevice.reason)
    )
    merged: dict[str, int] = {}
    for reason, count in rows:
        # One line, bounded: a device wrote it, and it goes into a one-line status.
        text = " ".join((reason or "").split())[:_REASON_CHARS] or _NO_REASON
        merged[text] = merged.get(text, 0) + count
    return sorted(merged.items(), key=lambda rc: (-rc[1], rc[0]))[:_TOP_REASONS]


def _acknowledged_failures(session: Session, deployment: Deployment) -> int:
    # The latest resume of this deployment says how many failures of which
    # phase the operator accepted (see the module docstring). Read only when
    # the gate is exceeded, which is rare, so the audit log's lack of an
    # index on the target costs nothing on the common path.
    details = session.scalar(
        select(AuditEntry.details)
        .where(
            AuditEntry.org_id == deployment.org_id,
            AuditEntry.target_type == "deployment",
            AuditEntry.target_id == str(deployment.id),
            AuditEntry.action == "deployment.resume",
        )
        .order_by(AuditEntry.id.desc())
        .limit(1)
    )
    if not isinstance(details, dict) or details.get("phase") != deployment.current_phase:
        return 0
    failures = details.get("failures")
    return failures if isinstance(failures, int) else 0


def _devices(
    session: Session,
    deployment_id: int,
    *,
    phases: Iterable[int],
    statuses: Iterable[RolloutStatus],
) -> list[tuple[int, str]]:
    """(pk, device id) of the deployment's devices in ``phases`` with ``statuses``."""
    return [
        (pk, device_id)
        for pk, device_id in session.execute(
            select(Device.id, Device.device_id)
            .join(DeploymentDevice, DeploymentDevice.device_id == Device.id)
            .where(
                DeploymentDevice.deployment_id == deployment_id,
                DeploymentDevice.phase.in_(list(phases)),
                DeploymentDevice.status.in_(list(statuses)),
                # A device revoked since the deployment began is offered nothing more.
                Device.revoked.is_(False),
            )
            .order_by(Device.id)
        )
    ]


def release_target(ctx: HubContext, session: Session, deployment: Deployment) -> TargetFile:
    """The image repository's target of the deployment's release, as the director must name it.

    Length, hashes and custom fields are the image repository's; the custom
    field ``deltas`` is the director's own: the release's ready per-pair
    deltas (:func:`skylift.hub.deltas.offered`). It is read afresh on each
    call, so a delta made during a rollout reaches the devices assigned
    after it (and :func:`tick` re-assigns the devices assigned before it
    that have not begun); the same deltas make the same target, so the
    director re-signs nothing for them.

    Raises:
        Conflict: the image repository does not list the release (it was
            published without the hub, or the store lost it).
    """
    release = session.get(Release, deployment.release_id)
    product = session.get(Product, deployment.product_id)
    # Foreign keys guarantee both.
    assert release is not None
    assert product is not None
    target = ctx.images.load(product.name).target_files.get(release.target_path)
    if target is None:
        raise Conflict(
            f"the image repository of {product.name} does not list {release.target_path}",
            hint="the object store and the database disagree; restore the store",
        )
    return deltas.director_target(target, deltas.offered(session, release.id))


def _signal_director(
    ctx: HubContext, session: Session, device_pk: int, device_id: str, now: datetime
) -> None:
    """Record the device's new director targets in ``director_targets``.

    The row is how the other hub processes learn that a device's poll answer
    changed (the gateway re-reads rows ``updated`` in the last seconds), and
    it holds the signed bytes, so any process can serve them.
    """
    timestamp = json.loads(ctx.director.read(device_id, "metadata/timestamp.json"))
    snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    snapshot = json.loads(
        ctx.director.read(device_id, f"metadata/{snapshot_version}.snapshot.json")
    )
    version = snapshot["signed"]["meta"]["targets.json"]["version"]
    signed = ctx.director.read(device_id, f"metadata/{version}.targets.json")
    expires = Metadata.from_bytes(signed).signed.expires
    row = session.get(DirectorTargets, device_pk)
    if row is None:
        session.add(
            DirectorTargets(
                device_id=device_pk,
                version=version,
                signed_targets=signed,
                expires=expires,
                updated=now,
            )
        )
    else:
        row.version, row.signed_targets, row.expires, row.updated = version, signed, expires, now


def _assign(
    ctx: HubContext,
    session: Session,
    devices: Iterable[tuple[int, str]],
    target: TargetFile | None,
    now: datetime,
) -> list[str]:
    """Set the director target of ``devices``; the ids of those whose targets changed."""
    changed = []
    for pk, device_id in devices:
        if ctx.director.assign(device_id, target):
            _signal_director(ctx, session, pk, device_id, now)
            changed.append(device_id)
    return changed


def notify(device_ids: Iterable[str]) -> None:
    """Tell this process's gateway that these devices' targets changed.

    Call after the transaction that changed them committed. Other processes
    learn it from ``director_targets`` (:func:`_signal_director`).
    """
    for device_id in device_ids:
        gateway.invalidate(device_id)


def _started(deployment: Deployment) -> range:
    return range(deployment.current_phase + 1)


def _phase(deployment: Deployment, number: int) -> DeploymentPhase:
    return next(p for p in deployment.phases if p.phase == number)


def start_phase(
    ctx: HubContext,
    session: Session,
    deployment: Deployment,
    number: int,
    now: datetime,
    target: TargetFile,
) -> list[str]:
    """Make ``number`` the current phase and offer ``target`` to its devices.

    Returns the ids of the devices whose director targets changed (for :func:`notify`).

    Raises:
        StorageError, RepositoryError: the director could not be written; roll the
            transaction back (a retry redoes what was done, harmlessly).
    """
    deployment.current_phase = number
    _phase(deployment, number).started_at = now
    session.flush()
    members = _devices(session, deployment.id, phases=[number], statuses=_UNFINISHED)
    return _assign(ctx, session, members, target, now)


def pause(
    ctx: HubContext,
    session: Session,
    deployment: Deployment,
    *,
    by: Principal,
    reason: str,
    now: datetime,
    action: str = "deployment.pause",
    details: dict[str, Any] | None = None,
) -> list[str]:
    """Pause an active deployment: no phase starts, devices that have not begun are withdrawn.

    Returns the ids of the devices whose director targets changed.

    Raises:
        Conflict: the deployment is not active.
        StorageError, RepositoryError: the director could not be written; roll the
            transaction back (a retry redoes what was done, harmlessly).
    """
    if deployment.status != DeploymentStatus.ACTIVE:
        raise Conflict(f"deployment {deployment.id} is {deployment.status}, not active")
    deployment.status = DeploymentStatus.PAUSED
    deployment.paused_reason = reason
    pending = _devices(
        session, deployment.id, phases=_started(deployment), statuses=[RolloutStatus.PENDING]
    )
    web.audit(
        session,
        by,
        action,
        "deployment",
        deployment.id,
        {"reason": reason, "phase": deployment.current_phase, "withdrawn": len(pending)}
        | (details or {}),
    )
    session.flush()
    return _assign(ctx, session, pending, None, now)


def resume(
    ctx: HubContext, session: Session, deployment: Deployment, *, by: Principal, now: datetime
) -> list[str]:
    """Resume a paused deployment, acknowledging the current phase's failures so far.

    Returns the ids of the devices whose director targets changed.

    Raises:
        Conflict: the deployment is not paused.
        StorageError, RepositoryError: the director could not be written; roll the
            transaction back (a retry redoes what was done, harmlessly).
    """
    if deployment.status != DeploymentStatus.PAUSED:
        raise Conflict(f"deployment {deployment.id} is {deployment.status}, not paused")
    counts = phase_counts(session, deployment.id).get(deployment.current_phase, PhaseCounts())
    target = release_target(ctx, session, deployment)
    deployment.status = DeploymentStatus.ACTIVE
    previous, deployment.paused_reason = deployment.paused_reason, None
    web.audit(
        session,
        by,
        "deployment.resume",
        "deployment",
        deployment.id,
        {
            "phase": deployment.current_phase,
            "failures": counts.failures,
            "paused_reason": previous,
        },
    )
    session.flush()
    unfinished = _devices(session, deployment.id, phases=_started(deployment), statuses=_UNFINISHED)
    return _assign(ctx, session, unfinished, target, now)


def abort(
    ctx: HubContext, session: Session, deployment: Deployment, *, by: Principal, now: datetime
) -> list[str]:
    """Abort an active or paused deployment: devices that have not committed are withdrawn.

    Returns the ids of the devices whose director targets changed.

    Raises:
        Conflict: the deployment is completed or aborted already.
        StorageError, RepositoryError: the director could not be written; roll the
            transaction back (a retry redoes what was done, harmlessly).
    """
    if deployment.status not in (DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED):
        raise Conflict(
            f"deployment {deployment.id} is {deployment.status}; only an active or paused "
            "deployment can be aborted"
        )
    withdrawn = _devices(
        session,
        deployment.id,
        phases=_started(deployment),
        statuses=[s for s in RolloutStatus if s != RolloutStatus.COMMITTED],
    )
    web.audit(
        session,
        by,
        "deployment.abort",
        "deployment",
        deployment.id,
        {
            "previous_status": str(deployment.status),
            "phase": deployment.current_phase,
            "withdrawn": len(withdrawn),
        },
    )
    deployment.status = DeploymentStatus.ABORTED
    session.flush()
    return _assign(ctx, session, withdrawn, None, now)


# -- ticks ----------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one tick did to one deployment."""

    changes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)


def _tick_one(ctx: HubContext, deployment_id: int, now: datetime) -> _Outcome:
    out = _Outcome()
    with ctx.transaction() as session:
        # Locked and re-read: another process (or an operator) may have moved it meanwhile.
        deployment = session.scalars(
            select(Deployment)
            .where(Deployment.id == deployment_id, Deployment.status == DeploymentStatus.ACTIVE)
            .with_for_update()
        ).one_or_none()
        if deployment is None:
            return out
        engine = Principal(deployment.org_id, Role.OPERATOR, ACTOR)
        last = max(p.phase for p in deployment.phases)
        target: TargetFile | None = None
        # Bounded: each pass either stops or moves one phase on.
        for _ in range(last + 1):
            number = deployment.current_phase
            phase = _phase(deployment, number)
            counts = phase_counts(session, deployment.id).get(number, PhaseCounts())
            over_gate = counts.failure_rate_percent > deployment.failure_gate_percent
            started = phase.started_at or now
            verdict = evaluate(
                counts,
                gate_percent=deployment.failure_gate_percent,
                min_soak_s=deployment.min_soak_s,
                soaked_s=(now - started).total_seconds(),
                acknowledged_failures=(
                    _acknowledged_failures(session, deployment) if over_gate else 0
                ),
            )
            if verdict is Verdict.HOLD:
                break
            if verdict is Verdict.PAUSE:
                reason = pause_reason(
                    number,
                    counts,
                    deployment.failure_gate_percent,
                    _top_reasons(session, deployment.id, number),
                )
                out.devices += pause(
                    ctx,
                    session,
                    deployment,
                    by=engine,
                    reason=reason,
                    now=now,
                    action="deployment.auto_pause",
                    details={"counts": counts.as_dict()},
                )
                out.changes.append(f"deployment {deployment.id} paused: {reason}")
                break
            phase.completed_at = now
            if number == last:
                deployment.status = DeploymentStatus.COMPLETED
                web.audit(
                    session,
                    engine,
                    "deployment.complete",
                    "deployment",
                    deployment.id,
                    {"phase": number, "counts": counts.as_dict()},
                )
                out.changes.append(f"deployment {deployment.id} completed")
                break
            target = target or release_target(ctx, session, deployment)
            web.audit(
                session,
                engine,
                "deployment.advance",
                "deployment",
                deployment.id,
                {
                    "completed_phase": number,
                    "started_phase": number + 1,
                    "counts": counts.as_dict(),
                },
            )
            out.devices += start_phase(ctx, session, deployment, number + 1, now, target)
            out.changes.append(f"deployment {deployment.id} phase {number + 1} started")
    return out


def _offer_new_deltas(ctx: HubContext, now: datetime) -> _Outcome:
    """Offer deltas made since their release's deployments began to devices that have not begun.

    A release is often deployed right after it is published, before the hub
    has made its deltas (minutes for a large image): the devices of the
    phases started by then were assigned a target without them. Once a
    delta is ready, the devices of active deployments of its release that
    are still ``pending`` (they have not reported a download) are assigned
    the target again, now naming it; a device polling after that fetches
    the delta instead of the chunks. Devices already downloading are left
    alone. Each ready delta is offered so once (``release_deltas.offered``),
    in one transaction: if the director cannot be written, the next tick
    tries again.
    """
    out = _Outcome()
    with ctx.transaction() as session:
        fresh = session.scalars(
            select(ReleaseDelta)
            .where(ReleaseDelta.status == DeltaStatus.READY, ReleaseDelta.offered.is_(None))
            .order_by(ReleaseDelta.id)
            .with_for_update(skip_locked=True)
        ).all()
        if not fresh:
            return out
        for delta in fresh:
            delta.offered = now
        deployments = session.scalars(
            select(Deployment)
            .where(
                Deployment.release_id.in_(sorted({d.release_id for d in fresh})),
                Deployment.status == DeploymentStatus.ACTIVE,
            )
            .order_by(Deployment.id)
            .with_for_update()
        ).all()
        for deployment in deployments:
            pending = _devices(
                session,
                deployment.id,
                phases=_started(deployment),
                statuses=[RolloutStatus.PENDING],
            )
            changed = _assign(ctx, session, pending, release_target(ctx, session, deployment), now)
            if not changed:
                continue
            web.audit(
                session,
                Principal(deployment.org_id, Role.OPERATOR, ACTOR),
                "deployment.deltas_offered",
                "deployment",
                deployment.id,
                {"phase": deployment.current_phase, "devices": len(changed)},
            )
            out.devices += changed
            out.changes.append(
                f"deployment {deployment.id}: new per-pair deltas offered to "
                f"{len(changed)} device(s) that had not begun"
            )
    return out


def tick(ctx: HubContext, now: datetime | None = None) -> list[str]:
    """Advance or pause every active deployment once; one line per change made. Blocking.

    Deltas made since their deployments began are offered first
    (:func:`_offer_new_deltas`). A deployment that fails (a store outage, a
    lost target) is logged and left for the next tick; the others still move.
    """
    now = now or ctx.clock()
    changes: list[str] = []
    try:
        offered = _offer_new_deltas(ctx, now)
    except (SkyliftError, SQLAlchemyError, OSError):
        log.exception("offering new per-pair deltas failed; retrying next tick")
    else:
        notify(offered.devices)
        changes += offered.changes
    with ctx.sessions() as session:
        ids = list(
            session.scalars(
                select(Deployment.id)
                .where(Deployment.status == DeploymentStatus.ACTIVE)
                .order_by(Deployment.id)
            )
        )
    for deployment_id in ids:
        try:
            outcome = _tick_one(ctx, deployment_id, now)
        except (SkyliftError, SQLAlchemyError, OSError):
            log.exception("rollout tick of deployment %s failed; retrying next tick", deployment_id)
            continue
        notify(outcome.devices)
        changes += outcome.changes
    for line in changes:
        log.info("%s", line)
    return changes


def background(ctx: HubContext) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """The tick loop, every :data:`TICK_INTERVAL_S` (or ``ctx.extra[TICK_INTERVAL_KEY]``)."""
    interval = float(ctx.extra.get(TICK_INTERVAL_KEY, TICK_INTERVAL_S))

    async def loop() -> None:
        while True:
            try:
                await web.run(tick, ctx)
            except Exception:
                # The loop must outlive any one failure, or rollouts stop for good.
                log.exception("rollout tick failed")
            await asyncio.sleep(interval)

    return [loop]
