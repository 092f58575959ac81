"""Per-pair deltas, made in the background: what a device running a recent release downloads.

A chunk plan works from any old version (the device cuts its active slot and
fetches the chunks it lacks). For the transitions most of a fleet makes, from
the previous release or two, the hub knows exactly what such a device holds
and can send less: a delta (:mod:`skylift.chunks.delta`) that rebuilds the new
payload from the old one. This module makes them, records them, and says
which ones the director offers.

What it does, for each release and each of the ``[deltas] previous_releases``
releases of the same product before it (by release id), for each payload both
manifests have with the same name and slot class:

1. **Plan** (:func:`run_pending`): a ``release_deltas`` row, ``pending``. A
   release is planned once (``releases.delta_depth``), again only if the
   setting grows.
2. **Make** one pending delta at a time, in a temporary directory: rebuild
   both payloads from their packs (bounded reads, every chunk decoded and
   checked against its index entry, the whole payload against its manifest
   SHA-256), and call :func:`skylift.deltamaker.make_delta`: a zlib delta
   through the inflated forms when zlib streams make a quarter of the new
   payload (a squashfs image with gzip), a plain one otherwise, both cut
   with :func:`~skylift.chunks.delta.pair_chunking` of the new payload's
   chunking.
3. **Check** it the way a device will: parse it back and apply it, in bounded
   memory, to the old payload; it must rebuild exactly the new payload's
   SHA-256. A delta that does not work is never stored.
4. **Compare** with the chunk plan of a device running exactly the old
   release: the compressed index plus the pack bytes of the chunks (each
   digest once) that the old payload, cut alike, lacks. Smaller: stored as
   ``releases/<product>/<version>/<payload>.<old sha256>.delta`` and
   ``ready``; otherwise ``larger`` (not stored, not offered).

A delta that cannot be made (a missing or corrupt object, a store outage) is
``failed`` with a one-line reason and the others go on; it is tried again
:data:`RETRY_AFTER_S` after the first failure and four times that after the
second, :data:`MAX_ATTEMPTS` times in all, after the pending ones; payloads over
``[deltas] max_payload_bytes`` are ``too_large``. Several hub processes may
run the loop: a process takes a pending delta with a lease
(:data:`LEASE_S`), so a process that dies while making one leaves it to
another once the lease ends.

The director names the ready deltas of a release in each device's target
(:func:`offered`, :func:`director_target`, used by
:func:`skylift.hub.rollouts.release_target`); devices check a delta's SHA-256
and length there, since the director's metadata is signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased
from tuf.api.metadata import TargetFile

from skylift.bundle import BundleError, Manifest, PayloadEntry, read_head
from skylift.chunks import ChunkEntry, ChunkError, decode_chunk, zstreams
from skylift.chunks.delta import pair_chunking
from skylift.deltamaker import cut_file, make_delta, reader
from skylift.errors import SkyliftError
from skylift.hub import web
from skylift.hub.content import MAX_INDEX_BYTES, ContentError, verify_index, version_segment
from skylift.hub.db.models import DeltaStatus, Product, Release, ReleaseDelta
from skylift.hub.repositories import MAX_HEAD_BYTES
from skylift.hub.storage import ObjectNotFoundError, ObjectStore
from skylift.hub.web import HubContext

__all__ = [
    "INTERVAL_KEY",
    "LEASE_S",
    "MAX_ATTEMPTS",
    "RETRY_AFTER_S",
    "DeltaSummary",
    "background",
    "chunk_plan_bytes",
    "delta_name",
    "director_target",
    "offered",
    "release_deltas",
    "retry_after",
    "run_pending",
]

log = logging.getLogger("skylift.hub.deltas")

#: Seconds between two looks for work when there was none.
#: ``ctx.extra`` key that overrides ``[deltas] interval_s`` (tests).
INTERVAL_KEY = "skylift.deltas.interval_s"
#: How long a hub process has to make the delta it took before another may.
LEASE_S = 3600
#: A failed delta is made at most this many times in all ...
MAX_ATTEMPTS = 3
#: ... the second time this many seconds after the first failed, then four times as long.
RETRY_AFTER_S = 600
#: Releases planned per :func:`run_pending` call.
_PLAN_BATCH = 8
#: Pack bytes read per request when rebuilding a payload (plus one chunk at most).
_PACK_READ_BYTES = 8 * 1024 * 1024
_ERROR_CHARS = 300


# -- pure helpers ---------------------------------------------------------------------------------


def delta_name(payload: str, from_sha256: str) -> str:
    """``<payload>.<old payload sha256>.delta``: the file's name under its release."""
    return f"{payload}.{from_sha256}.delta"


