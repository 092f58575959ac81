"""Serving what devices download: TUF repository files and release content with ranges.

Release content (``.index``, ``.index.zst``, ``.offsets``, ``.pack``, and
``<payload>.<old payload sha256>.delta``, the per-pair deltas of
:mod:`skylift.hub.deltas`) is immutable once published, so it is served with
``Cache-Control: immutable`` and an ETag derived from its object key: any CDN
may keep it forever. Large bodies are
streamed from the object store in bounded reads; several ranges in one
request are answered with ``multipart/byteranges``, at most
:data:`MAX_MULTIRANGE_BYTES` per response.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from skylift.hub import web
from skylift.hub.content import version_segment
from skylift.hub.gateway.poll import etag_matches
from skylift.hub.ranges import ByteRange, RangeNotSatisfiable, multipart_body, parse_range
from skylift.hub.storage import ObjectNotFoundError, ObjectStore
from skylift.hub.web import NotFound

__all__ = [
    "IMMUTABLE",
    "MAX_MULTIRANGE_BYTES",
    "STREAM_CHUNK_BYTES",
    "parse_release_file",
    "release_key",
    "repository_file_response",
    "serve_object",
]

IMMUTABLE = "public, max-age=31536000, immutable"
#: A multi-range answer is built in memory: at most this many bytes of ranges.
MAX_MULTIRANGE_BYTES = 64 * 1024 * 1024
#: Whole objects and single ranges are streamed in reads of this size.
STREAM_CHUNK_BYTES = 1024 * 1024
_OCTETS = "application/octet-stream"

# As the manifest allows them (skylift.bundle.manifest).
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}")
_RELEASE_FILE = re.compile(
    r"([a-z0-9][a-z0-9_-]{0,62})\.(index|index\.zst|offsets|pack|[0-9a-f]{64}\.delta)"
)
_VERSIONED_METADATA = re.compile(r"metadata/\d+\.[a-z]+\.json")


def parse_release_file(version: str, name: str) -> tuple[str, str]:
    """``(version, "<payload>.<kind>")`` if both are well formed.

    Kinds: ``index``, ``index.zst``, ``offsets``, ``pack``, and
    ``<64 lowercase hex>.delta`` (a delta from the old payload of that SHA-256).

    Raises:
        NotFound: anything else (a device asking for junk gets 404, never 400).
    """
    if not _VERSION.fullmatch(version) or not _RELEASE_FILE.fullmatch(name):
        raise NotFound(f"no release file {version[:64]}/{name[:80]}")
    return version, name


def release_key(product: str, version: str, name: str) -> str:
    """The object key of a release file (``skylift.hub.content``'s layout)."""
    return f"releases/{product}/{version_segment(version)}/{name}"


def repository_file_response(data: bytes, rel: str, *, private: bool) -> Response:
    """A TUF repository file as served: JSON metadata or target bytes, with cache headers.

    Versioned files (``N.role.json``, ``targets/<hash>.name``) never change;
    ``root.json`` and ``timestamp.json`` do, and must be revalidated.
    """
    media = "application/json" if rel.startswith("metadata/") else _OCTETS
    scope = "private" if private else "public"
    if rel.startswith("targets/") or _VERSIONED_METADATA.fullmatch(rel):
        cache = f"{scope}, max-age=31536000, immutable"
    else:
        cache = "no-cache"
    return Response(data, media_type=media, headers={"Cache-Control": cache})


def _stream(store: ObjectStore, key: str, start: int, length: int) -> Iterator[bytes]:
    # Starlette runs a sync iterator in the thread pool: store reads stay off the loop.
    end = start + length
    position = start
    while position < end:
        n = min(STREAM_CHUNK_BYTES, end - position)
        yield store.get_range(key, position, n)
        position += n


def _range_refused(size: int, message: str) -> Response:
    return web.error_response(416, message, **{"Content-Range": f"bytes */{size}"})


async def serve_object(request: Request, store: ObjectStore, key: str) -> Response:
    """Serve an immutable object with ETag, ``If-None-Match`` and ``Range`` support.

    Raises:
        NotFound: nothing is stored under ``key`` (404, naming the file, not the store).
        StorageError: the store failed (503).
    """
    try:
        size = await web.run(store.size, key)
    except ObjectNotFoundError:
        # The store's own message names its location (a path, a bucket): not for devices.
        raise NotFound(f"no such file: {key.rsplit('/', 1)[-1][:120]}") from None
    etag = '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes"}
    if etag_matches(request.headers.get("if-none-match"), etag.strip('"')):
        return Response(status_code=304, headers=headers)
    header = request.headers.get("range")
    if header is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(_stream(store, key, 0, size), media_type=_OCTETS, headers=headers)
    try:
        ranges = parse_range(header, size)
    except RangeNotSatisfiable as e:
        return _range_refused(size, str(e))
    if len(ranges) == 1:
        (r,) = ranges
        headers["Content-Range"] = r.content_range(size)
        headers["Content-Length"] = str(r.length)
        return StreamingResponse(
            _stream(store, key, r.start, r.length),
            status_code=206,
            media_type=_OCTETS,
            headers=headers,
        )
    total = sum(r.length for r in ranges)
    if total > MAX_MULTIRANGE_BYTES:
        return _range_refused(
            size,
            f"the ranges ask for {total} bytes; at most {MAX_MULTIRANGE_BYTES} per request",
        )

    def read() -> list[tuple[ByteRange, bytes]]:
        return [(r, store.get_range(key, r.start, r.length)) for r in ranges]

    body, content_type = multipart_body(await web.run(read), size, _OCTETS)
    headers["Content-Type"] = content_type
    return Response(body, status_code=206, headers=headers)
