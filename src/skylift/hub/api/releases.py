"""Publishing releases: chunk uploads, then a release in one step (ADR 0004).

What ``skylift release push`` does, and what the hub checks:

1. ``POST /chunks/missing``: which of the bundle's chunks the hub lacks.
2. ``POST /chunks`` with batches of them (:func:`parse_chunk_batch`; or
   ``PUT /chunks/{digest}`` one at a time): each chunk as stored with its
   codec, checked by decoding it to its digest before it is kept (a batch
   with one bad chunk stores none). Chunks are content-addressed and shared
   by every release of every product, so an upload is not audited: it
   changes nothing anyone can see until a release names it.
3. ``POST /products/{name}/releases``: the next targets metadata, signed
   offline by the release keys, with the bundle head and its index pages.
   Checked in full before anything is written: the head's manifest is
   signed by the threshold of the product's release keys (the targets role
   of its current image root, the same keys that must sign targets), names
   this product and a version not released yet; the targets add exactly one
   target, ``<version>.head``, for exactly this head, with custom fields
   that agree with the manifest; every index page verifies and every chunk
   is present. Then the packs are written, the release row inserted, and the
   targets published with a new snapshot and timestamp, last.

A refused release changes nothing: no release row, the image repository's
targets unchanged, and (because the checks come first) no content stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from tuf.api.metadata import TargetFile

from skylift.bundle import BundleError, Manifest, TrustedKeys, check_name, read_head
from skylift.chunks.index import CHUNK_RECORD_HEAD
from skylift.errors import UserInputError
from skylift.hub import bandwidth, deltas, web
from skylift.hub.api.common import (
    Body,
    Query,
    authorize,
    conflict_on_duplicate,
    find_product,
    rfc3339,
    route,
)
from skylift.hub.auth import Role
from skylift.hub.content import MAX_INDEX_BYTES, ContentError
from skylift.hub.db.models import Product, Release
from skylift.hub.repositories import MAX_HEAD_BYTES, ReleaseRejectedError
from skylift.hub.web import Conflict, HubContext, NotFound
from skylift.trust.repository import MAX_METADATA_BYTES

__all__ = [
    "MAX_BATCH_BODY_BYTES",
    "MAX_BATCH_CHUNKS",
    "MAX_CHUNK_BODY_BYTES",
    "MAX_MISSING_DIGESTS",
    "MAX_MISSING_REQUEST_BYTES",
    "MAX_RELEASE_REQUEST_BYTES",
    "delta_json",
    "parse_chunk_batch",
    "release_json",
    "routes",
]

#: Digests one ``chunks/missing`` request may ask about.
MAX_MISSING_DIGESTS = 100_000
#: 100 000 quoted digests and their commas, with room to spare.
MAX_MISSING_REQUEST_BYTES = 8 * 1024 * 1024
#: A chunk as stored: at most 4 MiB of content, plus what compression may add.
MAX_CHUNK_BODY_BYTES = 4 * 1024 * 1024 + 1024
#: A batch of chunks (POST /chunks) is at most this long ...
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024
#: ... and holds at most this many chunks.
MAX_BATCH_CHUNKS = 4096
#: Targets, head and index pages, base64-encoded.
MAX_RELEASE_REQUEST_BYTES = 64 * 1024 * 1024
_MAX_PAYLOADS = 16
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CODECS = {"0": 0, "1": 1}


def parse_chunk_batch(body: bytes) -> list[tuple[str, int, bytes]]:
    """The ``(digest, codec, stored)`` chunks of a ``POST /chunks`` body, bounded.

    The body is records one after another: the chunk's SHA-256 as 64
    lowercase hex digits (ASCII), its codec (one byte: 0 raw, 1 zstd), the
    length of its stored bytes (4 bytes, big-endian), then those bytes.

    Raises:
        UserInputError: empty, truncated, more than :data:`MAX_BATCH_CHUNKS`
            records, a malformed digest or codec, a chunk over
            :data:`MAX_CHUNK_BODY_BYTES`.
    """
    chunks: list[tuple[str, int, bytes]] = []
    pos = 0
    while pos < len(body):
        where = f"chunk record {len(chunks)}"
        if len(chunks) == MAX_BATCH_CHUNKS:
            raise UserInputError(f"a batch holds at most {MAX_BATCH_CHUNKS} chunks")
        if pos + CHUNK_RECORD_HEAD.size > len(body):
            raise UserInputError(f"{where}: the batch ends inside its header")
        raw, codec, length = CHUNK_RECORD_HEAD.unpack_from(body, pos)
        pos += CHUNK_RECORD_HEAD.size
        digest = raw.decode("ascii", "replace")
        if not _DIGEST.fullmatch(digest):
            raise UserInputError(
                f"{where}: {digest[:80]!r} is not a chunk digest (64 lowercase hex)"
            )
        if codec not in _CODECS.values():
            raise UserInputError(f"{where}: the codec is 0 (raw) or 1 (zstd), not {codec}")
        if length > MAX_CHUNK_BODY_BYTES or pos + length > len(body):
            raise UserInputError(
                f"{where}: {length} bytes is more than a chunk or the rest of the batch holds"
            )
        chunks.append((digest, codec, body[pos : pos + length]))
        pos += length
    if not chunks:
        raise UserInputError("the batch holds no chunk")
    return chunks


def delta_json(delta: deltas.DeltaSummary) -> dict[str, Any]:
    """One per-pair delta of a release, as the API shows it."""
    return {
        "from_version": delta.from_version,
        "payload": delta.payload,
        "status": delta.status,
        "length": delta.length,
        "sha256": delta.sha256,
        "chunk_plan_bytes": delta.chunk_plan_bytes,
        "error": delta.error,
        "seconds": delta.seconds,
        "created": rfc3339(delta.created),
        "finished": rfc3339(delta.finished) if delta.finished is not None else None,
        "attempts": delta.attempts,
    }


def release_json(
    release: Release, release_deltas: list[deltas.DeltaSummary] | None = None
) -> dict[str, Any]:
    """A release as the API shows it, with its per-pair deltas (none yet by default)."""
    hardware = release.custom.get("hardware_ids")
    return {
        "version": release.version,
        "target": release.target_path,
        "length": release.length,
        "sha256": release.hashes["sha256"],
        "hardware_ids": list(hardware) if isinstance(hardware, list) else [],
        "payload_size": release.payload_size,
        "stored_size": release.stored_size,
        "manifest_sha256": release.manifest_digest,
        "created": rfc3339(release.created),
        "created_by": release.created_by,
        "deltas": [delta_json(d) for d in release_deltas or []],
    }


def _base64(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise UserInputError(f"{what} must be a base64 string")
    if len(value) > 4 * (limit // 3 + 1):
        raise UserInputError(f"{what} is larger than {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserInputError(f"{what} is not valid base64") from e
    if len(data) > limit:
        raise UserInputError(f"{what} is larger than {limit} bytes")
    return data


def _indexes(value: object) -> dict[str, bytes]:
    if not isinstance(value, dict) or not 1 <= len(value) <= _MAX_PAYLOADS:
        raise UserInputError(f"indexes must map 1 to {_MAX_PAYLOADS} payload names to base64")
    out = {}
    for name, data in value.items():
        try:
            check_name(name)
        except BundleError as e:
            raise UserInputError(f"indexes: {e.message}") from e
        out[name] = _base64(data, f"the index of {name}", MAX_INDEX_BYTES)
    return out


def _manifest(head: bytes, trusted: TrustedKeys) -> tuple[Manifest, bytes]:
    """The head's manifest, verified, and its bytes.

    Raises:
        ContentError: the head is malformed or not signed by ``trusted``.
    """
    try:
        parsed = read_head(io.BytesIO(head))
        parsed.verify(trusted)
    except BundleError as e:
        raise ContentError(f"bundle head refused: {e.message}") from e
    return parsed.manifest, parsed.manifest_bytes


def _check_target(target: TargetFile, manifest: Manifest) -> None:
    """The added target must be ``<version>.head`` and describe what the manifest says.

    Devices and operators read a target's custom fields to see what it
    installs without fetching it (ADR 0004): they must not disagree with
    the signed manifest.

    Raises:
        ReleaseRejectedError: they disagree.
    """
    expected_path = f"{manifest.version}.head"
    if target.path != expected_path:
        raise ReleaseRejectedError(
            f"the new target is {target.path[:80]!r}; the bundle's is {expected_path}"
        )
    custom = target.custom if isinstance(target.custom, dict) else {}
    expected: dict[str, Any] = {
        "product": manifest.product,
        "version": manifest.version,
        "hardware_ids": list(manifest.compatible),
        "payloads": {
            p.name: {"size": p.size, "sha256": p.sha256, "slot_class": p.slot_class}
            for p in manifest.payloads
        },
    }
    for key, value in expected.items():
        # payloads may be left out; what the others say is required.
        if (key in custom or key != "payloads") and custom.get(key) != value:
            raise ReleaseRejectedError(
                f"the target's custom field {key!r} does not match the bundle manifest",
                hint="sign targets as `skylift release push` does",
            )


def _publish(
    ctx: HubContext,
    session: Session,
    product: Product,
    *,
    targets: bytes,
    head: bytes,
    indexes: dict[str, bytes],
    actor: web.Principal,
) -> Release:
    """Check, store and publish one release, in the caller's transaction.

    Raises:
        ContentError: the head, an index or a chunk is refused (400).
        ReleaseRejectedError: the targets do not qualify (409).
        Conflict: the version is released already (409).
    """
    repo = ctx.images.load(product.name)
    # The targets role of the current root: the keys add_release checks the
    # targets against, so that head and targets answer to the same keys.
    keys, threshold = repo.keys("targets")
    trusted = TrustedKeys(tuple(keys), threshold)
    manifest, manifest_bytes = _manifest(head, trusted)
    if manifest.product != product.name:
        raise ContentError(f"the bundle is for product {manifest.product}, not {product.name}")
    if session.scalar(
        select(Release.id).where(
            Release.product_id == product.id, Release.version == manifest.version
        )
    ):
        raise Conflict(
            f"{product.name} {manifest.version} is released already",
            hint="build the bundle with a new version",
        )
    # Everything that can refuse the release refuses it before anything is written.
    target = ctx.images.check_release(product.name, targets=targets, head=head)
    _check_target(target, manifest)
    ingested = ctx.content.ingest(product.name, head=head, indexes=indexes, trusted=trusted)
    release = Release(
        product_id=product.id,
        version=manifest.version,
        target_path=target.path,
        length=target.length,
        hashes=dict(target.hashes),
        custom=dict(target.custom or {}),
        manifest_digest=hashlib.sha256(manifest_bytes).hexdigest(),
        payload_size=sum(p.size for p in manifest.payloads),
        stored_size=ingested.stored_bytes,
        created=ctx.clock(),
        created_by=actor.actor,
    )
    session.add(release)
    session.flush()
    web.audit(
        session,
        actor,
        "release.create",
        "release",
        f"{product.name}/{manifest.version}",
        {
            "product": product.name,
            "version": manifest.version,
            "target": target.path,
            "sha256": target.hashes.get("sha256"),
            "signed_by": ingested.signed_by,
            "chunks": ingested.chunks,
            "stored_size": ingested.stored_bytes,
        },
    )
    # Last: publishing is the moment devices can see it, and the store is
    # not transactional.
    ctx.images.add_release(product.name, targets=targets, head=head)
    return release


def routes(ctx: HubContext) -> list[BaseRoute]:
    """Chunks and releases."""

    async def missing(request: Request) -> Response:
        await authorize(ctx, request, Role.OPERATOR, "uploading chunks")
        doc = await web.read_json(request, MAX_MISSING_REQUEST_BYTES)
        Body(doc, required=("digests",))
        digests = doc["digests"]
        # Checked here rather than with Body.strings, whose order-keeping
        # de-duplication is quadratic in a list this long.
        if not isinstance(digests, list) or len(digests) > MAX_MISSING_DIGESTS:
            raise UserInputError(f"digests must be a list of at most {MAX_MISSING_DIGESTS}")
        for d in digests:
            if not isinstance(d, str) or not _DIGEST.fullmatch(d):
                raise UserInputError(f"{str(d)[:80]!r} is not a chunk digest (64 lowercase hex)")
        return JSONResponse({"missing": await web.run(ctx.content.missing, set(digests))})

    async def put_chunk(request: Request) -> Response:
        await authorize(ctx, request, Role.OPERATOR, "uploading chunks")
        digest = request.path_params["digest"]
        if not _DIGEST.fullmatch(digest):
            raise UserInputError(f"{digest[:80]!r} is not a chunk digest (64 lowercase hex)")
        codec = _CODECS.get(request.headers.get("x-skylift-codec", ""))
        if codec is None:
            raise UserInputError("send the header X-Skylift-Codec: 0 (raw) or 1 (zstd)")
        media = request.headers.get("content-type", "application/octet-stream")
        if media.split(";")[0].strip() != "application/octet-stream":
            raise UserInputError("send the chunk as Content-Type: application/octet-stream")
        # Content-addressed: a chunk already here is this chunk, whoever sends it.
        if not await web.run(ctx.content.missing, [digest]):
            return Response(status_code=200)
        stored = await web.read_body(request, MAX_CHUNK_BODY_BYTES)
        await web.run(ctx.content.put_chunk, digest, codec, stored)
        return Response(status_code=201)

    async def put_chunks(request: Request) -> Response:
        await authorize(ctx, request, Role.OPERATOR, "uploading chunks")
        media = request.headers.get("content-type", "application/octet-stream")
        if media.split(";")[0].strip() != "application/octet-stream":
            raise UserInputError("send the chunks as Content-Type: application/octet-stream")
        chunks = parse_chunk_batch(await web.read_body(request, MAX_BATCH_BODY_BYTES))
        stored = await web.run(ctx.content.put_chunks, chunks)
        return JSONResponse({"stored": stored, "present": len({c[0] for c in chunks}) - stored})

    async def create_release(request: Request) -> Response:
        who = await authorize(ctx, request, Role.OPERATOR, "publishing a release")
        doc = await web.read_json(request, MAX_RELEASE_REQUEST_BYTES)
        body = Body(doc, required=("targets", "head", "indexes"))
        targets = json.dumps(body.object("targets"), separators=(",", ":")).encode()
        if len(targets) > MAX_METADATA_BYTES:
            raise UserInputError(f"targets is larger than {MAX_METADATA_BYTES} bytes")
        head = _base64(doc["head"], "head", MAX_HEAD_BYTES)
        indexes = _indexes(doc["indexes"])
        name = request.path_params["name"]

        def work() -> dict[str, Any]:
            with (
                conflict_on_duplicate(f"{name}: that version is being released already"),
                ctx.transaction() as session,
            ):
                product = find_product(session, who, name)
                # One release of a product at a time, across hub processes:
                # each must follow the targets version the previous one published.
                session.execute(
                    select(Product.id).where(Product.id == product.id).with_for_update()
                )
                release = _publish(
                    ctx, session, product, targets=targets, head=head, indexes=indexes, actor=who
                )
                return release_json(release)

        return JSONResponse(await web.run(work), 201)

    async def list_releases(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "listing releases")
        Query(request, allowed=())

        def work() -> list[dict[str, Any]]:
            with ctx.transaction() as session:
                product = find_product(session, who, request.path_params["name"])
                rows = list(
                    session.scalars(
                        select(Release)
                        .where(Release.product_id == product.id)
                        .order_by(Release.id.desc())
                    )
                )
                ids = [r.id for r in rows]
                totals = bandwidth.by_release(session, ids)
                made = deltas.release_deltas(session, ids)
                return [release_json(r, made[r.id]) | {"bandwidth": totals[r.id]} for r in rows]

        return JSONResponse({"items": await web.run(work)})

    async def show_release(request: Request) -> Response:
        who = await authorize(ctx, request, Role.VIEWER, "showing a release")
        Query(request, allowed=())
        version = request.path_params["version"]

        def work() -> dict[str, Any]:
            with ctx.transaction() as session:
                product = find_product(session, who, request.path_params["name"])
                release = session.scalars(
                    select(Release).where(
                        Release.product_id == product.id, Release.version == version
                    )
                ).one_or_none()
                if release is None:
                    raise NotFound(f"{product.name} has no release {version[:80]!r}")
                totals = bandwidth.by_release(session, [release.id])
                made = deltas.release_deltas(session, [release.id])
                return release_json(release, made[release.id]) | {"bandwidth": totals[release.id]}

        return JSONResponse(await web.run(work))

    return [
        route("/chunks/missing", missing, "POST"),
        route("/chunks", put_chunks, "POST"),
        route("/chunks/{digest}", put_chunk, "PUT"),
        route("/products/{name}/releases", create_release, "POST"),
        route("/products/{name}/releases", list_releases, "GET"),
        route("/products/{name}/releases/{version}", show_release, "GET"),
    ]