def chunk_plan_bytes(
    index_bytes: int, new_entries: Iterable[ChunkEntry], old_digests: Iterable[bytes]
) -> int:
    """What a device holding exactly the old payload downloads with the chunk plan.

    ``index_bytes`` (the compressed index it fetches first) plus each new
    chunk as the pack holds it (codec byte and stored bytes), once per
    distinct digest, for the digests ``old_digests`` (the old payload cut
    with the new chunking) lacks. Pure.
    """
    have = set(old_digests)
    total = index_bytes
    for e in new_entries:
        if e.digest not in have:
            have.add(e.digest)  # a repeated chunk is fetched once
            total += 1 + e.stored_length
    return total


def director_target(target: TargetFile, deltas: Mapping[str, list[dict[str, Any]]]) -> TargetFile:
    """The image repository's ``target`` as the director names it, with ``deltas``.

    Length, hashes and every other custom field stay the image target's (a
    device cross-checks them); ``custom["deltas"]`` is the director's own,
    and absent when ``deltas`` is empty. Pure.
    """
    custom = dict(target.custom) if isinstance(target.custom, dict) else {}
    custom.pop("deltas", None)
    if deltas:
        custom["deltas"] = {name: [dict(d) for d in offers] for name, offers in deltas.items()}
    fields = dict(target.unrecognized_fields)
    if custom or "custom" in fields:
        fields["custom"] = custom
    return TargetFile(target.length, dict(target.hashes), target.path, fields)


def _one_line(error: BaseException) -> str:
    text = (
        error.diagnostics()
        if isinstance(error, SkyliftError)
        else f"{type(error).__name__}: {error}"
    )
    return " ".join(text.split())[:_ERROR_CHARS] or type(error).__name__


# -- what the director and the API show -----------------------------------------------------------


def offered(session: Session, release_id: int) -> dict[str, list[dict[str, Any]]]:
    """The release's ready deltas as the director's target names them, by payload.

    ``{"rootfs": [{"from_version", "from_sha256", "from_size", "sha256",
    "length"}, ...]}``, newest old release first; ``{}`` when none is ready.
    The order is fixed, so the same deltas give the same target (and the
    director re-signs nothing).
    """
    old = aliased(Release)
    rows = session.execute(
        select(ReleaseDelta, old.version)
        .join(old, old.id == ReleaseDelta.from_release_id)
        .where(ReleaseDelta.release_id == release_id, ReleaseDelta.status == DeltaStatus.READY)
        .order_by(ReleaseDelta.payload, ReleaseDelta.from_release_id.desc())
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for row, from_version in rows:
        out.setdefault(row.payload, []).append(
            {
                "from_version": from_version,
                "from_sha256": row.from_sha256,
                "from_size": row.from_size,
                "sha256": row.sha256,
                "length": row.length,
            }
        )
    return out


@dataclass(frozen=True)
class DeltaSummary:
    """One delta of a release, as the management API shows it."""

    from_version: str
    payload: str
    status: str
    length: int | None
    sha256: str | None
    chunk_plan_bytes: int | None
    error: str | None
    seconds: float | None
    created: datetime
    finished: datetime | None
    attempts: int


def release_deltas(session: Session, release_ids: Sequence[int]) -> dict[int, list[DeltaSummary]]:
    """``{release id: its deltas}``, newest old release first, from one query."""
    found: dict[int, list[DeltaSummary]] = {r: [] for r in release_ids}
    if not release_ids:
        return found
    old = aliased(Release)
    rows = session.execute(
        select(ReleaseDelta, old.version)
        .join(old, old.id == ReleaseDelta.from_release_id)
        .where(ReleaseDelta.release_id.in_(list(release_ids)))
        .order_by(
            ReleaseDelta.release_id, ReleaseDelta.from_release_id.desc(), ReleaseDelta.payload
        )
    )
    for row, from_version in rows:
        found[row.release_id].append(
            DeltaSummary(
                from_version=from_version,
                payload=row.payload,
                status=str(row.status),
                length=row.length,
                sha256=row.sha256,
                chunk_plan_bytes=row.plan_bytes,
                error=row.error,
                seconds=row.seconds,
                created=row.created,
                finished=row.finished,
                attempts=row.attempts,
            )
        )
    return found


# -- planning -------------------------------------------------------------------------------------


def _prefix(product: str, version: str) -> str:
    return f"releases/{product}/{version_segment(version)}/"


def _manifest(store: ObjectStore, product: str, version: str, manifest_digest: str) -> Manifest:
    """A release's manifest, read back from its stored head.

    It was verified when the release was published; the digest recorded then
    must match, so a head changed in the store since is refused.

    Raises:
        ContentError: the head is unreadable or is not the one published.
        StorageError: the store failed.
    """
    head = store.get(_prefix(product, version) + "head", max_bytes=MAX_HEAD_BYTES)
    try:
        parsed = read_head(io.BytesIO(head))
        if hashlib.sha256(parsed.manifest_bytes).hexdigest() != manifest_digest:
            raise ContentError(f"the stored head of {product} {version} is not the one published")
        return parsed.unverified_manifest()
    except BundleError as e:
        raise ContentError(f"the stored head of {product} {version}: {e.message}") from e


def _plan_release(ctx: HubContext, release_id: int, depth: int, now: datetime) -> int:
    """Make the pending rows of one release; how many."""
    with ctx.sessions() as session:
        release = session.get(Release, release_id)
        if release is None:
            return 0
        product = release.product.name
        previous = list(
            session.scalars(
                select(Release)
                .where(Release.product_id == release.product_id, Release.id < release.id)
                .order_by(Release.id.desc())
                .limit(depth)
            )
        )
        session.expunge_all()
    new = _manifest(ctx.store, product, release.version, release.manifest_digest)
    wanted: list[tuple[int, PayloadEntry]] = []
    for old_release in previous:
        try:
            old = _manifest(ctx.store, product, old_release.version, old_release.manifest_digest)
        except (ContentError, ObjectNotFoundError) as e:  # for good; an outage is retried
            log.warning(
                "no deltas from %s %s to %s: %s",
                product,
                old_release.version,
                release.version,
                _one_line(e),
            )
            continue
        old_payloads = {p.name: p for p in old.payloads}
        for p in new.payloads:
            q = old_payloads.get(p.name)
            if q is not None and q.slot_class == p.slot_class:
                wanted.append((old_release.id, q))
    with ctx.transaction() as session:
        row = session.scalars(
            select(Release).where(Release.id == release_id).with_for_update()
        ).one_or_none()
        if row is None or (row.delta_depth is not None and row.delta_depth >= depth):
            return 0  # another process planned it meanwhile
        have = {
            (from_id, name)
            for from_id, name in session.execute(
                select(ReleaseDelta.from_release_id, ReleaseDelta.payload).where(
                    ReleaseDelta.release_id == release_id
                )
            )
        }
        made = 0
        for from_id, q in wanted:
            if (from_id, q.name) not in have:
                session.add(
                    ReleaseDelta(
                        release_id=release_id,
                        from_release_id=from_id,
                        payload=q.name,
                        from_sha256=q.sha256,
                        from_size=q.size,
                        status=DeltaStatus.PENDING,
                        created=now,
                    )
                )
                made += 1
        row.delta_depth = depth
    return made


def _plan(ctx: HubContext, depth: int, now: datetime) -> None:
    with ctx.sessions() as session:
        todo = list(
            session.scalars(
                select(Release.id)
                .where(or_(Release.delta_depth.is_(None), Release.delta_depth < depth))
                .order_by(Release.id.desc())
                .limit(_PLAN_BATCH)
            )
        )
    for release_id in todo:
        try:
            _plan_release(ctx, release_id, depth, now)
        except (ContentError, ObjectNotFoundError) as e:
            # The release's own head is gone or not the one published: nothing
            # to plan, ever; say so once.
            log.error("no deltas to release %s: %s", release_id, _one_line(e))
            with ctx.transaction() as session:
                release = session.get(Release, release_id)
                if release is not None:
                    release.delta_depth = depth
        except (SkyliftError, OSError) as e:
            log.warning("planning the deltas of release %s: %s; retrying", release_id, _one_line(e))


# -- making one delta -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    id: int
    product: str
    version: str
    manifest_digest: str
    from_version: str
    from_manifest_digest: str
    payload: str
    from_sha256: str
    attempt: int = 1

    def describe(self) -> str:
        return f"{self.product} {self.from_version} -> {self.version} {self.payload}"


@dataclass(frozen=True)
class _Result:
    status: DeltaStatus
    length: int | None = None
    sha256: str | None = None
    plan_bytes: int | None = None
    error: str | None = None


def retry_after(attempts: int) -> timedelta:
    """How long after its ``attempts``-th attempt failed a delta is tried again."""
    return timedelta(seconds=RETRY_AFTER_S * 4 ** max(attempts - 1, 0))


def _claim(ctx: HubContext, now: datetime) -> _Job | None:
    """Take the next pending delta (newest release first), else a failed one due, under a lease."""
    order = (ReleaseDelta.release_id.desc(), ReleaseDelta.from_release_id.desc(), ReleaseDelta.id)
    due = [
        and_(ReleaseDelta.attempts == n, ReleaseDelta.finished < now - retry_after(n))
        for n in range(1, MAX_ATTEMPTS)
    ]
    with ctx.transaction() as session:
        row = session.scalars(
            select(ReleaseDelta)
            .where(
                ReleaseDelta.status == DeltaStatus.PENDING,
                or_(ReleaseDelta.lease_until.is_(None), ReleaseDelta.lease_until < now),
            )
            .order_by(*order)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None and due:
            row = session.scalars(
                select(ReleaseDelta)
                .where(ReleaseDelta.status == DeltaStatus.FAILED, or_(*due))
                .order_by(*order)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
        if row is None:
            return None
        row.status = DeltaStatus.PENDING  # a failed one again, until this attempt ends
        row.attempts += 1
        row.lease_until = now + timedelta(seconds=LEASE_S)
        release = session.get(Release, row.release_id)
        old = session.get(Release, row.from_release_id)
        # Foreign keys guarantee all three.
        assert release is not None
        assert old is not None
        product = session.get(Product, release.product_id)
        assert product is not None
        return _Job(
            id=row.id,
            product=product.name,
            version=release.version,
            manifest_digest=release.manifest_digest,
            from_version=old.version,
            from_manifest_digest=old.manifest_digest,
            payload=row.payload,
            from_sha256=row.from_sha256,
            attempt=row.attempts,
        )


def _index_entries(
    store: ObjectStore, prefix: str, payload: PayloadEntry, manifest: Manifest
) -> list[ChunkEntry]:
    pages = store.get(f"{prefix}{payload.name}.index", max_bytes=MAX_INDEX_BYTES)
    return verify_index(payload.name, pages, manifest)


def _rebuild(
    store: ObjectStore, key: str, entries: Sequence[ChunkEntry], payload: PayloadEntry, out: Path
) -> None:
    """Write the payload that the pack ``key`` holds to ``out``, every chunk checked.

    Reads the pack in requests of about :data:`_PACK_READ_BYTES`: memory is
    one such read, whatever the payload's size.

    Raises:
        ContentError: the pack's size, a codec byte, a chunk or the whole
            payload disagrees with the index and the manifest.
        StorageError: the store failed.
    """
    expected = sum(1 + e.stored_length for e in entries)
    size = store.size(key)
    if size != expected:
        raise ContentError(f"{key} is {size} bytes; its index makes {expected}")
    decompressor = zstandard.ZstdDecompressor()
    digest = hashlib.sha256()
    written = 0
    position = 0
    i = 0
    with open(out, "wb") as f:
        while i < len(entries):
            j, batch = i, 0
            while j < len(entries) and (
                j == i or batch + 1 + entries[j].stored_length <= _PACK_READ_BYTES
            ):
                batch += 1 + entries[j].stored_length
                j += 1
            view = memoryview(store.get_range(key, position, batch))
            at = 0
            for e in entries[i:j]:
                if view[at] != e.codec:
                    raise ContentError(f"{key}: the chunk at offset {e.offset} has the wrong codec")
                try:
                    data = decode_chunk(
                        e, bytes(view[at + 1 : at + 1 + e.stored_length]), decompressor
                    )
                except ChunkError as err:
                    raise ContentError(f"{key}: {err.message}") from err
                f.write(data)
                digest.update(data)
                written += len(data)
                at += 1 + e.stored_length
            position += batch
            i = j
    if written != payload.size or digest.hexdigest() != payload.sha256:
        raise ContentError(f"{key} does not rebuild the payload its manifest describes")


def _check(delta: Path, old: Path, old_payload: PayloadEntry, new_payload: PayloadEntry) -> None:
    """Apply ``delta`` to ``old`` as a device would; it must make exactly the new payload.

    Memory: one literal and its dictionary, or one read of the old payload.

    Raises:
        DeltaError: it does not parse, names other payloads, or rebuilds other bytes.
    """
    with open(delta, "rb") as d, open(old, "rb") as o:
        pieces = zstreams.rebuild(
            d.read,
            reader(o),
            from_sha256=old_payload.sha256,
            from_size=old_payload.size,
            to_sha256=new_payload.sha256,
            to_size=new_payload.size,
        )
        for _ in pieces:
            pass


def _make(ctx: HubContext, job: _Job) -> _Result:
    """Make, check, compare and (when it is worth it) store one delta."""
    store = ctx.store
    new_prefix = _prefix(job.product, job.version)
    old_prefix = _prefix(job.product, job.from_version)
    new_manifest = _manifest(store, job.product, job.version, job.manifest_digest)
    old_manifest = _manifest(store, job.product, job.from_version, job.from_manifest_digest)
    try:
        new_p = new_manifest.payload(job.payload)
        old_p = old_manifest.payload(job.payload)
    except KeyError as e:
        raise ContentError(f"a manifest has no payload {job.payload}") from e
    if old_p.sha256 != job.from_sha256:
        raise ContentError(f"the old payload {job.payload} is not the one planned")
    limit = ctx.config.delta_max_payload_bytes
    largest = max(new_p.size, old_p.size)
    if largest > limit:
        return _Result(
            DeltaStatus.TOO_LARGE,
            error=f"a payload of {largest} bytes is over the [deltas] max_payload_bytes "
            f"limit of {limit}",
        )
    new_entries = _index_entries(store, new_prefix, new_p, new_manifest)
    old_entries = _index_entries(store, old_prefix, old_p, old_manifest)
    try:
        index_bytes = store.size(f"{new_prefix}{job.payload}.index.zst")
    except ObjectNotFoundError:  # published before the hub kept a compressed index
        index_bytes = store.size(f"{new_prefix}{job.payload}.index")
    with tempfile.TemporaryDirectory(prefix="skylift-delta-") as tmp:
        work = Path(tmp)
        old_path, new_path = work / "old", work / "new"
        _rebuild(store, f"{old_prefix}{job.payload}.pack", old_entries, old_p, old_path)
        _rebuild(store, f"{new_prefix}{job.payload}.pack", new_entries, new_p, new_path)
        old_chunks = cut_file(old_path, new_p.chunking)
        plan_bytes = chunk_plan_bytes(index_bytes, new_entries, (c[2] for c in old_chunks))
        delta_path = work / "delta"
        # The index's entries and the chunks just cut are the plain delta's when
        # the payload's chunking is the pair's: no need to cut again.
        chunks = None
        if pair_chunking(new_p.chunking) == new_p.chunking:
            chunks = (old_chunks, ((e.offset, e.length, e.digest) for e in new_entries))
        made = make_delta(
            old_path,
            new_path,
            new_p.chunking,
            delta_path,
            old_sha256=old_p.sha256,
            new_sha256=new_p.sha256,
            chunks=chunks,
            zlib=ctx.config.delta_zlib,
        )
        del old_chunks, chunks
        if made.kind == "zlib":
            log.info(
                "delta %s %s -> %s (%s): through %d compressed streams, %d made on the device",
                job.product,
                job.from_version,
                job.version,
                job.payload,
                made.streams,
                made.deflated,
            )
        _check(delta_path, old_path, old_p, new_p)
        with open(delta_path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        length = delta_path.stat().st_size
        if length >= plan_bytes:
            return _Result(DeltaStatus.LARGER, length, digest.hexdigest(), plan_bytes)
        store.put_file(new_prefix + delta_name(job.payload, old_p.sha256), delta_path)
    return _Result(DeltaStatus.READY, length, digest.hexdigest(), plan_bytes)


def _record(ctx: HubContext, job: _Job, result: _Result, seconds: float) -> bool:
    """Write the outcome, unless another process finished the delta first."""
    with ctx.transaction() as session:
        row = session.get(ReleaseDelta, job.id, with_for_update=True)
        if row is None or row.status != DeltaStatus.PENDING:
            return False
        row.status = result.status
        row.length, row.sha256 = result.length, result.sha256
        row.plan_bytes, row.error = result.plan_bytes, result.error
        row.seconds = round(seconds, 3)
        row.finished = ctx.clock()
        row.lease_until = None
    return True


def _run_one(ctx: HubContext, job: _Job) -> str:
    started = time.monotonic()
    try:
        result = _make(ctx, job)
    except Exception as e:
        # Whatever went wrong with this delta (a store outage, a corrupt or
        # missing object, a bug) is recorded on it; the next one is made.
        if not isinstance(e, (SkyliftError, OSError)):
            log.exception("making the delta %s failed", job.describe())
        result = _Result(DeltaStatus.FAILED, error=_one_line(e))
    seconds = time.monotonic() - started
    _record(ctx, job, result, seconds)
    if result.status in (DeltaStatus.READY, DeltaStatus.LARGER):
        line = (
            f"delta {job.describe()}: {result.status}, {result.length} bytes "
            f"(chunk plan {result.plan_bytes} bytes), {seconds:.1f} s"
        )
    else:
        line = f"delta {job.describe()}: {result.status}: {result.error}"
        if result.status == DeltaStatus.FAILED:
            if job.attempt < MAX_ATTEMPTS:
                wait = retry_after(job.attempt).total_seconds() / 60
                line += f" (attempt {job.attempt} of {MAX_ATTEMPTS}; again in {wait:.0f} min)"
            else:
                line += f" (attempt {job.attempt} of {MAX_ATTEMPTS}; not tried again)"
    log.info("%s", line)
    return line


def run_pending(ctx: HubContext, *, limit: int = 1, now: datetime | None = None) -> list[str]:
    """Plan new releases' deltas, then make up to ``limit`` pending ones. Blocking.

    Returns one line per delta made (or failed, or skipped). Does nothing when
    ``[deltas] previous_releases`` is 0. A delta that fails is recorded as
    such and does not stop the others.
    """
    depth = ctx.config.delta_previous_releases
    if depth <= 0:
        return []
    now = now or ctx.clock()
    try:
        _plan(ctx, depth, now)
    except (SkyliftError, SQLAlchemyError, OSError):
        log.exception("planning deltas failed; retrying next time")
    lines: list[str] = []
    for _ in range(limit):
        job = _claim(ctx, now)
        if job is None:
            break
        lines.append(_run_one(ctx, job))
    return lines


def background(ctx: HubContext) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """The delta loop: one delta at a time; every ``[deltas] interval_s`` when idle.

    The interval is ``ctx.extra[INTERVAL_KEY]`` when set.
    """
    interval = float(ctx.extra.get(INTERVAL_KEY, ctx.config.delta_interval_s))

    async def loop() -> None:
        while True:
            made: list[str] = []
            try:
                made = await web.run(run_pending, ctx)
            except Exception:
                # The loop must outlive any one failure (a database outage), or
                # no delta is made again until the hub restarts.
                log.exception("making deltas failed")
            await asyncio.sleep(0 if made else interval)

    return [loop]
